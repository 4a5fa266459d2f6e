"""`flowspec distill`: train an EAGLE-1 draft head for any target on the target's own answers.

Phases, each resumable (progress in `<work>/state.json`, `<work>` = `<out>/work` by default):
1. *generate*: the target answers `make_instructions(seed)` (engine/distill_data.py) with HF
   `generate` (bf16, left padding, batches of `batch_size`; greedy, every `sample_every`-th batch
   sampled at a low temperature), then derived instructions built on those answers. One shard per batch:
   `<work>/gen/{a,b}-NNNNN.safetensors` (token ids, prompt lengths).
2. *features*: a teacher-forced pass over prompt + answer records the post-norm last hidden states
   (bf16) and the target's argmax at every position: `<work>/feat/<same name>`.
3. *train*: engine/distill_train.py; checkpoints in `<work>/checkpoint.pt`.
4. *save*: `<out>/model.safetensors` (head weights only, EAGLE-1 keys `fc.*`, `layers.0.*`, bf16)
   and `<out>/config.json` (the head's LlamaConfig plus a `flowspec` object: the target and its
   fingerprint (engine/heads.py), and training stats). `<out>/draft_vocab.json`: the fewest token
   ids that make up 99.9% of the generated answers, which the head drafts from (skipped when that
   would keep more than half the vocabulary). `<work>` is removed unless `keep_work`.

Determinism: python, numpy and torch are seeded; with no time budget (`minutes=None`) two runs
with one seed give identical weights, and an interrupted run resumed from its checkpoint
continues exactly as the uninterrupted one would. With `minutes`, generation stops at its share
of the budget and the number of training steps is planned from the measured step time (and
re-planned at each checkpoint), so the result depends on the machine's speed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from engine.distill_data import Instruction, derive_instructions, make_instructions
from engine.distill_train import LossConfig, OptimConfig, TrainPlan, load_sequences, train_head

logger = logging.getLogger(__name__)

STATE_VERSION = 1
Progress = Callable[[str], None]


class DistillError(ValueError):
    """A distillation cannot start or resume; the message says what to do."""


@dataclass(frozen=True)
class DistillConfig:
    model: str
    out: Path
    tokens: int = 400_000  # generated tokens, prompts included
    epochs: int = 4
    seed: int = 0
    minutes: float | None = None  # wall-clock budget for the whole distillation
    work: Path | None = None
    keep_work: bool = False
    batch_size: int = 32
    max_new_tokens: int = 256
    sample_every: int = 5  # every n-th generation batch samples (the rest are greedy)
    temperature: float = 0.6
    derived_share: float = 0.3  # of the tokens: summaries, rewrites and follow-ups of earlier answers
    generation_share: float = 0.55  # of the time budget, at most
    val_every: int = 33  # every n-th sequence is kept out of training to measure top-1
    checkpoint_every_s: float = 120.0
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    show_bars: bool = True

    @property
    def work_dir(self) -> Path:
        return Path(self.work) if self.work is not None else Path(self.out) / "work"

    def resume_key(self) -> dict:
        """Settings a resumed run must share with the run that wrote the work directory."""
        keys = ("model", "tokens", "epochs", "seed", "minutes", "batch_size", "max_new_tokens", "sample_every",
                "temperature", "derived_share", "val_every")
        d = {k: getattr(self, k) for k in keys}
        d.update(loss=asdict(self.loss), optim=asdict(self.optim))
        return json.loads(json.dumps(d))


class Clock:
    """Seconds used by this distillation, across resumed processes."""

    def __init__(self, used_before: float, budget_s: float | None) -> None:
        self.start, self.used_before, self.budget_s = time.monotonic(), used_before, budget_s

    def used(self) -> float:
        return self.used_before + time.monotonic() - self.start

    def left(self) -> float:
        return float("inf") if self.budget_s is None else self.budget_s - self.used()


@contextlib.contextmanager
def _deterministic(seed: int):
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def _load_state(cfg: DistillConfig, resume: bool) -> dict:
    work = cfg.work_dir
    state_file = work / "state.json"
    if state_file.exists() and not resume:
        raise DistillError(f"{work} holds an earlier distillation: add --resume to continue it, or delete {work}")
    if resume and state_file.exists():
        state = json.loads(state_file.read_text())
        if state.get("config") != cfg.resume_key():
            raise DistillError(f"{work} was started with other settings ({state.get('config')}): "
                               "resume with the same flags, or delete it to start over")
        return state
    work.mkdir(parents=True, exist_ok=True)
    return {"version": STATE_VERSION, "config": cfg.resume_key(), "elapsed_s": 0.0, "phase": "generate",
            "generated_tokens": 0, "first_phase_done": False}


def _save_state(cfg: DistillConfig, state: dict, clock: Clock) -> None:
    state["elapsed_s"] = clock.used()
    tmp = cfg.work_dir / "state.json.tmp"
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(cfg.work_dir / "state.json")


def run_distill(cfg: DistillConfig, *, resume: bool = False, progress: Progress | None = None,
                command: str | None = None) -> dict:
    """Run (or resume) every phase and write the head to cfg.out; returns the training stats.

    `command` (the command line, if any) is recorded in the head's config with the phase times.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.models import resolve_model

    say = progress or (lambda text: logger.info("%s", text))
    state = _load_state(cfg, resume)
    clock = Clock(state["elapsed_s"], cfg.minutes * 60 if cfg.minutes else None)
    resolved = resolve_model(cfg.model)
    with _deterministic(cfg.seed):
        if state["phase"] in ("generate", "features"):
            tokenizer = AutoTokenizer.from_pretrained(resolved.path)
            model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.bfloat16).eval()
            if state["phase"] == "generate":
                _generate(cfg, state, clock, model, tokenizer, say)
                state["phase"], state["generate_done_s"] = "features", clock.used()
                _save_state(cfg, state, clock)
            _features(cfg, model, say)
            state["phase"], state["features_done_s"] = "train", clock.used()
            _save_state(cfg, state, clock)
            del model
        train, val = load_sequences(cfg.work_dir / "feat", cfg.val_every)
        say(f"training on {train.n_sequences} sequences ({train.n_tokens} tokens), "
            f"{val.n_sequences} kept out for validation")
        plan = TrainPlan(cfg.epochs, cfg.seed, cfg.loss, cfg.optim, reserve_s=30.0,
                         checkpoint_every_s=cfg.checkpoint_every_s, show_bars=cfg.show_bars)
        head, stats = train_head(resolved.path, train, val, plan, cfg.work_dir / "checkpoint.pt", clock.left,
                                 lambda: _save_state(cfg, state, clock), say)
    stats.update(minutes=round(clock.used() / 60, 2), generated_tokens=state["generated_tokens"],
                 sequences=train.n_sequences + val.n_sequences, seed=cfg.seed)
    if "generate_done_s" in state and "features_done_s" in state:
        marks = (0.0, state["generate_done_s"], state["features_done_s"], clock.used())
        stats["phase_minutes"] = {name: round((b - a) / 60, 2)
                                  for name, a, b in zip(("generate", "features", "train"), marks, marks[1:])}
    if command:
        stats["command"] = command
    save_head(head, resolved, cfg.out, stats, cfg.work_dir / "gen")
    state["phase"] = "done"
    _save_state(cfg, state, clock)
    say(f"wrote {cfg.out / 'model.safetensors'} in {clock.used() / 60:.1f} min; validation top-1 {stats['val_top1']}")
    if not cfg.keep_work:
        shutil.rmtree(cfg.work_dir, ignore_errors=True)
    return stats


