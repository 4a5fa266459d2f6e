"""resource_path(): files in the repository's resources/ (or a frozen build's copy of it)."""

from __future__ import annotations

import sys
from pathlib import Path


def resource_path(name: str) -> Path:
    roots = [Path(__file__).resolve().parent.parent / "resources"]
    if hasattr(sys, "_MEIPASS"):
        roots.append(Path(sys._MEIPASS) / "resources")
    for root in roots:
        if (root / name).exists():
            return root / name
    raise FileNotFoundError(
        f"resource {name!r} is missing from {', '.join(map(str, roots))}: reinstall FlowSpec Studio "
        "or run it from a full checkout of the repository")
