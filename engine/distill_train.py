"""Training an EAGLE-1 draft head on recorded target features, with multi-step unrolling.

Terms (shared with engine/draft.py and engine/distill.py):
- *sequence*: prompt + answer token ids x_0..x_{T-1}; the answer starts at `prompt_len`.
- *feature* f_t: the target's post-final-norm hidden state at position t (what its LM head reads).
- *pair* t: the head's input (f_t, x_{t+1}) at RoPE position t. Its output f̂_{t+1} should equal
  f_{t+1}, and lm_head(f̂_{t+1}) should rank first the target's own next token after x_{t+1}
  (`argmax[t+1]`, the target's greedy choice there).
- *step* s (0-based, "training-time test"): step 0 reads the true features; step s >= 1 reads at
  pair t the output of step s-1 at pair t-1, i.e. the head's own prediction of f_t, as it does at
  tree depth s + 1 when drafting. Its queries see the keys the drafter would have cached: step
  max(0, s - d) at distance d back.
- *answer pairs*: pairs whose predicted token lies in the answer (t >= prompt_len - 1, and not the
  pair after a final EOS). Only they carry loss.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from engine.draft import EagleHead, _layer_params

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LossConfig:
    reg_weight: float = 1.0  # smooth-L1 on features
    ce_weight: float = 1.0  # hard cross-entropy on the target's argmax, through its LM head
    step_weights: tuple[float, ...] = (1.0, 0.8, 0.6)  # one per unrolled step
    noise: float = 0.05  # uniform noise on the true input features, times each feature's rms
    # CE softmax over "seen" = the tokens the target picks anywhere in the training data plus
    # `negatives` random others per step (about 4x cheaper than the full vocabulary, which
    # dominates the step time), or "full". Evaluation always uses the full vocabulary.
    softmax_vocab: str = "seen"
    negatives: int = 2048


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 7e-4
    warmup_steps: int = 40
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    clip_norm: float = 1.0
    batch_tokens: int = 2048  # padded positions per optimizer step


@dataclass
class Batch:
    ids: torch.Tensor  # [B, T] int64, right-padded
    features: torch.Tensor  # [B, T, hidden] bf16
    argmax: torch.Tensor  # [B, T] int64: target's greedy next token after position t
    loss_mask: torch.Tensor  # [B, T] bool over pairs t (pair t predicts argmax[t + 1])


class _StepKeys:
    """Cache stand-in for unrolled steps: keeps each step's keys/values and returns all of them."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """key/value [B, H, T, D] of the current step -> all steps' [B, H, steps * T, D]."""
        self.keys.append(key)
        self.values.append(value)
        return torch.cat(self.keys, dim=2), torch.cat(self.values, dim=2)


def step_mask(t: int, step: int) -> torch.Tensor:
    """[T, (step + 1) * T] bool: query pair i of `step` sees pair j of step max(0, step - (i - j)), j <= i."""
    distance = torch.arange(t).unsqueeze(1) - torch.arange(t).unsqueeze(0)  # [T, T]: i - j
    source = (step - distance).clamp(min=0)
    blocks = [(distance >= 0) & (source == s) for s in range(step + 1)]
    return torch.cat(blocks, dim=1)


def unrolled_forward(head: EagleHead, embeds: torch.Tensor, features: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """embeds, features: [B, T, hidden] -> one [B, T, hidden] prediction per step (pair t -> f̂_{t+1})."""
    b, t, _ = embeds.shape
    positions = torch.arange(t).unsqueeze(0).expand(b, t)  # [B, T]
    cos_sin = head.rotary(embeds, positions)
    cache = _StepKeys()
    cache_kwarg = "cache" if "cache" in _layer_params() else "past_key_values"
    outputs: list[torch.Tensor] = []
    inputs = features
    for s in range(steps):
        if s:  # pair t reads the previous step's prediction of f_t (made at pair t - 1)
            inputs = torch.cat((features[:, :1], outputs[-1][:, :-1]), dim=1)
        hidden = head.fc(torch.cat((embeds, inputs), dim=-1))  # [B, T, hidden]
        mask = step_mask(t, s)[None, None]  # [1, 1, T, (s + 1) T]
        out = head.layers[0](hidden, position_embeddings=cos_sin, attention_mask=mask, **{cache_kwarg: cache})
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def softmax_vocab(vocab_size: int, seen: torch.Tensor | None, negatives: int,
                  generator: torch.Generator | None) -> torch.Tensor | None:
    """Sorted token ids the CE softmax runs over this step: `seen` plus random others; None = all."""
    if seen is None:
        return None
    others = torch.randint(0, vocab_size, (negatives,), generator=generator)
    return torch.unique(torch.cat((seen, others)))


def batch_loss(head: EagleHead, lm_head: torch.Tensor, embed: torch.Tensor, batch: Batch, loss: LossConfig,
               generator: torch.Generator | None,
               seen: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, list[float]]]:
    """Weighted sum over steps of reg + CE on answer pairs; returns (loss, per-step stats).

    With `seen` (token ids, including every target), the CE softmax covers softmax_vocab(...) only.
    """
    features = batch.features.float()  # [B, T, hidden]
    inputs = features
    if loss.noise > 0 and generator is not None:
        rms = features.pow(2).mean(-1, keepdim=True).sqrt()  # [B, T, 1]
        noise = torch.rand(features.shape, generator=generator) * 2 - 1
        inputs = features + noise * loss.noise * rms
    next_ids = torch.cat((batch.ids[:, 1:], batch.ids[:, -1:]), dim=1)  # x_{t+1} at pair t
    embeds = embed[next_ids].float()  # [B, T, hidden]
    target_f = torch.cat((features[:, 1:], features[:, -1:]), dim=1)  # f_{t+1}
    target_tok = torch.cat((batch.argmax[:, 1:], batch.argmax[:, -1:]), dim=1)  # argmax[t + 1]
    vocab = softmax_vocab(lm_head.shape[0], seen, loss.negatives, generator)  # [C] or None
    if vocab is not None:
        where = torch.full((lm_head.shape[0],), -1, dtype=torch.long)
        where[vocab] = torch.arange(len(vocab))
        lm_head, target_tok = lm_head[vocab], where[target_tok]  # [C, hidden], [B, T]
    outputs = unrolled_forward(head, embeds, inputs, len(loss.step_weights))
    total = torch.zeros(())
    stats: dict[str, list[float]] = {"reg": [], "ce": [], "top1": []}
    pair = torch.arange(batch.ids.shape[1]).unsqueeze(0)  # [1, T]
    for s, (weight, out) in enumerate(zip(loss.step_weights, outputs)):
        valid = batch.loss_mask & (pair >= s)  # [B, T]
        pred = out[valid].float()  # [n, hidden]
        reg = F.smooth_l1_loss(pred, target_f[valid])
        logits = pred @ lm_head.T  # [n, V or C]
        ce = F.cross_entropy(logits, target_tok[valid])
        total = total + weight * (loss.reg_weight * reg + loss.ce_weight * ce)
        stats["reg"].append(reg.item())
        stats["ce"].append(ce.item())
        stats["top1"].append(float((logits.argmax(-1) == target_tok[valid]).float().mean()))
    return total, stats


@torch.no_grad()
@torch.autocast("cpu", dtype=torch.bfloat16)
def evaluate(head: EagleHead, lm_head: torch.Tensor, embed: torch.Tensor, batches: list[Batch], steps: int) -> list[float]:
    """Top-1 agreement with the target's argmax per unrolled step, over the answer pairs of `batches`."""
    hits, counts = np.zeros(steps), np.zeros(steps)
    for batch in batches:
        next_ids = torch.cat((batch.ids[:, 1:], batch.ids[:, -1:]), dim=1)
        target_tok = torch.cat((batch.argmax[:, 1:], batch.argmax[:, -1:]), dim=1)
        outputs = unrolled_forward(head, embed[next_ids].float(), batch.features.float(), steps)
        pair = torch.arange(batch.ids.shape[1]).unsqueeze(0)
        for s, out in enumerate(outputs):
            valid = batch.loss_mask & (pair >= s)
            pred = (out[valid].float() @ lm_head.T).argmax(-1)
            hits[s] += float((pred == target_tok[valid]).sum())
            counts[s] += float(valid.sum())
    return [float(h / max(c, 1)) for h, c in zip(hits, counts)]