# --- generation


def _shards(directory: Path, prefix: str = "") -> list[Path]:
    return sorted(directory.glob(f"{prefix}*.safetensors")) if directory.is_dir() else []


def _eos_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    ids = set([eos] if isinstance(eos, int) else (eos or []))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def _generate(cfg: DistillConfig, state: dict, clock: Clock, model, tokenizer, say: Progress) -> None:
    """Answer instruction batches until cfg.tokens (or the generation share of the time) is used."""
    gen_dir = cfg.work_dir / "gen"
    gen_dir.mkdir(exist_ok=True)
    time_cap = cfg.generation_share * clock.budget_s if clock.budget_s else float("inf")
    first_tokens = int(cfg.tokens * (1 - cfg.derived_share))
    state["generated_tokens"] = sum(int(load_file(s)["lengths"].sum()) for s in _shards(gen_dir))
    bar = tqdm(total=cfg.tokens, initial=state["generated_tokens"], desc="generate", unit="tok", file=sys.stderr,
               disable=not cfg.show_bars, dynamic_ncols=True)
    if not state["first_phase_done"]:
        instructions = _first_instructions(cfg)
        say(f"generating answers to {len(instructions)} distinct instructions (up to {first_tokens} tokens first)")
        _answer_all(cfg, state, clock, model, tokenizer, instructions, "a", first_tokens,
                    time_cap * (1 - cfg.derived_share), bar)
        state["first_phase_done"] = True
        _save_state(cfg, state, clock)
    pairs = _answered(cfg, tokenizer, _first_instructions(cfg))
    derived = derive_instructions(pairs, cfg.seed, len(pairs))
    say(f"{len(derived)} derived instructions (summaries, rewrites, follow-up chats)")
    _answer_all(cfg, state, clock, model, tokenizer, derived, "b", cfg.tokens, time_cap, bar)
    bar.close()


