"""GenerationPanel: strategy, temperature, max tokens and draft-tree settings -> a SessionConfig."""

from __future__ import annotations

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QGroupBox, QLabel, QSpinBox,
                               QVBoxLayout, QWidget)

from engine.config import STRATEGIES, SamplingConfig, SessionConfig, SpeculationConfig

STRATEGY_LABELS = {
    "flowspec": "FlowSpec (pipelined tree)",
    "pipedec": "PipeDec (tree by levels)",
    "chunk": "Chunk PP (whole tree)",
    "ar": "Autoregressive",
}


class GenerationPanel(QWidget):
    # --- Signals
    sig_settings_changed = Signal(object)
    """The user changed a setting; the argument is the new SessionConfig."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.strategy = QComboBox()
        for name in STRATEGIES:
            self.strategy.addItem(STRATEGY_LABELS.get(name, name), name)
        self.temperature = _double(0.0, 2.0, 0.05, 2)
        self.temperature.setToolTip("0 = greedy. Above 0 the answer is sampled; speculation stays lossless.")
        self.max_tokens = _int(1, 4096)
        self.seed = _int(0, 2**31 - 1)
        self.topk = _int(1, 64)
        self.depth = _int(1, 16)
        self.budget = _int(0, 512)
        self.segment_max = _int(1, 256)
        self.expand = QCheckBox("Re-draft after each acceptance")
        self._build()
        self.set_config(SessionConfig())
        for widget in (self.strategy,):
            widget.currentIndexChanged.connect(self._emit)
        for widget in (self.temperature, self.max_tokens, self.seed, self.topk, self.depth, self.budget,
                       self.segment_max):
            widget.valueChanged.connect(self._emit)
        self.expand.toggled.connect(self._emit)

    def _build(self) -> None:
        title = QLabel("Generation")
        title.setObjectName("panelTitle")
        sampling = QGroupBox("Answer")
        form = QFormLayout(sampling)
        form.addRow("Strategy", self.strategy)
        form.addRow("Temperature", self.temperature)
        form.addRow("Max new tokens", self.max_tokens)
        form.addRow("Seed", self.seed)
        tree = QGroupBox("Draft tree")
        form2 = QFormLayout(tree)
        form2.addRow("Children per node", self.topk)
        form2.addRow("Depth", self.depth)
        form2.addRow("Draft tokens", self.budget)
        form2.addRow("Largest segment", self.segment_max)
        form2.addRow(self.expand)
        box = QVBoxLayout(self)
        box.setContentsMargins(10, 8, 10, 8)
        box.addWidget(title)
        box.addWidget(sampling)
        box.addWidget(tree)
        box.addStretch(1)

    def config(self) -> SessionConfig:
        spec = SpeculationConfig(topk=self.topk.value(), depth=self.depth.value(), budget=self.budget.value(),
                                 segment_max=self.segment_max.value(), expand=self.expand.isChecked())
        sampling = SamplingConfig(temperature=self.temperature.value(), seed=self.seed.value())
        return SessionConfig(strategy=self.strategy.currentData(), max_new_tokens=self.max_tokens.value(),
                             speculation=spec, sampling=sampling)

    def set_config(self, config: SessionConfig) -> None:
        widgets = (self.strategy, self.temperature, self.max_tokens, self.seed, self.topk, self.depth, self.budget,
                   self.segment_max, self.expand)
        for w in widgets:
            w.blockSignals(True)
        self.strategy.setCurrentIndex(max(0, self.strategy.findData(config.strategy)))
        self.temperature.setValue(config.sampling.temperature)
        self.max_tokens.setValue(config.max_new_tokens)
        self.seed.setValue(config.sampling.seed)
        self.topk.setValue(config.speculation.topk)
        self.depth.setValue(config.speculation.depth)
        self.budget.setValue(config.speculation.budget)
        self.segment_max.setValue(config.speculation.segment_max)
        self.expand.setChecked(config.speculation.expand)
        for w in widgets:
            w.blockSignals(False)

    def _emit(self, *args) -> None:
        self.sig_settings_changed.emit(self.config())


def _int(low: int, high: int) -> QSpinBox:
    box = QSpinBox()
    box.setRange(low, high)
    return box


def _double(low: float, high: float, step: float, decimals: int) -> QDoubleSpinBox:
    box = QDoubleSpinBox()
    box.setRange(low, high)
    box.setSingleStep(step)
    box.setDecimals(decimals)
    return box
