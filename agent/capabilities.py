"""What this device has: memory, CPU, accelerator, disk, models; and the memory check for a stage.

The parsers are pure functions of text, tested on captured outputs; the probes call them.
"""

from __future__ import annotations

import math
import os
import platform
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import psutil

from engine import wire

STAGE_RESERVE_BYTES = 64 * 1024**2  # KV cache, activations and runtime on top of a stage's weights
_ITEMSIZE = {"bf16": 2, "fp16": 2, "fp32": 4}


def product_version() -> str:
    try:
        return version("flowspec-studio")
    except PackageNotFoundError:
        return "unknown"


def parse_cpu_model(cpuinfo: str) -> str:
    """The CPU's name from /proc/cpuinfo text ("model name", or "Model"/"Hardware" on ARM boards)."""
    for key in ("model name", "Model", "Hardware", "Processor"):
        for line in cpuinfo.splitlines():
            name, sep, value = line.partition(":")
            if sep and name.strip() == key and value.strip():
                return value.strip()
    return ""


def cpu_model() -> str:
    try:
        found = parse_cpu_model(Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace"))
    except OSError:
        found = ""
    return (found or platform.processor() or platform.machine() or "unknown CPU")[:200]


def accelerator() -> tuple[str, str]:
    """(accelerator name, torch device) of this machine: CUDA, then Apple MPS, else CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)[:200], "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "Apple GPU (MPS)", "mps"
    return "none", "cpu"


def free_memory(memory_limit: int) -> int:
    """Bytes a stage may use now: available memory, capped by --max-memory when set."""
    available = psutil.virtual_memory().available
    return min(available, memory_limit) if memory_limit else available


def stage_memory_bytes(msg: wire.HostStage) -> int:
    """What hosting `msg` needs: its weights in the requested dtype plus STAGE_RESERVE_BYTES."""
    itemsize = _ITEMSIZE.get(msg.dtype, 4)
    return sum(math.prod(t.shape) * itemsize for t in msg.tensors) + STAGE_RESERVE_BYTES


def local_models(models_dir: Path) -> list[str]:
    """Models this agent can load without a transfer: built-ins whose package is installed, and
    Hugging Face directories in the models directory (by directory name)."""
    from engine.models import BUILTIN_MODELS, ModelError

    names = []
    for name, builtin in BUILTIN_MODELS.items():
        try:
            builtin.locate()
        except ModelError:
            continue
        names.append(name)
    if models_dir.is_dir():
        names += sorted(p.name for p in models_dir.iterdir() if (p / "config.json").is_file())
    return names


def capabilities(agent_id: str, name: str, public_key: str, data_port: int, models_dir: Path,
                 memory_limit: int, stage: str, accel: tuple[str, str]) -> wire.Capabilities:
    memory = psutil.virtual_memory()
    return wire.Capabilities(
        agent_id=agent_id, name=name, version=product_version(), public_key=public_key, data_port=data_port,
        memory_total=memory.total, memory_free=free_memory(memory_limit), memory_limit=memory_limit,
        cpu=cpu_model(), cpu_count=os.cpu_count() or 1, accelerator=accel[0], torch_device=accel[1],
        disk_free=shutil.disk_usage(models_dir).free, models=tuple(local_models(models_dir))[:64],
        stage=stage, busy=bool(stage))
