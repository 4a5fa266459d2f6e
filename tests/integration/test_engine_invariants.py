"""Engine invariants of FLOWSPEC §11, checked on instrumented in-process runs (fp32, tiny models).

(a) stage split equivalence and chunked prefill (§11.2); (b) pruning keeps every stage's KV cache
equal to a from-scratch computation (§11.6); (c) the ring: no stale segment is verified, no more
than `slots` segments in flight, emptied slots refilled (§11.7, §10.3); (d) acceptance accounting
(§11.8); (e) incremental draft-head feeding (§11.9); (f) EAGLE-1 head files.

The instrumented runs read the coordinator's bookkeeping (`flights`, `tree`, `sent`, `epoch`,
`prefix_len`) and follow every stage's emitted messages; they are white-box on purpose.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from engine.config import SessionConfig, SpeculationConfig
from engine.coordinator import Coordinator
from engine.draft import DraftError, HeadDrafter, load_eagle_head, make_drafter as engine_make_drafter
from engine.ring_local import LocalRing
from engine.session import even_bounds
from engine.stage import load_head, load_stage
from engine.stage_worker import StageWorker
from engine.wire import Prune, Reset, Segment
from tests.integration.engine_kit import (decisive_model, local_ring, make_drafter, prompt_ids, random_eagle_head,
                                          run, save_model)
from tests.integration.engine_kit import single_thread  # noqa: F401  (fixture)
from tests.tiny_models import make_tiny_model

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("single_thread")]

N_LAYERS = 5
KV_TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """(HF model, directory, Head) of a decisive 5-layer Llama."""
    model = decisive_model("llama", seed=0, n_layers=N_LAYERS)
    directory = save_model(model, tmp_path_factory.mktemp("llama"))
    return model, directory, load_head(directory, "fp32")


# --- (a) stage split equivalence and chunked prefill


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_stage_layouts_compose_to_the_full_model(model_type, tmp_path):
    """Every layout's chained stages give the full model's last hidden state and logits, with the
    prompt fed in chunks (positions and cache carried over) as well as at once."""
    model = make_tiny_model(model_type, seed=2, n_layers=N_LAYERS)
    directory = save_model(model, tmp_path / model_type)
    head = load_head(directory, "fp32")
    ids = torch.tensor(prompt_ids(40, model.config.vocab_size, seed=3))
    with torch.inference_mode():
        out = model(ids[None], output_hidden_states=True)
    want_hidden, want_logits = out.hidden_states[-1][0], out.logits[0]
    for bounds in ([(0, 5)], [(0, 2), (2, 5)], [(0, 1), (1, 3), (3, 5)], [(i, i + 1) for i in range(5)]):
        for chunks in ([40], [13, 27], [1, 20, 19]):
            stages = [load_stage(directory, a, b, "fp32") for a, b in bounds]
            rows, pos = [], 0
            for size in chunks:
                x, positions = ids[pos : pos + size], torch.arange(pos, pos + size)
                for stage in stages:
                    x = stage(x, positions)
                rows.append(x)
                pos += size
            hidden = torch.cat(rows)
            where = f"layout {bounds}, chunks {chunks}"
            torch.testing.assert_close(hidden, want_hidden, atol=1e-5, rtol=1e-4, msg=where)
            torch.testing.assert_close(head.logits(hidden), want_logits, atol=1e-4, rtol=1e-4, msg=where)
            assert [s.cache.length for s in stages] == [40] * len(stages)


def test_chunked_prefill_kv_equals_unchunked(target):
    _, directory, _ = target
    ids = torch.tensor(prompt_ids(70, 320, seed=4))
    whole = [load_stage(directory, a, b, "fp32") for a, b in [(0, 3), (3, 5)]]
    chunked = [load_stage(directory, a, b, "fp32") for a, b in [(0, 3), (3, 5)]]
    x = ids
    for stage in whole:
        x = stage(x, torch.arange(70))
    for a, b in [(0, 64), (64, 70)]:
        x = ids[a:b]
        for stage in chunked:
            x = stage(x, torch.arange(a, b))
    for w, c in zip(whole, chunked):
        torch.testing.assert_close(c.cache.keys[..., :70, :], w.cache.keys[..., :70, :], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(c.cache.values[..., :70, :], w.cache.values[..., :70, :], atol=1e-5, rtol=1e-4)


# --- instrumented runs for (b), (c), (d)


class StageTracker:
    """What one stage must hold, followed independently from the messages it emits.

    `prefix` is the committed length, `n` the number of draft nodes (of its current index space)
    it has computed; segments must arrive contiguously and prunes keep the survivors it computed.
    """

    def __init__(self) -> None:
        self.prefix = self.n = 0

    def observe(self, out: list) -> None:
        for msg, tensors in out:
            if isinstance(msg, Reset):
                self.prefix = self.n = 0
            elif isinstance(msg, Prune):
                keep = np.asarray(msg.keep, dtype=np.int64)
                assert msg.prefix_len == self.prefix, "a prune names another prefix than the stage holds"
                assert np.all(keep[: msg.n_accepted] < self.n), "accepted nodes the stage never computed"
                self.prefix = msg.prefix_len + msg.n_accepted
                self.n = int(np.count_nonzero(keep[msg.n_accepted :] < self.n))
            elif isinstance(msg, Segment) and tensors:
                t = int(tensors[1].shape[0])
                assert msg.prefix_len == self.prefix, "a segment names another prefix than the stage holds"
                if msg.masked:
                    assert msg.start == self.n, f"segment starts at draft {msg.start}, stage holds {self.n}"
                    self.n += t
                else:  # prefill chunk: committed tokens
                    assert self.n == 0
                    self.prefix += t


class ProbeRing(LocalRing):
    """A LocalRing that tracks each stage and remembers the last item handed to the coordinator."""

    def __init__(self, workers) -> None:
        super().__init__(workers)
        self.trackers = [StageTracker() for _ in workers]
        self.last = None
        for worker, tracker in zip(workers, self.trackers):
            worker.handle = self._tracked(worker.handle, tracker)

    @staticmethod
    def _tracked(handle, tracker):
        def wrapped(batch):
            out = handle(batch)
            tracker.observe(out)
            return out

        return wrapped

    def recv(self, timeout_s):
        self.last = super().recv(timeout_s)
        return self.last


@dataclass
class Probe:
    """What an instrumented run saw."""

    steps: int = 0
    kv_checks: int = 0
    stale_returns: int = 0  # segments that came back from before a truncation
    max_in_flight: int = 0
    underfilled_with_waiting: int = 0  # turns with a free slot although waiting nodes existed
    underfilled_could_draft: int = 0  # turns with a free slot although drafting more would add nodes
    waiting_seen: int = 0  # turns that ended with nodes waiting at D0 (a first tree larger than the ring)
    continued: int = 0  # acceptances whose bonus token was an unverified tree node
    chunks: list[list[int]] = field(default_factory=list)


class ProbeCoordinator(Coordinator):
    """Checks the ring and the bookkeeping around every verification and new round."""

    probe: Probe

    def start(self, prompt_ids):
        self.round_epochs: list[int] = []
        super().start(prompt_ids)

    def _new_round(self):
        self.round_epochs.append(self.epoch)
        super()._new_round()

    def _on_segment(self, msg, hidden):
        rows = self._current_rows(msg, hidden.shape[0])
        verifications = self.stats["verifications"]
        flight = next((f for f in self.flights if f.seg_id == msg.seg_id), None)
        assert flight is not None, f"segment {msg.seg_id} was not in flight"
        if self.round_epochs and msg.epoch < self.round_epochs[-1]:
            self.probe.stale_returns += 1
            assert rows.numel() == 0 and flight.start == flight.end, "a segment of an earlier round kept rows"
            super()._on_segment(msg, hidden)
            assert self.stats["verifications"] == verifications, "a stale segment was verified"
            return
        assert rows.numel() == flight.end - flight.start, "returned rows differ from the coordinator's record"
        if rows.numel():  # the rows are exactly the tree nodes D0 expects, at their positions
            positions = self.ring.last[1][1][rows]
            want = torch.from_numpy(self.tree.positions(self.prefix_len, flight.start, flight.end))
            assert torch.equal(positions, want)
        super()._on_segment(msg, hidden)

    def _accept(self):
        super()._accept()
        if not self.done:
            assert self.tree is not None and int(self.tree.tokens[0]) == self.out[-1], "the bonus token is not the root"
            if len(self.round_epochs) and self.round_epochs[-1] != self.epoch:
                self.probe.continued += 1


def _check_after_step(c: ProbeCoordinator, ring: ProbeRing, reference, trees: dict, prefixes: dict) -> None:
    probe = c.probe
    probe.steps += 1
    if c.prefill_left:
        return
    if c.tree is not None:
        trees[c.epoch] = c.tree
        prefixes[c.epoch] = c.prefix_len
    if not c.done and c.tree is not None:
        live = [f for f in c.flights if f.end > f.start]
        probe.max_in_flight = max(probe.max_in_flight, len(live))
        assert len(live) <= c.slots
        # in-flight segments tile [verified, sent) in order; the rest of the tree waits at D0
        assert [f.start for f in live] == [c.verified] + [f.end for f in live[:-1]]
        assert (live[-1].end if live else c.verified) == c.sent <= len(c.tree)
        probe.waiting_seen += c.sent < len(c.tree)
        if len(live) < c.slots:
            if c.sent < len(c.tree):
                probe.underfilled_with_waiting += 1
            elif c.policy.expand or c.policy.by_level:  # would drafting more have given something to send?
                tree = c.tree
                probe.underfilled_could_draft += c._expand(c.spec.expand_budget)
                c.tree = tree
    # (b) every stage: cache = prefix + computed drafts, equal to a from-scratch computation
    known = c.drafter.tokens
    for i, (worker, tracker) in enumerate(zip(ring.workers, ring.trackers)):
        cache = worker.module.cache
        assert cache.length == tracker.prefix + tracker.n, f"stage {i}: cache length"
        if worker.epoch not in prefixes:
            continue  # a prune the coordinator made before this epoch's tree was recorded
        assert tracker.prefix == prefixes[worker.epoch], f"stage {i}: prefix of epoch {worker.epoch}"
        tree = trees[worker.epoch]
        assert tracker.n <= len(tree)
        keys, values = reference(known[: tracker.prefix], tree, tracker.n, worker.epoch)
        end = tracker.prefix + tracker.n
        torch.testing.assert_close(cache.keys[..., :end, :], keys[i][..., :end, :], **KV_TOL, msg=f"stage {i} keys")
        torch.testing.assert_close(cache.values[..., :end, :], values[i][..., :end, :], **KV_TOL,
                                   msg=f"stage {i} values")
        probe.kv_checks += 1


def instrumented_run(directory, head, drafter, config: SessionConfig, n_stages: int, ids: list[int]):
    bounds = even_bounds(N_LAYERS, n_stages)
    ring = ProbeRing([StageWorker(load_stage(directory, a, b, "fp32"), i, n_stages) for i, (a, b) in enumerate(bounds)])
    fresh = [load_stage(directory, a, b, "fp32") for a, b in bounds]
    memo: dict[int, tuple[int, int, list, list]] = {}

    def reference(committed: list[int], tree, n: int, epoch: int):
        """Per-stage K/V of committed tokens run causally, then tree nodes [0, >= n) with the tree mask."""
        hit = memo.get(epoch)
        if hit is not None and hit[0] == len(committed) and hit[1] >= n:
            return hit[2], hit[3]
        n_all = len(tree)
        x, x_tree = torch.tensor(committed), torch.from_numpy(tree.tokens.copy())
        pos_tree = torch.from_numpy(tree.positions(len(committed)).copy())
        mask = torch.from_numpy(tree.mask(0, n_all).copy())
        for stage in fresh:
            stage.reset()
            x = stage(x, torch.arange(len(committed)))
            x_tree = stage(x_tree, pos_tree, len(committed), mask)
        keys = [s.cache.keys.clone() for s in fresh]
        values = [s.cache.values.clone() for s in fresh]
        memo[epoch] = (len(committed), n_all, keys, values)
        return keys, values

    probe = Probe()
    chunks: list[list[int]] = probe.chunks
    c = ProbeCoordinator(ring, head, drafter, config, set(), on_tokens=chunks.append)
    c.probe = probe
    trees: dict = {}
    prefixes: dict = {}
    c.start(ids)
    while c.step():
        _check_after_step(c, ring, reference, trees, prefixes)
    _check_after_step(c, ring, reference, trees, prefixes)
    return c.result(), probe


RUNS = {
    # flowspec, perfect drafter, first tree of 121 nodes > 4 slots * 4: a waiting pool exists; small
    # re-drafts, so free slots are often refilled by drafting again
    "flowspec-perfect": ("model", 3, "long", dict(budget=120, segment_max=4, expand_budget=4), "flowspec"),
    # flowspec, random head, 2-node segments: children split across verified and unverified segments
    "flowspec-head": ("head", 2, "short", dict(budget=40, depth=4, topk=10, segment_max=2), "flowspec"),
    "flowspec-head-noexpand": ("head", 3, "short", dict(budget=80, expand=False), "flowspec"),
    "pipedec-perfect": ("model", 3, "short", dict(pipedec_width=4), "pipedec"),
    "chunk-head": ("head", 2, "long", dict(budget=30), "chunk"),
}
N_NEW = 50


@pytest.fixture(scope="module")
def runs(target):
    model, directory, head = target
    cache = {}

    def get(name):
        if name not in cache:
            drafter_kind, n_stages, prompt, spec, strategy = RUNS[name]
            ids = prompt_ids({"short": 7, "long": 90}[prompt], 320, seed={"short": 8, "long": 93}[prompt])
            config = SessionConfig(strategy=strategy, max_new_tokens=N_NEW, speculation=SpeculationConfig(**spec))
            drafter = make_drafter(drafter_kind, directory, head)
            cache[name] = (ids, *instrumented_run(directory, head, drafter, config, n_stages, ids))
        return cache[name]

    return get


@pytest.mark.parametrize("name", ["flowspec-perfect", "flowspec-head"])
def test_pruning_keeps_stage_caches_consistent(name, runs):
    """§11.6, checked after every coordinator step inside the run; here: the checks really ran."""
    _, result, probe = runs(name)
    assert len(result.token_ids) == N_NEW
    assert probe.kv_checks >= probe.steps  # every stage, nearly every step
    assert probe.continued > 0, "no round continued from an unverified node: pruning of survivors untested"


@pytest.mark.parametrize("name", ["flowspec-perfect", "flowspec-head", "flowspec-head-noexpand", "pipedec-perfect",
                                  "chunk-head"])
def test_ring_invariants(name, runs):
    _, result, probe = runs(name)
    drafter_kind, n_stages, _, spec, strategy = RUNS[name]
    slots = spec.get("ring_slots") or n_stages + 1
    assert 0 < probe.max_in_flight <= slots
    assert probe.underfilled_with_waiting == 0
    if strategy != "chunk" and spec.get("expand", True):
        assert probe.underfilled_could_draft == 0
        assert probe.max_in_flight == slots
    if name in ("flowspec-perfect", "flowspec-head-noexpand"):
        assert probe.waiting_seen > 0  # the case that broke the reference ring (FLOWSPEC §10.1)
    if strategy != "chunk" and result.rounds > 1:
        assert probe.stale_returns > 0, "no segment came back after a truncation: the stale path is untested"


@pytest.mark.parametrize("name", ["flowspec-perfect", "flowspec-head", "pipedec-perfect", "chunk-head"])
def test_acceptance_accounting(name, runs, target):
    """§11.8: the first token plus the accepted lengths are exactly the tokens generated, emitted in
    those chunks, and every one is the target's argmax after the tokens before it."""
    ids, result, probe = runs(name)
    out = result.token_ids
    assert [len(chunk) for chunk in probe.chunks][1:] == result.accepted_lengths[: len(probe.chunks) - 1]
    assert sum(result.accepted_lengths) + 1 == len(out)
    assert [t for chunk in probe.chunks for t in chunk] == out
    assert len(result.accepted_lengths) == result.verifications
    model = target[0]
    with torch.inference_mode():
        argmax = model(torch.tensor([ids + out])).logits[0, len(ids) - 1 : -1].argmax(-1).tolist()
    assert out == argmax


