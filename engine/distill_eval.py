"""How good a draft head is on prompts it never saw (`flowspec distill --eval DIR`).

Measured per prompt of a prompt set (default `heldout`), greedy, one in-process stage, the
`chunk` strategy and the default tree (top-k 10, depth 5, 80 draft tokens), exactly as
`flowspec generate --strategy chunk --stages 1` runs:
- *mean accepted length*: tokens committed per verification, the bonus token included, for the
  head and for prompt lookup; "overall" is the mean over all verifications of all prompts;
- *top-1*: teacher-forced on the target's own answers (those of the head run, which equal the
  target's greedy output), how often the head's first choice is the target's next token, with
  true features (step 1) and along the true path reading its own features (steps 2..5).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
import torch

logger = logging.getLogger(__name__)

TOP1_STEPS = 5


def _run(model: str, draft: str, prompts, max_new_tokens: int, say: Callable[[str], None], depth: int = 5):
    from engine.config import SessionConfig, SpeculationConfig
    from engine.session import Engine, EngineSpec

    rows, answers = [], []
    config = SessionConfig(strategy="chunk", max_new_tokens=max_new_tokens, speculation=SpeculationConfig(depth=depth))
    # the head alone: its own acceptance, not what the lookup branch adds to it
    with Engine(EngineSpec(model, n_stages=1, in_process=True, draft=draft, lookup_branch=False)) as engine:
        for prompt in prompts:
            ids = engine.encode(prompt.text_or_messages if prompt.raw else prompt.chat_messages(), raw=prompt.raw)
            result = engine.generate(ids, config)
            rows.append({"category": prompt.category, "new_tokens": len(result.token_ids),
                         "verifications": result.verifications,
                         "mean_accepted_length": round(result.mean_accepted_length, 3),
                         "accepted_lengths": result.accepted_lengths})
            answers.append((ids, result.token_ids))
            say(f"{draft}: {prompt.category:<14} {result.mean_accepted_length:.2f} over {result.verifications} verifications")
        drafter = engine.drafter.name
    return rows, answers, drafter


@torch.inference_mode()
def teacher_forced_top1(model_path: Path, head_dir: Path, answers: list[tuple[list[int], list[int]]]) -> list[float]:
    """Top-1 per unrolled step (1..TOP1_STEPS) over the answer tokens of `answers`."""
    from transformers import AutoModelForCausalLM

    from engine.distill_train import Sequences, evaluate
    from engine.draft import load_eagle_head

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).eval()
    lm_head = model.get_output_embeddings().weight  # [V, hidden]
    embed = model.get_input_embeddings().weight
    ids, feats, argmax, prompt_lengths, starts = [], [], [], [], [0]
    for prompt, answer in answers:
        seq = torch.tensor(list(prompt) + list(answer))
        hidden = model.base_model(input_ids=seq[None]).last_hidden_state[0]  # [T, hidden]
        ids.append(seq)
        feats.append(hidden.to(torch.bfloat16))
        argmax.append((hidden @ lm_head.T).argmax(-1))
        prompt_lengths.append(len(prompt))
        starts.append(starts[-1] + len(seq))
    data = Sequences(torch.cat(ids), torch.cat(feats), torch.cat(argmax), np.asarray(starts), np.asarray(prompt_lengths))
    head = load_eagle_head(head_dir, torch.float32, model_path)
    batches = [data.batch(np.array([i])) for i in range(len(answers))]
    return evaluate(head, lm_head, embed, batches, TOP1_STEPS)


def evaluate_head(model: str, head_dir: Path, prompts: str = "heldout", max_new_tokens: int = 128,
                  progress: Callable[[str], None] | None = None, depth: int = 5) -> dict:
    """Head vs prompt lookup on a prompt set; returns per-prompt rows and overall numbers.

    `depth` is the number of draft levels below the root (the engine's default is 5; the EAGLE
    papers' "depth d" drafts d + 1 levels, so their depth 5 is depth=6 here).
    """
    from engine.models import resolve_model
    from engine.prompts import load_prompts

    say = progress or (lambda text: logger.info("%s", text))
    prompt_set = load_prompts(prompts)
    head_rows, answers, drafter = _run(model, f"head:{Path(head_dir).resolve()}", prompt_set, max_new_tokens, say, depth)
    lookup_rows, _, _ = _run(model, "lookup", prompt_set, max_new_tokens, say, depth)
    top1 = teacher_forced_top1(resolve_model(model).path, Path(head_dir), answers)

    def overall(rows):
        lengths = [n for r in rows for n in r["accepted_lengths"]]
        return round(float(np.mean(lengths)), 3) if lengths else 0.0

    per_prompt = [{"category": h["category"], "new_tokens": h["new_tokens"], "head": h["mean_accepted_length"],
                   "lookup": lk["mean_accepted_length"], "head_verifications": h["verifications"],
                   "lookup_verifications": lk["verifications"]} for h, lk in zip(head_rows, lookup_rows)]
    head_all, lookup_all = overall(head_rows), overall(lookup_rows)
    return {
        "prompts": prompts, "max_new_tokens": max_new_tokens, "strategy": "chunk",
        "tree": f"top-k 10, depth {depth}, 80 drafts",
        "drafter": drafter, "per_prompt": per_prompt,
        "head_mean_accepted_length": head_all, "lookup_mean_accepted_length": lookup_all,
        "head_mean_of_prompt_means": round(float(np.mean([r["head"] for r in per_prompt])), 3),
        "lookup_mean_of_prompt_means": round(float(np.mean([r["lookup"] for r in per_prompt])), 3),
        "ratio_vs_lookup": round(head_all / lookup_all, 3) if lookup_all else None,
        "top1_by_step": [round(v, 3) for v in top1],
    }


def format_report(report: dict) -> str:
    lines = [f"{'#':>2} {'category':<14} {'tokens':>6} {'head':>6} {'lookup':>6}"]
    for i, row in enumerate(report["per_prompt"], 1):
        lines.append(f"{i:>2} {row['category']:<14} {row['new_tokens']:>6} {row['head']:>6.2f} {row['lookup']:>6.2f}")
    lines.append(f"overall (per verification): head {report['head_mean_accepted_length']:.3f}, "
                 f"lookup {report['lookup_mean_accepted_length']:.3f}, ratio {report['ratio_vs_lookup']}")
    lines.append(f"mean of prompt means: head {report['head_mean_of_prompt_means']:.3f}, "
                 f"lookup {report['lookup_mean_of_prompt_means']:.3f}")
    lines.append("head top-1 (teacher-forced, steps 1-5): " + " ".join(f"{v:.3f}" for v in report["top1_by_step"]))
    return "\n".join(lines)
