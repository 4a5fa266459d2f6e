"""Draft-head distillation, fast parts: instructions, unrolled training forward, batching, head metadata."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import LlamaConfig

from engine.distill_data import (HeldoutOverlap, Instruction, check_disjoint, derive_instructions, heldout_texts,
                                 make_instructions)
from engine.distill_train import Sequences, epoch_batches, lr_at, OptimConfig, step_mask, unrolled_forward
from engine.draft import EagleHead
from engine.stage import KVCache, attention_mask


def _head(seed: int = 0) -> EagleHead:
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=1, vocab_size=320)
    torch.manual_seed(seed)
    return EagleHead(config).eval()


# --- instructions


def test_instructions_are_many_distinct_and_deterministic():
    first = make_instructions(0)
    assert len(first) > 5000
    assert len({json.dumps(i.messages) for i in first}) == len(first)
    assert make_instructions(0, 300) == first[:300]
    assert make_instructions(1, 300) != first[:300]
    assert {"general", "code", "math", "instructions", "qa", "writing"} <= {i.category for i in first[:300]}
    for ins in first[:300]:
        assert ins.messages[-1]["role"] == "user"


def test_instructions_never_contain_heldout_text():
    check_disjoint(make_instructions(0))  # make_instructions asserts this itself too
    held = heldout_texts()
    assert len(held) >= 12
    sneaky = Instruction(({"role": "user", "content": "Please answer: " + held[2]},), "qa")
    with pytest.raises(HeldoutOverlap):
        check_disjoint([sneaky])
    words = held[8].split()  # an 8-word run inside longer text is caught as well
    with pytest.raises(HeldoutOverlap):
        check_disjoint([Instruction(({"role": "user", "content": "x " + " ".join(words[3:12]) + " y"},), "qa")])


def test_derived_instructions_build_on_answers_and_skip_heldout_text():
    base = make_instructions(0, 6)
    answer = " ".join(["word"] * 50)
    derived = derive_instructions([(ins, answer) for ins in base], seed=0, n=6)
    assert {d.category for d in derived} == {"summarisation", "rewriting", "chat"}
    chat = next(d for d in derived if d.category == "chat")
    assert [m["role"] for m in chat.messages][-3:] == ["user", "assistant", "user"]
    leaky = heldout_texts()[8] + " " + answer
    assert derive_instructions([(base[0], leaky)], seed=0, n=1) == []
    assert derive_instructions([(base[0], "too short")], seed=0, n=1) == []


# --- training forward


def test_step_mask_reads_the_drafter_cache_layout():
    assert torch.equal(step_mask(3, 0), torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    # step 1: pair i sees step-0 keys before i and its own step-1 key
    mask = step_mask(3, 1)
    assert torch.equal(mask[:, :3], torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0]], dtype=torch.bool))
    assert torch.equal(mask[:, 3:], torch.eye(3, dtype=torch.bool))
    mask = step_mask(4, 2)  # [4, 12]; pair 3 sees step 0 at 0..1, step 1 at 2, step 2 at 3
    assert mask[3].nonzero().flatten().tolist() == [0, 1, 4 + 2, 8 + 3]


def test_unrolled_steps_equal_the_drafting_chain():
    """Step s at pair t = the drafter's chain: true pairs 0..t-s cached, then s pairs on its own features."""
    head = _head()
    t_len = 6
    embeds, feats = torch.randn(1, t_len, 64), torch.randn(1, t_len, 64)
    with torch.no_grad():
        outs = unrolled_forward(head, embeds, feats, 3)
        causal = head(embeds[0], feats[0], torch.arange(t_len), None, attention_mask(t_len, 0, None, None))
        torch.testing.assert_close(outs[0][0], causal, atol=1e-5, rtol=1e-4)
        for s in (1, 2):
            for t in range(s, t_len):
                cache = KVCache([0], 2, 16, torch.float32)
                n = t - s + 1
                out = head(embeds[0, :n], feats[0, :n], torch.arange(n), cache, attention_mask(n, 0, None, None))
                feature = out[-1]
                for pos in range(n, t + 1):
                    mask = attention_mask(1, cache.length, None, None)
                    feature = head(embeds[0, pos : pos + 1], feature[None], torch.tensor([pos]), cache, mask)[0]
                torch.testing.assert_close(outs[s][0, t], feature, atol=1e-5, rtol=1e-4)


# --- batching and schedule