@pytest.mark.parametrize("stop", ["max_new_tokens", "eos"])
def test_acceptance_accounting_when_the_last_acceptance_is_cut(stop, target):
    """A limit or an EOS inside an accepted run: only the emitted tokens count as accepted."""
    _, directory, head = target
    ids = prompt_ids(7, 320, seed=8)
    config = SessionConfig(strategy="flowspec", max_new_tokens=100)
    full = run(local_ring(directory, 3), head, make_drafter("model", directory, head), config, ids)
    out = full.token_ids
    starts = np.cumsum([1] + full.accepted_lengths)[:-1]  # index of each acceptance's first token
    # stop at a token that is new there (so it can serve as EOS) and is not its acceptance's last
    k, cut = next((k, int(a) + j + 1) for k, (a, n) in enumerate(zip(starts, full.accepted_lengths))
                  for j in range(n - 1) if out.index(out[a + j]) == a + j)
    if stop == "max_new_tokens":
        config, eos = replace(config, max_new_tokens=cut), set()
    else:
        eos = {out[cut - 1]}
    result = run(local_ring(directory, 3), head, make_drafter("model", directory, head), config, ids, eos)
    assert result.token_ids == out[:cut] and result.stopped_by == stop
    assert result.accepted_lengths[:k] == full.accepted_lengths[:k]
    assert sum(result.accepted_lengths) + 1 == cut, result.accepted_lengths


