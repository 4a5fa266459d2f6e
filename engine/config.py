"""Frozen configuration passed explicitly through the engine (no globals, no import-time effects)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Strategy = Literal["ar", "chunk", "pipedec", "flowspec"]
STRATEGIES: tuple[Strategy, ...] = ("ar", "chunk", "pipedec", "flowspec")


class ConfigError(ValueError):
    """A setting is out of range; the message names the setting and the allowed values."""


@dataclass(frozen=True)
class SpeculationConfig:
    """Draft tree shape. depth counts draft levels below the root; budget counts draft nodes."""

    topk: int = 10
    depth: int = 5
    budget: int = 80  # drafts in a round's first tree
    expand_budget: int = 64  # drafts per re-draft after an acceptance (flowspec)
    segment_max: int = 16  # largest first-round segment; larger trees keep the rest waiting
    expand_segment_max: int = 64  # largest segment of appended nodes
    ring_slots: int | None = None  # segments kept in flight; None = by the ring (coordinator.default_slots)
    solo_segment: int = 16  # flowspec's every segment when it keeps one in flight by default (shared cores)
    max_tree: int = 512  # nodes a tree may grow to by expansion
    pipedec_width: int = 16
    expand: bool = True  # flowspec: re-draft after each acceptance and refill emptied slots

    def __post_init__(self) -> None:
        for name in ("topk", "depth", "segment_max", "expand_segment_max", "max_tree", "pipedec_width", "solo_segment"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1 (got {getattr(self, name)})")
        if self.ring_slots is not None and self.ring_slots < 1:
            raise ConfigError(f"ring_slots must be at least 1 (got {self.ring_slots})")
        for name in ("budget", "expand_budget"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative (got {getattr(self, name)})")


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0  # 0 = greedy
    top_k: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be 0 (greedy) or positive (got {self.temperature})")


@dataclass(frozen=True)
class SessionConfig:
    strategy: Strategy = "flowspec"
    max_new_tokens: int = 128
    prefill_chunk: int = 64
    speculation: SpeculationConfig = field(default_factory=SpeculationConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    stage_timeout_s: float = 60.0  # no reply from the ring for this long = a stage is lost

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy '{self.strategy}': choose one of {', '.join(STRATEGIES)}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be at least 1 (got {self.max_new_tokens})")
        if self.prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be at least 1 (got {self.prefill_chunk})")


@dataclass(frozen=True)
class LinkConfig:
    """Emulated per-hop link (labelled as emulation wherever its numbers appear)."""

    mbps: float | None = None
    latency_ms: float = 0.0

    def delay_s(self, nbytes: int) -> float:
        bw = 0.0 if not self.mbps else nbytes * 8 / (self.mbps * 1e6)
        return bw + self.latency_ms / 1000.0

    @property
    def active(self) -> bool:
        return bool(self.mbps) or self.latency_ms > 0
