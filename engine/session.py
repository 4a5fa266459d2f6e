"""The engine's public surface: a model on a ring of stages, and the requests run on it.

`Engine` owns the tokenizer, the coordinator's LM head, the drafter and the ring; `Session` runs one
conversation on an engine a step at a time and reports typed events (engine/events.py), so the
CLI and the app drive generation the same way.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from engine.config import ConfigError, LinkConfig, SessionConfig
from engine.coordinator import Coordinator, Result, StageLost
from engine.draft import Drafter, LookupDrafter, make_drafter
from engine.events import (EngineEvent, RequestFailed, RequestFinished, RequestId, StepStats,
                           TokensAccepted)
from engine.stage import Head, load_head, load_stage, model_config
from engine.stage_worker import StageWorker

logger = logging.getLogger(__name__)

Messages = Sequence[dict]


def even_bounds(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    """Contiguous near-equal layer ranges, earlier stages taking the extra layers."""
    if n_stages < 1:
        raise ConfigError(f"need at least one stage (got {n_stages})")
    if n_stages > n_layers:
        raise ConfigError(f"{n_stages} stages for a model of {n_layers} layers: use at most {n_layers} stages")
    base, extra = divmod(n_layers, n_stages)
    bounds, start = [], 0
    for i in range(n_stages):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


@dataclass(frozen=True)
class EngineSpec:
    model: str
    bounds: tuple[tuple[int, int], ...] | None = None  # None = even split over n_stages
    n_stages: int = 1
    dtype: str = "bf16"
    draft: str | None = None  # None: a matching installed draft head, else prompt lookup
    lookup_branch: bool = True  # a head's or draft model's trees also get the prompt-lookup branch
    link: LinkConfig = LinkConfig()
    in_process: bool = False  # stages as objects in this process instead of worker processes
    # Builds the ring instead (stages on agents, see engine/agent_cli.py):
    # (model reference, model directory, bounds, dtype, on_progress) -> a ring
    ring_factory: Callable[..., object] | None = None


class Engine:
    """A loaded model split over a ring; generates one request at a time."""

    def __init__(self, spec: EngineSpec, on_progress: Callable[[str], None] | None = None) -> None:
        from transformers import AutoTokenizer

        from engine.models import resolve_model

        progress = on_progress or (lambda text: logger.info("%s", text))
        self.spec = spec
        progress(f"resolving model {spec.model}")
        self.resolved = resolve_model(spec.model)
        path = Path(self.resolved.path)
        self.config = model_config(path)
        n_layers = self.config.num_hidden_layers
        self.bounds = list(spec.bounds) if spec.bounds else even_bounds(n_layers, spec.n_stages)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.head: Head = load_head(path, spec.dtype)
        self.drafter: Drafter = self._drafter(spec.draft, path)
        self.eos_ids = _eos_ids(self.tokenizer, path)
        self.context_len = int(getattr(self.config, "max_position_embeddings", 2048))
        if spec.ring_factory is not None:
            self.ring = spec.ring_factory(spec.model, path, self.bounds, spec.dtype, progress)
        elif spec.in_process:
            from engine.ring_local import LocalRing

            workers = []
            for i, (a, b) in enumerate(self.bounds):
                progress(f"stage {i + 1}/{len(self.bounds)}: loading layers {a}-{b - 1}")
                workers.append(StageWorker(load_stage(path, a, b, spec.dtype), i, len(self.bounds)))
            self.ring = LocalRing(workers, parallel_stages=1)  # one process computes every stage in turn
        else:
            from engine.ring_zmq import ProcessRing

            self.ring = ProcessRing(str(path), self.bounds, spec.dtype, spec.link, on_progress=progress)

    def _drafter(self, draft: str | None, path: Path) -> Drafter:
        """`draft` as given; None picks a draft head distilled for this target (user heads first,
        then the shipped ones, see engine/heads.py), else prompt lookup."""
        if draft is None:
            from engine.heads import pick_head

            head_dir = pick_head(path)
            if head_dir is None:
                return LookupDrafter()
            logger.info("draft head %s matches %s", head_dir, path)
            draft = f"head:{head_dir}"
        return make_drafter(draft, str(path), self.head, self.spec.dtype, self.spec.lookup_branch)

    def encode(self, prompt: str | Messages, raw: bool = False) -> list[int]:
        """Token ids of a prompt: the model's chat template unless raw (or no template exists)."""
        if isinstance(prompt, str) and (raw or not self.tokenizer.chat_template):
            return list(self.tokenizer(prompt)["input_ids"])
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def check_fits(self, prompt_ids: list[int], max_new_tokens: int) -> None:
        need = len(prompt_ids) + max_new_tokens
        if need > self.context_len:
            raise ConfigError(
                f"the prompt is {len(prompt_ids)} tokens and {max_new_tokens} new tokens were asked for, "
                f"but the model's context is {self.context_len}: shorten the prompt or lower --max-new-tokens"
            )

    def coordinator(self, config: SessionConfig, on_tokens: Callable[[list[int]], None] | None = None) -> Coordinator:
        return Coordinator(self.ring, self.head, self.drafter, config, self.eos_ids, on_tokens)

    def generate(self, prompt_ids: list[int], config: SessionConfig,
                 on_tokens: Callable[[list[int]], None] | None = None) -> Result:
        self.check_fits(prompt_ids, config.max_new_tokens)
        return self.coordinator(config, on_tokens).generate(prompt_ids)

    def close(self) -> None:
        close = getattr(self.ring, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _eos_ids(tokenizer, path: Path) -> set[int]:
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if (path / "generation_config.json").exists():
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(path).eos_token_id
        ids.update([eos] if isinstance(eos, int) else (eos or []))
    return ids


class TextStream:
    """Turns token ids into the text they add, without splitting multi-byte characters."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, ids: Sequence[int]) -> str:
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return ""
        new, self.text = text[len(self.text):], text
        return new


class Session:
    """One conversation on an engine, driven a step at a time. Not thread-safe: call from one thread.

    `submit` queues a prompt; each `step` handles one pipeline turn and returns False when idle.
    Events arrive through `on_event` on the calling thread.
    """

    def __init__(self, engine: Engine, config: SessionConfig, on_event: Callable[[EngineEvent], None]) -> None:
        self.engine, self.config, self.on_event = engine, config, on_event
        self.history: list[dict] = []
        self._coordinator: Coordinator | None = None
        self._request: RequestId | None = None
        self._stream: TextStream | None = None
        self._next_id = 0

    def submit(self, prompt: str, config: SessionConfig | None = None) -> RequestId:
        if self._coordinator is not None and not self._coordinator.done:
            raise RuntimeError("a request is still running; cancel it or wait for it to finish")
        self.config = config or self.config
        self._next_id += 1
        request = RequestId(self._next_id)
        self.history.append({"role": "user", "content": prompt})
        ids = self.engine.encode(self.history)
        self.engine.check_fits(ids, self.config.max_new_tokens)
        self._stream = TextStream(self.engine.tokenizer)
        self._request = request
        self._coordinator = self.engine.coordinator(self.config, self._on_tokens)
        self._coordinator.start(ids)
        return request

    def _on_tokens(self, ids: list[int]) -> None:
        text = self._stream.push(ids)
        self.on_event(TokensAccepted(self._request, tuple(ids), text))

    def step(self) -> bool:
        """One pipeline turn. Catches engine failures (a lost stage, a broken ring) and reports them
        as RequestFailed so the conversation survives; programming errors still propagate."""
        c = self._coordinator
        if c is None or c.done:
            return False
        n_before = len(c.accepted_lengths) if hasattr(c, "accepted_lengths") else 0
        try:
            going = c.step()
        except (StageLost, RuntimeError) as exc:
            logger.exception("request %s failed", self._request)
            c.done = True
            self.on_event(RequestFailed(self._request, str(exc)))
            return False
        if len(c.accepted_lengths) > n_before:
            r = c.result()
            self.on_event(StepStats(self._request, c.accepted_lengths[-1], len(c.out), r.seconds,
                                    len(c.out) / r.seconds if r.seconds else 0.0,
                                    sum(f.end > f.start for f in c.flights), tuple(r.stage_busy)))
        if not going:
            self._finish("eos" if c.stopped_by == "eos" else c.stopped_by)
        return going

    def cancel(self) -> None:
        c = self._coordinator
        if c is not None and not c.done:
            c.done = True
            self._finish("cancelled")

    def _finish(self, stopped_by: str) -> None:
        r = self._coordinator.result()
        text = self.engine.tokenizer.decode(r.token_ids, skip_special_tokens=True)
        self.history.append({"role": "assistant", "content": text})
        self.on_event(RequestFinished(
            self._request, text, tuple(r.token_ids), stopped_by, r.seconds, r.ttft_s,
            len(r.token_ids) / r.seconds if r.seconds else 0.0, r.mean_accepted_length,
            r.rounds, r.turns, tuple(r.stage_busy)))

    def close(self) -> None:
        self.cancel()


def with_strategy(config: SessionConfig, strategy: str) -> SessionConfig:
    return replace(config, strategy=strategy)