def lr_at(step: int, total: int, optim: OptimConfig) -> float:
    """Linear warmup, then cosine decay to min_lr_ratio * lr at `total` steps."""
    if step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    progress = min(1.0, (step - optim.warmup_steps) / max(1, total - optim.warmup_steps))
    return optim.lr * (optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def epoch_batches(lengths: np.ndarray, batch_tokens: int, seed: int, epoch: int) -> list[np.ndarray]:
    """Sequence indices per batch for one epoch: shuffled, then grouped by length to limit padding.

    Deterministic in (seed, epoch). Each batch holds at most batch_tokens padded positions (at
    least one sequence).
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    batches: list[np.ndarray] = []
    window = 64  # sort within windows of sequences: similar lengths together, order still random
    for w in range(0, len(order), window):
        chunk = order[w : w + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        current: list[int] = []
        for i in chunk:
            longest = max([lengths[j] for j in current] + [lengths[i]])
            if current and longest * (len(current) + 1) > batch_tokens:
                batches.append(np.asarray(current))
                current = []
            current.append(int(i))
        if current:
            batches.append(np.asarray(current))
    return [batches[i] for i in rng.permutation(len(batches))]


def make_optimizer(head: EagleHead, optim: OptimConfig) -> torch.optim.Optimizer:
    decay = [p for n, p in head.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in head.named_parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas)


def train_step(head: EagleHead, optimizer: torch.optim.Optimizer, lm_head: torch.Tensor, embed: torch.Tensor,
               batch: Batch, step: int, total: int, loss: LossConfig, optim: OptimConfig,
               generator: torch.Generator, seen: torch.Tensor | None = None) -> dict[str, list[float]]:
    """One optimizer step (bf16 autocast for the matrix products, fp32 master weights)."""
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, total, optim)
    optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value, stats = batch_loss(head, lm_head, embed, batch, loss, generator, seen)
    value.backward()
    torch.nn.utils.clip_grad_norm_(head.parameters(), optim.clip_norm)
    optimizer.step()
    stats["loss"] = [value.item()]
    return stats


# --- data


@dataclass
class Sequences:
    """Recorded sequences, concatenated: token ids, features and the target's argmax per position."""

    ids: torch.Tensor  # [N] int64
    features: torch.Tensor  # [N, hidden] bf16
    argmax: torch.Tensor  # [N] int64
    starts: np.ndarray  # [n + 1] offsets of each sequence
    prompt_lengths: np.ndarray  # [n]

    @property
    def n_sequences(self) -> int:
        return len(self.prompt_lengths)

    @property
    def n_tokens(self) -> int:
        return int(self.starts[-1])

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.starts)

    def batch(self, indices: np.ndarray) -> Batch:
        """Right-padded batch; the loss covers pairs prompt_len - 1 .. T - 3 (the predicted token is
        an answer token, never the one after the last)."""
        lengths = self.lengths[indices]
        b, t = len(indices), int(lengths.max())
        ids = torch.zeros(b, t, dtype=torch.long)
        features = torch.zeros(b, t, self.features.shape[1], dtype=self.features.dtype)
        argmax = torch.zeros(b, t, dtype=torch.long)
        loss_mask = torch.zeros(b, t, dtype=torch.bool)
        for row, i in enumerate(indices):
            a, e = int(self.starts[i]), int(self.starts[i + 1])
            ids[row, : e - a] = self.ids[a:e]
            features[row, : e - a] = self.features[a:e]
            argmax[row, : e - a] = self.argmax[a:e]
            loss_mask[row, max(0, int(self.prompt_lengths[i]) - 1) : max(0, e - a - 2)] = True
        return Batch(ids, features, argmax, loss_mask)


