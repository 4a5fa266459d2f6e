"""LayoutEditor: the layer bar with device lanes, Suggest / Apply / Open / Save, and load progress."""

from __future__ import annotations

import logging
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QFileDialog, QGridLayout, QHBoxLayout, QLabel, QProgressBar, QPushButton,
                               QVBoxLayout, QWidget)

from app.layout_plan import suggest
from app.messages import LoadProgress
from app.models.layout_model import LayoutModel
from app.widgets.layout_canvas import LayoutCanvas
from engine.layout import Layout, LayoutError, load_layout, save_layout

logger = logging.getLogger(__name__)

LAYOUT_FILTER = "Layout files (*.toml);;All files (*)"


class LayoutEditor(QWidget):
    # --- Signals
    sig_apply_requested = Signal(object)
    """The user pressed Apply; the argument is the engine.layout.Layout to load."""
    sig_cancel_requested = Signal()
    """The user cancelled Apply while the stages load."""
    sig_layout_file_changed = Signal(str)
    """A layout was saved to or opened from this path (the window remembers it)."""

    def __init__(self, model: LayoutModel, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = model
        self.canvas = LayoutCanvas(model, self)
        self.title = QLabel("Layout")
        self.title.setObjectName("panelTitle")
        self.model_label = QLabel("no model")
        self.model_label.setObjectName("muted")
        self.suggest_button = QPushButton("Suggest")
        self.suggest_button.setToolTip("Split the layers over the online devices by measured speed and free memory")
        self.apply_button = QPushButton("Apply")
        self.apply_button.setObjectName("primary")
        self.apply_button.setToolTip("Load each stage's layers on its device")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setVisible(False)
        self.open_button = QPushButton("Open…")
        self.save_button = QPushButton("Save…")
        self.message = QLabel("")
        self.message.setWordWrap(True)
        self.message.setObjectName("message")
        self.message.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.progress_box = QWidget()
        self.progress_grid = QGridLayout(self.progress_box)
        self.progress_grid.setContentsMargins(0, 0, 0, 0)
        self.progress_box.setVisible(False)
        self._bars: dict[int, tuple[QLabel, QProgressBar]] = {}
        self._build()
        self.suggest_button.clicked.connect(self.suggest)
        self.apply_button.clicked.connect(self._on_apply_clicked)
        self.cancel_button.clicked.connect(self._on_cancel_clicked)
        self.open_button.clicked.connect(self._on_open_clicked)
        self.save_button.clicked.connect(self._on_save_clicked)
        model.sig_drop_refused.connect(self._on_drop_refused)
        model.sig_layout_changed.connect(self._on_layout_changed)
        model.modelReset.connect(self._refresh_labels)

    def _build(self) -> None:
        bar = QHBoxLayout()
        bar.addWidget(self.title)
        bar.addWidget(self.model_label)
        bar.addStretch(1)
        for button in (self.open_button, self.save_button, self.suggest_button, self.apply_button, self.cancel_button):
            bar.addWidget(button)
        box = QVBoxLayout(self)
        box.setContentsMargins(10, 8, 10, 8)
        box.addLayout(bar)
        hint = QLabel("Drag a stage (Shift+click to pick layers) onto another device's lane, in the same "
                      "columns; drag a handle on the ruler to move the boundary between two stages.")
        hint.setObjectName("muted")
        hint.setWordWrap(True)
        box.addWidget(hint)
        box.addWidget(self.canvas, 1)
        box.addWidget(self.message)
        box.addWidget(self.progress_box)

    # --- messages

    def show_message(self, text: str, kind: str = "info") -> None:
        """kind: "info", "error" or "ok"; the style sheet colours each."""
        self.message.setProperty("kind", kind)
        self.message.setText(text)
        self.message.style().unpolish(self.message)
        self.message.style().polish(self.message)

    def _on_drop_refused(self, reason: str) -> None:
        self.show_message(f"Refused: {reason}", "error")

    def _on_layout_changed(self, layout: Layout) -> None:
        counts = ", ".join(f"stage {i + 1}: {s.n_layers}" for i, s in enumerate(layout.stages))
        self.show_message(f"Layout valid ({counts} layers). Press Apply to load it.", "ok")

    def _refresh_labels(self) -> None:
        shape = self.model.shape
        if shape is not None:
            self.model_label.setText(f"{shape.name} · {shape.n_layers} layers · {shape.dtype}")
        self.canvas.updateGeometry()

    # --- actions

    def suggest(self) -> bool:
        if self.model.shape is None:
            self.show_message("The model is still being read; try again in a moment.", "info")
            return False
        try:
            suggestion = suggest(self.model.shape, self.model.devices)
        except LayoutError as error:
            self.show_message(f"Cannot suggest a layout: {error}", "error")
            return False
        if not self.model.set_layout(suggestion.layout):
            return False
        self.show_message(f"Suggested. {suggestion.reason}", "info")
        return True

    def open_layout_file(self, path: str) -> bool:
        try:
            layout = load_layout(path)
        except LayoutError as error:
            self.show_message(str(error), "error")
            return False
        if not self.model.set_layout(layout):
            return False
        self.show_message(f"Opened {path}.", "ok")
        self.sig_layout_file_changed.emit(path)
        return True

    def save_layout_file(self, path: str) -> bool:
        layout = self.model.layout
        if layout is None:
            self.show_message("There is no layout to save yet.", "error")
            return False
        if self.model.shape is not None and layout.model is None:
            from dataclasses import replace

            layout = replace(layout, model=self.model.shape.ref)
        try:
            save_layout(layout, path)
        except OSError as error:
            self.show_message(f"Cannot save {path}: {error.strerror or error}. Choose another folder.", "error")
            return False
        self.show_message(f"Saved {path}.", "ok")
        self.sig_layout_file_changed.emit(path)
        return True

    def _on_open_clicked(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open layout", str(Path.home()), LAYOUT_FILTER)
        if path:
            self.open_layout_file(path)

    def _on_save_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save layout", str(Path.home() / "layout.toml"), LAYOUT_FILTER)
        if path:
            self.save_layout_file(path)

    def _on_apply_clicked(self) -> None:
        if self.model.layout is None:
            self.show_message("There is no layout yet: press Suggest or open a layout file.", "error")
            return
        self.sig_apply_requested.emit(self.model.layout)

    def _on_cancel_clicked(self) -> None:
        self.cancel_button.setEnabled(False)
        self.show_message("Cancelling: the stages started so far are being shut down …", "info")
        self.sig_cancel_requested.emit()

    # --- load progress

    def begin_loading(self, layout: Layout) -> None:
        while self.progress_grid.count():
            item = self.progress_grid.takeAt(0)
            if item.widget() is not None:
                item.widget().deleteLater()
        self._bars.clear()
        for i, stage in enumerate(layout.stages):
            device = next((d for d in self.model.devices if d.device_id == stage.device_id), None)
            label = QLabel(f"Stage {i + 1} → {device.name if device else stage.device_id}")
            bar = QProgressBar()
            bar.setRange(0, 100)
            bar.setFormat("waiting")
            self.progress_grid.addWidget(label, i, 0)
            self.progress_grid.addWidget(bar, i, 1)
            self._bars[i] = (label, bar)
        self.progress_box.setVisible(True)
        self.apply_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.cancel_button.setVisible(True)
        self.show_message("Loading the stages …", "info")

    def on_load_progress(self, progress: LoadProgress) -> None:
        label_bar = self._bars.get(progress.stage_index)
        if label_bar is None:
            return
        bar = label_bar[1]
        bar.setValue(int(progress.fraction * 100))
        bar.setFormat(f"%p% · {progress.message[:60]}")

    def end_loading(self, ok: bool, message: str, kind: str | None = None) -> None:
        self.apply_button.setEnabled(True)
        self.cancel_button.setVisible(False)
        self.progress_box.setVisible(False)
        self.show_message(message, kind or ("ok" if ok else "error"))

    def bar_values(self) -> dict[int, int]:
        """Each stage's progress bar value (for tests and the status bar)."""
        return {i: bar.value() for i, (_, bar) in self._bars.items()}