def test_epoch_batches_cover_every_sequence_once_within_the_token_budget():
    lengths = np.random.default_rng(0).integers(5, 300, size=200)
    batches = epoch_batches(lengths, 1024, seed=3, epoch=1)
    assert sorted(np.concatenate(batches).tolist()) == list(range(200))
    assert all(len(b) == 1 or lengths[b].max() * len(b) <= 1024 for b in batches)
    again = epoch_batches(lengths, 1024, seed=3, epoch=1)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    assert not all(np.array_equal(a, b) for a, b in zip(batches, epoch_batches(lengths, 1024, seed=3, epoch=2)))


def test_lr_warms_up_then_decays():
    optim = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, 100, optim) == pytest.approx(1e-4)
    assert lr_at(9, 100, optim) == pytest.approx(1e-3)
    assert lr_at(100, 100, optim) == pytest.approx(1e-4)
    assert lr_at(50, 100, optim) < lr_at(20, 100, optim)


def test_loss_covers_answer_pairs_only():
    lengths, prompts = [6, 4], [3, 2]
    starts = np.concatenate(([0], np.cumsum(lengths)))
    data = Sequences(torch.arange(10), torch.zeros(10, 8, dtype=torch.bfloat16), torch.arange(10), starts,
                     np.asarray(prompts))
    batch = data.batch(np.array([0, 1]))
    # sequence 0: pairs 2..3 predict tokens 4..5 (answer), pair 4 would predict past the end
    assert batch.loss_mask.tolist() == [[False, False, True, True, False, False],
                                        [False, True, False, False, False, False]]
    assert batch.ids[1].tolist() == [6, 7, 8, 9, 0, 0]


# --- draft vocabulary


def _write_gen_shard(path, rows: list[tuple[list[int], list[int]]]) -> None:
    """A generation shard of (prompt, answer) rows, as the generate phase writes them."""
    from safetensors.torch import save_file

    ids = [t for prompt, answer in rows for t in prompt + answer]
    save_file({"ids": torch.tensor(ids, dtype=torch.int32),
               "lengths": torch.tensor([len(p) + len(a) for p, a in rows], dtype=torch.int32),
               "prompt_lengths": torch.tensor([len(p) for p, _ in rows], dtype=torch.int32)}, str(path))


def test_draft_vocabulary_keeps_the_fewest_answer_tokens_that_cover_the_answers(tmp_path):
    from engine.distill import draft_vocabulary

    # answers: token 140 x 600, ids 0..98 x 4 each, token 5 once more; prompts use ids 150..199 only
    answers = [140] * 600 + [i for i in range(99) for _ in range(4)] + [5]
    _write_gen_shard(tmp_path / "a-00000.safetensors", [(list(range(150, 200)), answers[:500])])
    _write_gen_shard(tmp_path / "b-00000.safetensors", [([151, 152], answers[500:])])
    got = draft_vocabulary(tmp_path, 320, coverage=0.999)
    assert got["answer_tokens"] == len(answers) == 997
    # 100 distinct answer tokens, rounded up to 128 ids: the rest are the lowest unused ids, never prompt-only ones
    assert got["ids"] == list(range(127)) + [140]
    assert got["coverage"] == 1.0
    low = draft_vocabulary(tmp_path, 320, coverage=0.6)  # token 140 alone covers 60.2%
    assert 140 in low["ids"] and 5 in low["ids"] and len(low["ids"]) == 64 and low["coverage"] < 1.0
    assert draft_vocabulary(tmp_path, 250) is None  # 128 of 250 ids: more than half, too little to gain
    assert draft_vocabulary(tmp_path / "missing", 320) is None


def test_top_logprobs_breaks_ties_at_the_boundary_towards_lower_ids():
    from engine.draft import top_logprobs

    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0, 1.0, 1.0, 2.0],  # tie 1.0 x3 at the boundary of k=4
                           [5.0, 4.0, 4.0, 0.0, 4.0, 4.0, 1.0],  # tie 4.0 x4 inside and across the boundary
                           [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]])
    ids, lps = top_logprobs(logits, 4)
    assert ids.tolist() == [[1, 3, 6, 2], [0, 1, 2, 4], [6, 5, 4, 3]]
    want = torch.log_softmax(logits, -1).gather(1, torch.from_numpy(ids)).numpy()
    np.testing.assert_allclose(lps, want, rtol=1e-6)
    assert top_logprobs(logits[:, :3], 5)[0].tolist() == [[1, 2, 0], [0, 1, 2], [2, 1, 0]]  # k past the vocabulary