# --- (e) draft head state


def test_head_drafter_incremental_feeding_equals_whole_context(target):
    """§11.9: feeding known tokens and features in pieces (drafting in between) leaves the head in the
    same state as feeding them at once; its KV holds exactly the pairs before the root."""
    model, _, head = target
    eagle = random_eagle_head(head.config, seed=5)
    tokens = prompt_ids(30, 320, seed=6)
    with torch.inference_mode():
        features = model.model(torch.tensor([tokens])).last_hidden_state[0]  # post-norm
    whole = HeadDrafter(eagle, head)
    whole.extend(tokens, features[:-1])
    want = whole.draft(topk=4, depth=4, budget=20, order="score")
    assert whole.cache.length == len(tokens) - 1

    pieces = HeadDrafter(eagle, head)
    pieces.extend(tokens[:10], None)  # as the coordinator does: the prompt, then the first token with the
    cut = [10, 11, 15, 16, 23, 30]  # prompt's features, then accepted runs with their features
    for a, b in zip(cut, cut[1:]):
        pieces.extend(tokens[a:b], features[len(pieces.features) : b - 1])
        tree = pieces.draft(topk=4, depth=4, budget=20, order="score")
        assert pieces.cache.length == b - 1
    torch.testing.assert_close(pieces._last, whole._last, atol=1e-5, rtol=1e-4)
    n = whole.cache.length
    torch.testing.assert_close(pieces.cache.keys[..., :n, :], whole.cache.keys[..., :n, :], atol=1e-5, rtol=1e-4)
    assert np.array_equal(tree.tokens, want.tokens) and np.array_equal(tree.parents, want.parents)
    np.testing.assert_allclose(tree.scores, want.scores, atol=1e-4)


