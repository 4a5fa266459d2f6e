"""What the app knows about each device that can run a stage: a Qt-free, immutable snapshot.

A *device* is an agent (found by mDNS or added by host:port) or a local stage worker process on
this machine. Its *state* says whether a stage may be placed on it:

- ``online``: reachable, paired and idle;
- ``busy``: reachable and running a stage;
- ``lost``: it stopped answering (heartbeats missed, or its process died);
- ``unpaired``: seen, but the user has not entered its pairing code yet, so it cannot be used.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from engine.layout import DeviceId

logger = logging.getLogger(__name__)

DeviceState = Literal["online", "busy", "lost", "unpaired"]
USABLE_STATES: frozenset[str] = frozenset({"online", "busy"})


@dataclass(frozen=True)
class DeviceInfo:
    """One device as the devices panel and the layout editor show it."""

    device_id: DeviceId
    name: str
    address: str  # "host:port", or "127.0.0.1 (process)" for a local stage worker
    state: DeviceState = "online"
    memory_total: int = 0  # bytes
    memory_free: int = 0  # bytes a stage may use
    accelerator: str = "CPU"
    ms_per_layer: float | None = None  # measured: compute per layer per pipeline segment
    source: Literal["local", "mdns", "manual"] = "local"

    @property
    def usable(self) -> bool:
        return self.state in USABLE_STATES


def local_worker_devices(n_workers: int, memory_available: int | None = None) -> tuple[DeviceInfo, ...]:
    """``n_workers`` local stage worker processes sharing this machine's available memory evenly."""
    if memory_available is None:
        import psutil

        memory_available = int(psutil.virtual_memory().available)
        memory_total = int(psutil.virtual_memory().total)
    else:
        memory_total = memory_available
    share = memory_available // max(1, n_workers)
    return tuple(
        DeviceInfo(DeviceId(f"local-{k}"), f"Local worker {k}", "127.0.0.1 (process)", "online",
                   memory_total // max(1, n_workers), share, "CPU", None, "local")
        for k in range(1, n_workers + 1)
    )


def with_state(devices: Sequence[DeviceInfo], device_id: str, state: DeviceState) -> tuple[DeviceInfo, ...]:
    """The same devices with ``device_id`` in ``state``."""
    return tuple(replace(d, state=state) if d.device_id == device_id else d for d in devices)


def with_speeds(devices: Sequence[DeviceInfo], ms_per_layer: dict[str, float]) -> tuple[DeviceInfo, ...]:
    """The same devices with measured speeds filled in where known."""
    return tuple(replace(d, ms_per_layer=ms_per_layer.get(d.device_id, d.ms_per_layer)) for d in devices)


def find(devices: Sequence[DeviceInfo], device_id: str) -> DeviceInfo | None:
    return next((d for d in devices if d.device_id == device_id), None)


def format_bytes(n_bytes: float) -> str:
    """A size for people: "512 MiB", "1.5 GiB"."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n_bytes) >= scale:
            value = n_bytes / scale
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{int(n_bytes)} B"