def load_sequences(feat_dir: Path, val_every: int) -> tuple[Sequences, Sequences]:
    """All feature shards in name order; every val_every-th sequence goes to the validation set."""
    parts: dict[str, list] = {"train": [], "val": []}
    number = 0
    for shard in sorted(Path(feat_dir).glob("*.safetensors")):
        data = load_file(shard)
        starts = np.concatenate(([0], np.cumsum(data["lengths"].numpy())))
        for j in range(len(data["lengths"])):
            a, e = int(starts[j]), int(starts[j + 1])
            split = "val" if val_every > 0 and number % val_every == val_every - 1 else "train"
            parts[split].append((data["ids"][a:e], data["features"][a:e], data["argmax"][a:e],
                                 int(data["prompt_lengths"][j])))
            number += 1
    return _concat(parts["train"]), _concat(parts["val"])


def _concat(rows: list) -> Sequences:
    if not rows:
        return Sequences(torch.zeros(0, dtype=torch.long), torch.zeros(0, 1, dtype=torch.bfloat16),
                         torch.zeros(0, dtype=torch.long), np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64))
    lengths = [len(r[0]) for r in rows]
    return Sequences(torch.cat([r[0] for r in rows]).long(), torch.cat([r[1] for r in rows]),
                     torch.cat([r[2] for r in rows]).long(), np.concatenate(([0], np.cumsum(lengths))),
                     np.asarray([r[3] for r in rows], dtype=np.int64))