# --- (f) EAGLE-1 head files


def _save_eagle1(head, directory):
    """The EAGLE-1 checkpoint layout: fc.*, layers.0.* without input_layernorm, embed_tokens.weight."""
    directory.mkdir()
    state = {k: v.contiguous() for k, v in head.state_dict().items() if not k.startswith("rotary")}
    state["embed_tokens.weight"] = torch.randn(head.config.vocab_size, head.config.hidden_size)
    assert "fc.bias" in state and "layers.0.self_attn.q_proj.weight" in state
    assert not any("input_layernorm" in k for k in state)
    save_file(state, str(directory / "model.safetensors"))
    config = head.config.to_dict()
    config["architectures"] = ["LlamaForCausalLM"]
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_eagle1_layout_head_loads_and_drafts_like_the_in_memory_head(target, tmp_path):
    model, directory, head = target
    eagle = random_eagle_head(head.config, seed=7)
    path = _save_eagle1(eagle, tmp_path / "eagle")
    loaded = load_eagle_head(path, torch.float32)
    tokens = prompt_ids(12, 320, seed=8)
    with torch.inference_mode():
        features = model.model(torch.tensor([tokens])).last_hidden_state[0]
        embeds, pos = head.embed[torch.tensor(tokens[1:])], torch.arange(11)
        torch.testing.assert_close(loaded(embeds, features[:-1], pos, None), eagle(embeds, features[:-1], pos, None))
    trees = []
    for drafter in (HeadDrafter(eagle, head), engine_make_drafter(f"head:{path}", str(directory), head, "fp32")):
        drafter.extend(tokens, features[:-1])
        trees.append(drafter.draft(topk=5, depth=3, budget=15, order="score"))
    assert np.array_equal(trees[0].tokens, trees[1].tokens) and np.array_equal(trees[0].parents, trees[1].parents)


