"""Frozen payloads the bridge's signals carry to the widgets, besides engine/events.py's events (S11).

Qt-free and torch-free, so widgets and tests can build them without an engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.events import RequestId
from engine.layout import Layout


@dataclass(frozen=True)
class EnginePlan:
    """What to load: a model cut by a layout, at a dtype, with an optional drafter reference."""

    model: str
    layout: Layout
    dtype: str = "bf16"
    draft: str | None = None
    on_agents: bool = False  # stages on flowspec-agents (device ids are agent ids), else local processes

    @property
    def bounds(self) -> tuple[tuple[int, int], ...]:
        return tuple((s.start, s.end) for s in self.layout.stages)


@dataclass(frozen=True)
class LoadProgress:
    """One step of loading the stages: stage ``stage_index`` on ``device_id`` is ``fraction`` done."""

    stage_index: int
    device_id: str
    fraction: float
    message: str


@dataclass(frozen=True)
class EngineReady:
    """The stages of ``plan`` are loaded and the chat can run; ``pids`` are the local stage processes."""

    plan: EnginePlan
    seconds: float
    pids: tuple[int, ...] = ()


@dataclass(frozen=True)
class AcceptedText:
    """Text one verification added, in pieces that say whether each came from the draft."""

    request_id: RequestId
    pieces: tuple[tuple[str, bool], ...]  # (text, from_draft)
    n_tokens: int

    @property
    def text(self) -> str:
        return "".join(text for text, _ in self.pieces)


@dataclass(frozen=True)
class StageLostReport:
    """A stage stopped mid-answer; the conversation and the answer so far are kept."""

    request_id: RequestId | None
    stage_index: int | None
    device_id: str | None
    reason: str
    partial_ids: tuple[int, ...]


@dataclass(frozen=True)
class EngineState:
    """What the engine is doing, for the status bar and for enabling buttons."""

    state: Literal["idle", "loading", "ready", "generating", "lost", "error", "closed"]
    message: str = ""