# --- the training run


@dataclass(frozen=True)
class TrainPlan:
    epochs: int
    seed: int
    loss: LossConfig
    optim: OptimConfig
    reserve_s: float = 30.0  # time kept for validation and saving when there is a budget
    probe_steps: int = 5  # with a budget, the step count is planned after timing this many steps, then re-planned
    checkpoint_every_s: float = 120.0
    show_bars: bool = True


def new_head(target_config, seed: int) -> EagleHead:
    from transformers import LlamaConfig

    from engine.heads import head_config_dict

    raw = head_config_dict(target_config)
    torch.manual_seed(seed)
    return EagleHead(LlamaConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "bias")}))


class _Schedule:
    """Which batch each step trains on: epochs of epoch_batches, concatenated."""

    def __init__(self, lengths: np.ndarray, plan: TrainPlan) -> None:
        self.lengths, self.plan = lengths, plan
        self.epochs: dict[int, list[np.ndarray]] = {}

    def epoch(self, e: int) -> list[np.ndarray]:
        if e not in self.epochs:
            self.epochs[e] = epoch_batches(self.lengths, self.plan.optim.batch_tokens, self.plan.seed, e)
        return self.epochs[e]

    def total(self) -> int:
        return sum(len(self.epoch(e)) for e in range(self.plan.epochs))

    def at(self, step: int) -> np.ndarray:
        e = 0
        while step >= len(self.epoch(e)):
            step -= len(self.epoch(e))
            e += 1
        return self.epoch(e)[step]