def _first_instructions(cfg: DistillConfig, window_batches: int = 8) -> list[Instruction]:
    """make_instructions(seed), grouped by category within windows of 8 batches: answers of one
    kind have similar lengths, so fewer rows of a batch sit finished while the longest goes on."""
    instructions = make_instructions(cfg.seed)
    window = window_batches * cfg.batch_size
    out: list[Instruction] = []
    for w in range(0, len(instructions), window):
        out.extend(sorted(instructions[w : w + window], key=lambda ins: ins.category))
    return out


def _answer_all(cfg: DistillConfig, state: dict, clock: Clock, model, tokenizer, instructions: list[Instruction],
                prefix: str, token_goal: int, time_cap: float, bar) -> None:
    gen_dir = cfg.work_dir / "gen"
    eos_ids = _eos_ids(model, tokenizer)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    index = len(_shards(gen_dir, prefix))
    while state["generated_tokens"] < token_goal and index * cfg.batch_size < len(instructions):
        if clock.used() >= time_cap:
            logger.warning("generation stopped at %d tokens: its share of the time budget is used", state["generated_tokens"])
            return
        rows = range(index * cfg.batch_size, min((index + 1) * cfg.batch_size, len(instructions)))
        sample = cfg.sample_every > 0 and index % cfg.sample_every == cfg.sample_every - 1
        ids, lengths, prompt_lengths = _generate_batch(cfg, model, tokenizer, [instructions[i] for i in rows],
                                                       eos_ids, sample, seed=cfg.seed * 100_003 + index)
        tensors = {"ids": ids, "lengths": lengths, "prompt_lengths": prompt_lengths,
                   "instruction": torch.tensor(list(rows), dtype=torch.int32)}
        tmp = gen_dir / f"{prefix}-{index:05d}.tmp"
        save_file(tensors, tmp, metadata={"sampled": str(sample)})
        tmp.replace(gen_dir / f"{prefix}-{index:05d}.safetensors")
        state["generated_tokens"] += int(lengths.sum())
        _save_state(cfg, state, clock)
        bar.update(int(lengths.sum()))
        index += 1


