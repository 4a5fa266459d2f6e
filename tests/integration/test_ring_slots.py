"""How many segments flowspec keeps in flight: stages + 1 with a device per stage, fewer when the
stages share cores (a segment sent ahead is computed even when pruning has emptied it)."""

from __future__ import annotations

import pytest

from engine.config import SessionConfig, SpeculationConfig
from engine.coordinator import default_slots
from engine.wire import Segment
from engine.stage import load_head
from tests.integration.engine_kit import (decisive_model, first_difference, local_ring, make_drafter, prompt_ids,
                                          reference_greedy, run, save_model, single_thread)  # noqa: F401

N_NEW = 24


@pytest.mark.parametrize("n_stages, parallel, slots", [
    (4, 4, 5),   # a device per stage: the paper's stages + 1
    (4, 8, 5),
    (4, 2, 2),   # 4 stage processes on cores for 2 of them
    (4, 1, 1),   # 2 cores, one kept by the coordinator
    (1, 1, 1),   # one stage: no pipeline to keep busy
    (1, 4, 1),
    (3, 0, 1),
])
def test_default_slots(n_stages, parallel, slots):
    assert default_slots(n_stages, parallel) == slots


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, single_thread):  # noqa: F811
    model = decisive_model("llama", n_layers=3)
    return model, save_model(model, tmp_path_factory.mktemp("slots") / "target")


@pytest.mark.parametrize("parallel, ring_slots, expected", [(None, None, 4), (1, None, 1), (2, None, 2), (1, 3, 3)])
def test_flowspec_slots_follow_the_ring_and_output_stays_greedy(tiny, parallel, ring_slots, expected):
    model, model_dir = tiny
    ring = local_ring(model_dir, 3)
    if parallel is not None:
        ring.parallel_stages = parallel
    head = load_head(model_dir, "fp32")
    ids = prompt_ids(12, head.lm_head.shape[0], seed=3)
    config = SessionConfig(strategy="flowspec", max_new_tokens=N_NEW,
                           speculation=SpeculationConfig(ring_slots=ring_slots, segment_max=4))
    result = run(ring, head, make_drafter("model", model_dir, head), config, ids)
    want = reference_greedy(model, ids, N_NEW)
    assert result.token_ids == want, first_difference(result.token_ids, want)
    assert result.ring_slots == expected
    assert 0 < result.in_flight <= expected


@pytest.mark.parametrize("strategy", ["chunk", "pipedec"])
def test_baselines_keep_stages_plus_one(tiny, strategy):
    """chunk and pipedec are the paper's baselines: their slot count shapes their trees, so it stays."""
    _, model_dir = tiny
    ring = local_ring(model_dir, 3)
    ring.parallel_stages = 1
    head = load_head(model_dir, "fp32")
    result = run(ring, head, make_drafter("lookup", model_dir, head),
                 SessionConfig(strategy=strategy, max_new_tokens=8), prompt_ids(10, head.lm_head.shape[0], seed=4))
    assert result.ring_slots == 4


class _SizeRecorder:
    """Wraps a ring and notes the size of every decode segment the coordinator sends."""

    def __init__(self, ring) -> None:
        self.ring, self.sizes = ring, []

    def send(self, msg, tensors):
        if isinstance(msg, Segment) and msg.masked:
            self.sizes.append(int(tensors[1].shape[0]))
        self.ring.send(msg, tensors)

    def __getattr__(self, name):
        return getattr(self.ring, name)


@pytest.mark.parametrize("ring_slots, parallel, largest", [(None, 1, (17, 32)), (None, None, (1, 16)), (1, None, (1, 16))])
def test_one_segment_in_flight_by_default_is_a_solo_segment(tiny, ring_slots, parallel, largest):
    """With one slot by default (shared cores) every segment holds up to `solo_segment` (32 here) nodes;
    with a full ring, or one slot asked for explicitly, first-round segments hold up to
    `segment_max` (16) and expansions up to `expand_segment_max` (64)."""
    model, model_dir = tiny
    ring = _SizeRecorder(local_ring(model_dir, 3))
    if parallel is not None:
        ring.ring.parallel_stages = parallel
    head = load_head(model_dir, "fp32")
    ids = prompt_ids(12, head.lm_head.shape[0], seed=5)
    spec = SpeculationConfig(ring_slots=ring_slots, solo_segment=32)  # apart from segment_max, to tell them apart
    config = SessionConfig(strategy="flowspec", max_new_tokens=N_NEW, speculation=spec)
    result = run(ring, head, make_drafter("model", model_dir, head), config, ids)
    assert result.token_ids == reference_greedy(model, ids, N_NEW)
    first_round = ring.sizes[0]
    assert largest[0] <= first_round <= largest[1], ring.sizes
    assert max(ring.sizes) <= (32 if parallel == 1 else 64), ring.sizes
