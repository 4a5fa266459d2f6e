"""Shared pieces of the engine's integration tests: decisive tiny models, in-process rings, drafters.

Random tiny models give near-uniform logits (greedy then rides on 1e-3 margins and never repeats
itself), so `decisive_model` scales the LM head: greedy becomes clear-cut and falls into loops
that prompt lookup and draft models can predict. Everything runs in fp32.

- *perfect drafter*: a `ModelDrafter` on the target's own directory; every draft it ranks first
  is the target's argmax, so it exercises long acceptances and continuing rounds.
- *random head*: an `EagleHead` built in code with random weights; it drafts branching trees the
  target mostly rejects.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from engine.config import STRATEGIES, SessionConfig, SpeculationConfig
from engine.coordinator import Coordinator, Result
from engine.draft import Drafter, EagleHead, HeadDrafter, LookupBranch, LookupDrafter, ModelDrafter
from engine.ring_local import LocalRing
from engine.session import even_bounds
from engine.stage import Head, load_head, load_stage
from engine.stage_worker import StageWorker
from tests.tiny_models import make_tiny_model

DRAFTERS = ("lookup", "model", "head")

# The strategies, plus "flowspec-full": flowspec with stages + 1 segments in flight (a device per
# stage). Stage processes on few cores, or agents on one host, get one slot by default, so this case
# keeps segments racing prunes through real sockets under test on any machine.
RING_CASES = (*STRATEGIES, "flowspec-full")


def case_config(case: str, n_stages: int, max_new_tokens: int) -> SessionConfig:
    """The SessionConfig of a RING_CASES entry."""
    strategy, _, full = case.partition("-")
    spec = SpeculationConfig(ring_slots=n_stages + 1 if full else None)
    return SessionConfig(strategy=strategy, max_new_tokens=max_new_tokens, speculation=spec)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: these models are tiny, and the test machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def decisive_model(model_type: str = "llama", *, scale: float = 12.0, seed: int = 0, **config_kwargs):
    """A seeded tiny model whose LM head is multiplied by `scale` (float32, eval)."""
    model = make_tiny_model(model_type, seed=seed, **config_kwargs)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    return model


def save_model(model, directory: Path) -> Path:
    """Weights and config only: the coordinator-level tests need no tokenizer."""
    model.save_pretrained(directory)
    return directory


def local_ring(model_dir: Path, n_stages: int | None = None, bounds=None) -> LocalRing:
    if bounds is None:
        n_layers = load_head(model_dir, "fp32").config.num_hidden_layers
        bounds = even_bounds(n_layers, n_stages)
    workers = [StageWorker(load_stage(model_dir, a, b, "fp32"), i, len(bounds)) for i, (a, b) in enumerate(bounds)]
    return LocalRing(workers)


def random_eagle_head(target_config, seed: int = 1, std: float = 0.2) -> EagleHead:
    """An EAGLE-1 head sized for the target, with every weight drawn from N(0, std)."""
    config = LlamaConfig(
        vocab_size=target_config.vocab_size,
        hidden_size=target_config.hidden_size,
        intermediate_size=target_config.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=target_config.num_attention_heads,
        num_key_value_heads=target_config.num_key_value_heads,
        max_position_embeddings=target_config.max_position_embeddings,
        rms_norm_eps=target_config.rms_norm_eps,
    )
    torch.manual_seed(seed)
    head = EagleHead(config)
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.normal_(0.0, std)
    return head.eval()


def make_drafter(kind: str, model_dir: Path, head: Head, eagle: EagleHead | None = None) -> Drafter:
    """lookup, model or head (a random EAGLE head unless given); "+lookup" adds the lookup branch."""
    if kind.endswith("+lookup"):
        return LookupBranch(make_drafter(kind.removesuffix("+lookup"), model_dir, head, eagle))
    if kind == "lookup":
        return LookupDrafter()
    if kind == "model":
        return ModelDrafter(str(model_dir), "fp32", head.lm_head.shape[0])
    if kind == "head":
        return HeadDrafter(eagle if eagle is not None else random_eagle_head(head.config), head)
    raise ValueError(kind)


def prompt_ids(length: int, vocab: int, seed: int) -> list[int]:
    """Random ids that avoid id 0 (the tiny models' EOS)."""
    return torch.randint(1, vocab, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    """Hugging Face greedy generate of exactly n new tokens (EOS suppressed by min_new_tokens)."""
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def run(ring: LocalRing, head: Head, drafter: Drafter, config: SessionConfig, ids: list[int],
        eos_ids: set[int] | None = None, coordinator_class: type[Coordinator] = Coordinator) -> Result:
    return coordinator_class(ring, head, drafter, config, eos_ids or set()).generate(ids)


def first_difference(got: list[int], want: list[int]) -> str:
    pos = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return f"first difference at new token {pos} of {len(got)} (engine) / {len(want)} (reference)"
