"""Colours shared by the widgets: one per device, and the memory traffic light."""

from __future__ import annotations

from PySide6.QtGui import QColor

DEVICE_COLOURS = ("#4C78A8", "#F58518", "#54A24B", "#B279A2", "#E45756", "#72B7B2", "#EECA3B", "#9D755D")
OK = QColor("#3BA55C")
WARN = QColor("#E3A21A")
BAD = QColor("#D64541")
MUTED = QColor("#8A94A6")
DRAFT_HIGHLIGHT = "#DCEBFF"


def device_colour(index: int) -> QColor:
    return QColor(DEVICE_COLOURS[index % len(DEVICE_COLOURS)])


def memory_colour(fraction: float) -> QColor:
    """Green while the estimate fits comfortably, amber near the limit, red past it."""
    if fraction > 1.0:
        return BAD
    return WARN if fraction > 0.85 else OK
