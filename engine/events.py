"""Typed, immutable events the engine reports to its caller (the CLI, the app's bridge)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NewType, Union

RequestId = NewType("RequestId", int)


@dataclass(frozen=True)
class StageLoading:
    stage_index: int
    n_stages: int
    message: str


@dataclass(frozen=True)
class TokensAccepted:
    request_id: RequestId
    token_ids: tuple[int, ...]
    text: str  # the text these tokens add to the answer


@dataclass(frozen=True)
class StepStats:
    """One verification: how many tokens it committed and the running speed."""

    request_id: RequestId
    accepted_length: int
    tokens_so_far: int
    seconds: float
    tokens_per_s: float
    ring_occupancy: int  # segments in flight after this step
    stage_busy: tuple[float, ...]  # fraction of wall time each stage computed so far


@dataclass(frozen=True)
class RequestFinished:
    request_id: RequestId
    text: str
    token_ids: tuple[int, ...]
    stopped_by: str  # "eos" | "max_new_tokens" | "cancelled"
    seconds: float
    ttft_s: float
    tokens_per_s: float
    mean_accepted_length: float
    rounds: int
    turns: int
    stage_busy: tuple[float, ...]


@dataclass(frozen=True)
class RequestFailed:
    request_id: RequestId
    reason: str


@dataclass(frozen=True)
class StageLost:
    stage_index: int
    reason: str


EngineEvent = Union[StageLoading, TokensAccepted, StepStats, RequestFinished, RequestFailed, StageLost]
