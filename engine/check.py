"""`flowspec check`: every strategy's greedy output against Hugging Face `generate`, token for token (fp32).

Where an output diverges, the report gives the first divergent position and the target's top-2
logit margin there: a margin near zero is a numerical near-tie, a large one is a bug.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

from engine.prompts import load_prompts


def top2_margin(model, ids: list[int]) -> tuple[float, int, int]:
    """(logit gap, best token, second token) of the full model's next-token logits after `ids`."""
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0, -1].float()
    top = torch.topk(logits, 2)
    return float(top.values[0] - top.values[1]), int(top.indices[0]), int(top.indices[1])


def reference_generate(model, ids: list[int], max_new_tokens: int, eos_ids: set[int]) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=sorted(eos_ids) or None,
                             pad_token_id=next(iter(eos_ids), 0))
    return out[0, len(ids):].tolist()


def run_check(args, spec, strategies: list[str]) -> int:
    from transformers import AutoModelForCausalLM

    from engine.cli import session_config
    from engine.session import Engine

    prompts = load_prompts(args.prompts)
    spec = replace(spec, dtype="fp32")
    failures = 0
    with Engine(spec, on_progress=lambda m: print(m, file=sys.stderr)) as engine:
        model = AutoModelForCausalLM.from_pretrained(engine.resolved.path, dtype=torch.float32).eval()
        for i, prompt in enumerate(prompts):
            content = prompt.text_or_messages if not prompt.is_chat else prompt.chat_messages()
            ids = engine.encode(content, raw=prompt.raw)
            engine.check_fits(ids, args.max_new_tokens)
            ref = reference_generate(model, ids, args.max_new_tokens, engine.eos_ids)
            for strategy in strategies:
                got = engine.generate(ids, session_config(args, strategy)).token_ids
                if got == ref:
                    print(f"ok    prompt {i + 1} [{prompt.category}] {strategy}: {len(got)} tokens identical")
                    continue
                failures += 1
                pos = next((j for j, (a, b) in enumerate(zip(got, ref)) if a != b), min(len(got), len(ref)))
                gap, best, second = top2_margin(model, ids + ref[:pos])
                print(f"FAIL  prompt {i + 1} [{prompt.category}] {strategy}: first difference at new token {pos} "
                      f"(engine {got[pos] if pos < len(got) else 'end'}, reference {ref[pos] if pos < len(ref) else 'end'}); "
                      f"target top-2 margin there {gap:.4f} ({best} vs {second})"
                      + (": a numerical near-tie" if gap < 1e-3 else ""))
    total = len(prompts) * len(strategies)
    print(f"{total - failures}/{total} identical", file=sys.stderr)
    return 0 if failures == 0 else 1