@torch.inference_mode()
def _generate_batch(cfg: DistillConfig, model, tokenizer, instructions: list[Instruction], eos_ids: list[int],
                    sample: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Answers of one batch -> (ids [sum T] int32 of prompt + answer rows, lengths [B], prompt_lengths [B])."""
    texts = [tokenizer.apply_chat_template(list(ins.messages), tokenize=False, add_generation_prompt=True)
             for ins in instructions]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    options = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    if sample:
        torch.manual_seed(seed)
        options = {"do_sample": True, "temperature": cfg.temperature, "top_p": 0.95, "top_k": None}
    out = model.generate(**enc, max_new_tokens=cfg.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=eos_ids, **options)
    new = out[:, enc["input_ids"].shape[1]:]  # [B, new]
    rows, lengths, prompt_lengths = [], [], []
    for b in range(new.shape[0]):
        prompt = enc["input_ids"][b][enc["attention_mask"][b].bool()]
        answer = new[b]
        hits = torch.isin(answer, torch.tensor(eos_ids)).nonzero()
        answer = answer[: int(hits[0]) + 1] if len(hits) else answer
        rows.append(torch.cat((prompt, answer)))
        lengths.append(len(prompt) + len(answer))
        prompt_lengths.append(len(prompt))
    return (torch.cat(rows).to(torch.int32), torch.tensor(lengths, dtype=torch.int32),
            torch.tensor(prompt_lengths, dtype=torch.int32))


def _answered(cfg: DistillConfig, tokenizer, instructions: list[Instruction]) -> list[tuple[Instruction, str]]:
    """(instruction, answer text) for every answer of the first phase, in shard order."""
    pairs = []
    for shard in _shards(cfg.work_dir / "gen", "a"):
        data = load_file(shard)
        starts = np.concatenate(([0], np.cumsum(data["lengths"].numpy())))
        for j, row in enumerate(data["instruction"].tolist()):
            answer = data["ids"][starts[j] + int(data["prompt_lengths"][j]) : starts[j + 1]]
            pairs.append((instructions[row], tokenizer.decode(answer, skip_special_tokens=True)))
    return pairs


# --- features


@torch.inference_mode()
def _features(cfg: DistillConfig, model, say: Progress, max_tokens: int = 8192) -> None:
    """Teacher-forced pass over every generated shard that has no feature shard yet."""
    gen_dir, feat_dir = cfg.work_dir / "gen", cfg.work_dir / "feat"
    feat_dir.mkdir(exist_ok=True)
    todo = [s for s in _shards(gen_dir) if not (feat_dir / s.name).exists()]
    lm_head = model.get_output_embeddings().weight  # [V, hidden]
    for shard in tqdm(todo, desc="features", unit="shard", file=sys.stderr, disable=not cfg.show_bars, dynamic_ncols=True):
        data = load_file(shard)
        lengths = data["lengths"].tolist()
        starts = np.concatenate(([0], np.cumsum(lengths)))
        feats, argmax = [], []
        j = 0
        while j < len(lengths):
            k = j + 1
            while k < len(lengths) and max(lengths[j : k + 1]) * (k + 1 - j) <= max_tokens:
                k += 1
            seqs = [data["ids"][starts[i] : starts[i + 1]].long() for i in range(j, k)]
            ids = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True)  # [B, T]
            mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(s), dtype=torch.long) for s in seqs], batch_first=True)
            hidden = model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, hidden]
            for b, s in enumerate(seqs):
                h = hidden[b, : len(s)]
                feats.append(h.to(torch.bfloat16))
                argmax.append(torch.cat([(c @ lm_head.T).argmax(-1) for c in h.split(512)]).to(torch.int32))
            j = k
        tensors = {"ids": data["ids"], "lengths": data["lengths"], "prompt_lengths": data["prompt_lengths"],
                   "features": torch.cat(feats).contiguous(), "argmax": torch.cat(argmax)}
        tmp = feat_dir / (shard.stem + ".tmp")
        save_file(tensors, tmp)
        tmp.replace(feat_dir / shard.name)
    say(f"features recorded for {len(_shards(feat_dir))} shards")


# --- output


DRAFT_VOCAB_COVERAGE = 0.999


def draft_vocabulary(gen_dir: Path, vocab: int, coverage: float = DRAFT_VOCAB_COVERAGE) -> dict | None:
    """The fewest token ids (ascending, a multiple of 64) that make up `coverage` of the answer
    tokens in the generated shards, as draft_vocab.json holds them; None when that would keep more
    than half the vocabulary (too little to gain)."""
    counts = np.zeros(vocab, dtype=np.int64)
    for shard in _shards(gen_dir):
        data = load_file(shard)
        ids, lengths = data["ids"].numpy(), data["lengths"].numpy()
        starts = np.concatenate(([0], np.cumsum(lengths)))
        answer = np.concatenate([ids[a + p : b] for a, b, p in zip(starts, starts[1:], data["prompt_lengths"].numpy())])
        counts += np.bincount(answer, minlength=vocab)[:vocab]
    total = int(counts.sum())
    if not total:
        return None
    ranked = np.argsort(-counts, kind="stable")
    n = int(np.searchsorted(np.cumsum(counts[ranked]), coverage * total)) + 1
    n = min(vocab, -(-n // 64) * 64)
    if n > vocab // 2:
        return None
    ids = np.sort(ranked[:n])
    return {"ids": ids.tolist(), "coverage": round(float(counts[ids].sum()) / total, 5), "answer_tokens": total}


def save_head(head, resolved, out: Path, stats: dict, gen_dir: Path | None = None) -> None:
    """Write model.safetensors (head weights, bf16), config.json with flowspec metadata and, from
    the answers in `gen_dir`, draft_vocab.json (see `draft_vocabulary`)."""
    from engine.draft import DRAFT_VOCAB_FILE
    from engine.heads import FINGERPRINT_SCOPE, head_config_dict, target_fingerprint
    from engine.stage import model_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target_config = model_config(resolved.path)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in head.state_dict().items()
             if k.startswith(("fc.", "layers.0."))}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    raw = head_config_dict(target_config)
    raw["flowspec"] = {
        "format": 1,
        "kind": "eagle1-head",
        "target": {"name": resolved.name, "ref": resolved.ref, "hidden_size": target_config.hidden_size,
                   "vocab_size": target_config.vocab_size, "weights_sha256": target_fingerprint(resolved.path),
                   "weights_hash_scope": FINGERPRINT_SCOPE},
        "training": stats,
    }
    vocab_file = out / DRAFT_VOCAB_FILE
    vocab_file.unlink(missing_ok=True)
    draft_vocab = draft_vocabulary(gen_dir, target_config.vocab_size) if gen_dir is not None else None
    if draft_vocab is not None:
        raw["flowspec"]["draft_vocab"] = {"file": DRAFT_VOCAB_FILE, "size": len(draft_vocab["ids"]),
                                          "coverage": draft_vocab["coverage"]}
        vocab_file.write_text(json.dumps(draft_vocab) + "\n")
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