def train_head(target_path: Path, train: Sequences, val: Sequences, plan: TrainPlan, checkpoint: Path,
               time_left: Callable[[], float], on_checkpoint: Callable[[], None],
               say: Callable[[str], None]) -> tuple[EagleHead, dict]:
    """Train (or resume from `checkpoint`) and return the head and its stats."""
    from engine.stage import load_head, model_config

    target = load_head(target_path, "bf16")
    lm_head, embed = target.lm_head.data, target.embed.data  # [V, hidden] frozen
    head = new_head(model_config(target_path), plan.seed).train()
    optimizer = make_optimizer(head, plan.optim)
    generator = torch.Generator().manual_seed(plan.seed)
    schedule = _Schedule(train.lengths, plan)
    max_steps = schedule.total()
    seen = torch.unique(train.argmax) if plan.loss.softmax_vocab == "seen" else None
    step, total, history = 0, None, []
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        head.load_state_dict(saved["head"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        step, total, history = saved["step"], saved["total"], saved["history"]
        say(f"resuming training at step {step} of {total or max_steps}")
    budgeted = not math.isinf(time_left())
    if not budgeted:
        total = total or max_steps
    bar = tqdm(total=total or max_steps, initial=step, desc="train", unit="step", file=sys.stderr,
               disable=not plan.show_bars, dynamic_ncols=True)
    last_save, timed_from, timed_steps = time.monotonic(), None, 0
    while step < (total or max_steps):
        if budgeted and total is not None and time_left() < plan.reserve_s:
            logger.warning("training stopped at step %d of %d: the time budget is used", step, total)
            break
        stats = train_step(head, optimizer, lm_head, embed, train.batch(schedule.at(step)), step,
                           total or max_steps, plan.loss, plan.optim, generator, seen)
        history.append({k: [round(v, 4) for v in vals] for k, vals in stats.items()})
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss'][0]:.3f}", top1="/".join(f"{v:.2f}" for v in stats["top1"]))
        checkpoint_due = time.monotonic() - last_save > plan.checkpoint_every_s or step == total
        if budgeted:  # timed from the end of this process's first step, which pays the warm-up
            timed_steps += timed_from is not None
            timed_from = timed_from or time.monotonic()
            if timed_steps >= plan.probe_steps and (total is None or checkpoint_due):
                per_step = (time.monotonic() - timed_from) / timed_steps
                first_plan = total is None
                total = int(min(max_steps, max(step + 1, step + (time_left() - plan.reserve_s) / per_step)))
                bar.total = total
                if first_plan:
                    say(f"{per_step:.2f} s per step: about {total} steps "
                        f"({total / max(1, len(schedule.epoch(0))):.2f} epochs), re-planned at each checkpoint")
        if checkpoint_due:
            _save_checkpoint(checkpoint, head, optimizer, generator, step, total, history)
            on_checkpoint()
            last_save = time.monotonic()
    bar.close()
    return head.eval(), _final_stats(head, lm_head, embed, train, val, plan, history, step, total, schedule)


def _final_stats(head, lm_head, embed, train: Sequences, val: Sequences, plan: TrainPlan, history: list,
                 step: int, total: int | None, schedule: _Schedule) -> dict:
    """Steps, epochs, token counts, loss settings, and top-1 per unrolled step (train: last 20 steps)."""
    n_steps = len(plan.loss.step_weights)
    val_batches = [val.batch(b) for b in epoch_batches(val.lengths, plan.optim.batch_tokens, plan.seed, 10**6)]
    val_top1 = evaluate(head, lm_head, embed, val_batches, n_steps) if val.n_sequences else []
    recent = history[-20:]
    window = max(1, min(5, len(history) // 4))  # mean loss of the first and the last few steps
    return {
        "steps": step, "planned_steps": total, "epochs": round(step / max(1, len(schedule.epoch(0))), 2),
        "train_tokens": train.n_tokens, "val_tokens": val.n_tokens,
        "train_top1": [round(float(np.mean([h["top1"][s] for h in recent])), 3) for s in range(n_steps)] if recent else [],
        "val_top1": [round(v, 3) for v in val_top1],
        "loss_start": round(float(np.mean([h["loss"][0] for h in history[:window]])), 4) if history else None,
        "loss_end": round(float(np.mean([h["loss"][0] for h in history[-window:]])), 4) if history else None,
        "loss": _loss_dict(plan.loss),
    }


def _loss_dict(loss: LossConfig) -> dict:
    return {"reg_weight": loss.reg_weight, "ce_weight": loss.ce_weight, "step_weights": list(loss.step_weights),
            "noise": loss.noise, "ce_target": "target argmax (hard)", "softmax_vocab": loss.softmax_vocab,
            "negatives": loss.negatives}


def _save_checkpoint(path: Path, head, optimizer, generator, step: int, total: int | None, history: list) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({"head": head.state_dict(), "optimizer": optimizer.state_dict(), "generator": generator.get_state(),
                "step": step, "total": total, "history": history}, tmp)
    tmp.replace(path)
