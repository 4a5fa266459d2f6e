"""ChartsPanel: live tokens/s, accepted length per verification, per-stage busy fraction, ring occupancy.

Each StepStats is written into fixed-size numpy ring buffers (O(1), draws nothing); a 10 Hz QTimer
redraws with `setData` (STYLE.md S13). Pause freezes the drawing (data keeps arriving); Reset clears.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPushButton, QVBoxLayout, QWidget

from app.widgets.palette import DEVICE_COLOURS
from engine.events import StepStats

CAPACITY = 1000
REDRAW_MS = 100


class RingBuffer:
    """The last ``capacity`` values of a series, oldest first when read."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self._data = np.zeros(capacity)
        self._n = 0

    def append(self, value: float) -> None:
        self._data[self._n % self._data.size] = value
        self._n += 1

    def values(self) -> np.ndarray:
        if self._n <= self._data.size:
            return self._data[: self._n].copy()
        k = self._n % self._data.size
        return np.concatenate((self._data[k:], self._data[:k]))

    def clear(self) -> None:
        self._n = 0

    def __len__(self) -> int:
        return min(self._n, self._data.size)


class ChartsPanel(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        pg.setConfigOptions(antialias=True, background="w", foreground="#3A4150")
        self.x = RingBuffer()
        self.tokens_per_s = RingBuffer()
        self.accepted = RingBuffer()
        self.occupancy = RingBuffer()
        self.stage_busy: tuple[float, ...] = ()
        self._count = 0
        self._dirty = False
        self.paused = False
        self.graphics = pg.GraphicsLayoutWidget()
        self.speed_plot = self._plot(0, 0, "Tokens per second", "tok/s")
        self.accept_plot = self._plot(0, 1, "Accepted length per verification", "tokens")
        self.busy_plot = self._plot(1, 0, "Stage busy fraction", "")
        self.ring_plot = self._plot(1, 1, "Ring occupancy (segments in flight)", "")
        self.speed_curve = self.speed_plot.plot(pen=pg.mkPen(DEVICE_COLOURS[0], width=2))
        self.accept_curve = self.accept_plot.plot(pen=None, symbol="o", symbolSize=4,
                                                  symbolBrush=DEVICE_COLOURS[1], symbolPen=None)
        self.accept_mean = self.accept_plot.plot(pen=pg.mkPen("#3A4150", width=2))
        self.ring_curve = self.ring_plot.plot(pen=pg.mkPen(DEVICE_COLOURS[2], width=2), stepMode=None)
        self.busy_bars = pg.BarGraphItem(x=[], height=[], width=0.6, brushes=[])
        self.busy_plot.addItem(self.busy_bars)
        self.busy_plot.setYRange(0, 1)
        self.busy_plot.setMouseEnabled(x=False, y=False)
        self.summary = QLabel("No answer yet.")
        self.summary.setObjectName("muted")
        self.pause_button = QPushButton("Pause")
        self.pause_button.setCheckable(True)
        self.reset_button = QPushButton("Reset")
        self.pause_button.toggled.connect(self._on_pause_toggled)
        self.reset_button.clicked.connect(self.reset)
        self._build()
        self.timer = QTimer(self)
        self.timer.setInterval(REDRAW_MS)
        self.timer.timeout.connect(self.redraw)
        self.timer.start()

    def _plot(self, row: int, col: int, title: str, unit: str) -> pg.PlotItem:
        plot = self.graphics.addPlot(row=row, col=col, title=f"<span style='font-size:10pt'>{title}</span>")
        plot.showGrid(x=True, y=True, alpha=0.15)
        plot.setClipToView(True)
        plot.setDownsampling(mode="peak")
        plot.setLabel("left", unit)
        plot.getAxis("left").enableAutoSIPrefix(False)
        plot.getAxis("bottom").setStyle(tickTextOffset=4)
        return plot

    def _build(self) -> None:
        top = QHBoxLayout()
        title = QLabel("Pipeline")
        title.setObjectName("panelTitle")
        top.addWidget(title)
        top.addWidget(self.summary, 1)
        top.addWidget(self.pause_button)
        top.addWidget(self.reset_button)
        box = QVBoxLayout(self)
        box.setContentsMargins(10, 8, 10, 8)
        box.addLayout(top)
        box.addWidget(self.graphics, 1)

    # --- data in (cheap)

    def on_step_stats(self, stats: StepStats) -> None:
        self._count += 1
        self.x.append(self._count)
        self.tokens_per_s.append(stats.tokens_per_s)
        self.accepted.append(stats.accepted_length)
        self.occupancy.append(stats.ring_occupancy)
        self.stage_busy = tuple(stats.stage_busy)
        self._dirty = True

    def reset(self) -> None:
        for buffer in (self.x, self.tokens_per_s, self.accepted, self.occupancy):
            buffer.clear()
        self._count = 0
        self.stage_busy = ()
        self._dirty = True
        self.summary.setText("No answer yet.")
        self.redraw()

    def _on_pause_toggled(self, paused: bool) -> None:
        self.paused = paused
        self.pause_button.setText("Resume" if paused else "Pause")
        if not paused:
            self.redraw()

    # --- drawing (timer)

    def redraw(self) -> None:
        if self.paused or not self._dirty:
            return
        self._dirty = False
        x = self.x.values()
        accepted = self.accepted.values()
        self.speed_curve.setData(x, self.tokens_per_s.values())
        self.accept_curve.setData(x, accepted)
        mean = np.cumsum(accepted) / np.arange(1, accepted.size + 1) if accepted.size else accepted
        self.accept_mean.setData(x, mean)
        occupancy = self.occupancy.values()
        self.ring_curve.setData(x, occupancy)
        if occupancy.size:  # whole segments, from an empty ring up
            self.ring_plot.setYRange(0, max(1.0, float(occupancy.max())) + 0.5, padding=0)
        if accepted.size:
            self.accept_plot.setYRange(0, max(2.0, float(accepted.max())) + 0.5, padding=0)
        n = len(self.stage_busy)
        self.busy_bars.setOpts(x=np.arange(1, n + 1), height=np.asarray(self.stage_busy, dtype=float), width=0.6,
                               brushes=[DEVICE_COLOURS[i % len(DEVICE_COLOURS)] for i in range(n)])
        if n:
            self.busy_plot.setXRange(0.4, n + 0.6, padding=0)
            self.busy_plot.getAxis("bottom").setTicks([[(i + 1, f"stage {i + 1}") for i in range(n)]])
        if accepted.size:
            self.summary.setText(f"{self.tokens_per_s.values()[-1]:.1f} tok/s · mean accepted length "
                                 f"{mean[-1]:.2f} · {accepted.size} verifications")