def test_head_drafts_from_its_draft_vocabulary_only(target, tmp_path):
    """draft_vocab.json next to a head limits the tokens it drafts; a vocabulary of every id drafts
    exactly the tree of the whole LM head; a malformed file is refused with what to do."""
    model, directory, head = target
    eagle = random_eagle_head(head.config, seed=9)
    tokens = prompt_ids(16, 320, seed=10)
    with torch.inference_mode():
        features = model.model(torch.tensor([tokens])).last_hidden_state[0]

    def tree_of(drafter):
        drafter.extend(tokens, features[:-1])
        return drafter.draft(topk=5, depth=3, budget=20, order="score")

    whole = tree_of(HeadDrafter(eagle, head))
    same = tree_of(HeadDrafter(eagle, head, torch.arange(320)))
    assert np.array_equal(whole.tokens, same.tokens) and np.array_equal(whole.parents, same.parents)
    np.testing.assert_allclose(whole.scores, same.scores, atol=1e-5)
    assert set(whole.tokens[1:].tolist()) & set(range(1, 320, 2))  # the whole head drafts some odd ids here

    path = _save_eagle1(eagle, tmp_path / "eagle")
    (path / "draft_vocab.json").write_text(json.dumps({"ids": list(range(0, 320, 2))}))
    even = tree_of(engine_make_drafter(f"head:{path}", str(directory), head, "fp32"))
    assert len(even) == 21 and all(t % 2 == 0 for t in even.tokens[1:].tolist())
    first = {int(t): sc for t, sc, par in zip(whole.tokens, whole.scores, whole.parents) if par == 0}
    common = [(first[int(t)], sc) for t, sc, par in zip(even.tokens, even.scores, even.parents) if par == 0 and int(t) in first]
    assert common and all(sub > full for full, sub in common)  # log-probs renormalised over fewer tokens

    for bad in ('{"ids": [4, 2]}', '{"ids": [1, 320]}', "not json", '{"tokens": [1]}'):
        (path / "draft_vocab.json").write_text(bad)
        with pytest.raises(DraftError, match="draft_vocab.json .*delete it to draft from the whole vocabulary"):
            engine_make_drafter(f"head:{path}", str(directory), head, "fp32")


def test_head_of_another_hidden_size_is_refused(target, tmp_path):
    _, directory, head = target
    small = random_eagle_head(make_tiny_model("llama", hidden=32, n_heads=4, n_kv_heads=2, n_layers=1).config)
    path = _save_eagle1(small, tmp_path / "small")
    with pytest.raises(DraftError, match="has hidden size 32 but the target .* has 64"):
        engine_make_drafter(f"head:{path}", str(directory), head, "fp32")
    with pytest.raises(DraftError, match="config.json is missing"):
        load_eagle_head(tmp_path, torch.float32)
