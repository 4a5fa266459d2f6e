"""LayoutCanvas: draws the model's layers as a bar and each device as a lane; drags go through LayoutModel.

- A stage is a coloured block in its device's lane, over the columns of its layers.
- Press on a block and drag: the stage's layers (or the Shift+click selection) travel as a layer
  range; drop them on another lane, in the same columns, to move them to that device.
- Drag a handle on the ruler: the boundary between two stages; drop it on another layer.
- Each lane shows the device's estimated memory against what it has free, green to red.
Every drop calls `LayoutModel.dropMimeData`, which accepts it or says why not.
"""

from __future__ import annotations

import json

from PySide6.QtCore import QModelIndex, QPoint, QRectF, QSize, Qt, Signal
from PySide6.QtGui import QBrush, QColor, QDrag, QFont, QPainter, QPen
from PySide6.QtWidgets import QSizePolicy, QWidget

from app.devices import format_bytes
from app.layout_plan import MIME_TYPE
from app.models.layout_model import LayoutModel
from app.widgets.palette import BAD, MUTED, device_colour, memory_colour

LANE_LABEL_W = 210
RULER_H = 30
LANE_H = 46
LANE_GAP = 6
HANDLE_HALF = 6


class LayoutCanvas(QWidget):
    sig_selection_changed = Signal(object)
    """(start, end) of the selected layer range, or None."""

    def __init__(self, model: LayoutModel, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = model
        self.setAcceptDrops(True)
        self.setMouseTracking(True)
        self.setMinimumHeight(RULER_H + LANE_H + 12)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self._press: QPoint | None = None
        self._press_target: dict | None = None
        self._selection: tuple[int, int, int] | None = None  # (lane, start, end)
        self._hover_drop: tuple[int, int] | None = None  # (lane, column) under a drag
        self._drawn_layout = None
        model.modelReset.connect(self._on_model_reset)

    def sizeHint(self) -> QSize:
        lanes = max(1, self.model.rowCount())
        return QSize(720, RULER_H + lanes * (LANE_H + LANE_GAP) + 8)

    # --- geometry

    def _n_layers(self) -> int:
        return self.model.columnCount()

    def _cell_w(self) -> float:
        return (self.width() - LANE_LABEL_W - 12) / max(1, self._n_layers())

    def _x(self, column: float) -> float:
        return LANE_LABEL_W + column * self._cell_w()

    def _lane_rect(self, lane: int) -> QRectF:
        top = RULER_H + lane * (LANE_H + LANE_GAP)
        return QRectF(LANE_LABEL_W, top, self._n_layers() * self._cell_w(), LANE_H)

    def column_at(self, x: float) -> int:
        return max(0, min(self._n_layers() - 1, int((x - LANE_LABEL_W) // max(1e-6, self._cell_w()))))

    def boundary_at(self, x: float) -> int:
        """The layer nearest to x where a boundary may sit (1 .. n_layers - 1)."""
        return max(1, min(self._n_layers() - 1, round((x - LANE_LABEL_W) / max(1e-6, self._cell_w()))))

    def lane_at(self, y: float) -> int | None:
        if y < RULER_H:
            return None
        lane = int((y - RULER_H) // (LANE_H + LANE_GAP))
        return lane if lane < self.model.rowCount() else None

    def _handle_at(self, pos: QPoint) -> int | None:
        layout = self.model.layout
        if layout is None or pos.y() > RULER_H:
            return None
        for i, stage in enumerate(layout.stages[:-1]):
            if abs(pos.x() - self._x(stage.end)) <= HANDLE_HALF + 2:
                return i
        return None

    # --- painting

    def paintEvent(self, event) -> None:
        p = QPainter(self)
        p.setRenderHint(QPainter.RenderHint.Antialiasing)
        p.fillRect(self.rect(), self.palette().base())
        if self.model.shape is None:
            p.setPen(MUTED)
            p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, "Reading the model …")
            return
        self._paint_ruler(p)
        needs = self.model.needs()
        for lane in range(self.model.rowCount()):
            self._paint_lane(p, lane, needs)
        p.end()

    def _paint_ruler(self, p: QPainter) -> None:
        n = self._n_layers()
        step = next(s for s in (1, 2, 4, 5, 8, 10, 16, 20, 32, 50, 64, 100) if s * self._cell_w() >= 26 or s == 100)
        font = QFont(self.font())
        font.setPointSizeF(max(7.0, font.pointSizeF() - 1.5))
        p.setFont(font)
        p.setPen(MUTED)
        p.drawText(QRectF(8, 0, LANE_LABEL_W - 16, RULER_H), Qt.AlignmentFlag.AlignVCenter, "layer")
        for layer in range(0, n, step):
            p.drawText(QRectF(self._x(layer), 2, max(26.0, self._cell_w() * step), RULER_H - 10),
                       Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignVCenter, str(layer))
        p.drawLine(int(self._x(0)), RULER_H - 6, int(self._x(n)), RULER_H - 6)
        layout = self.model.layout
        if layout is None:
            return
        for stage in layout.stages[:-1]:  # boundary handles
            x = self._x(stage.end)
            p.setBrush(QColor("#2B2F36"))
            p.setPen(Qt.PenStyle.NoPen)
            p.drawRoundedRect(QRectF(x - HANDLE_HALF, RULER_H - 14, 2 * HANDLE_HALF, 12), 3, 3)

    def _paint_lane(self, p: QPainter, lane: int, needs: dict[str, int]) -> None:
        device = self.model.lane_device(lane)
        rect = self._lane_rect(lane)
        colour = device_colour(lane)
        base = QColor(colour)
        base.setAlpha(28)
        p.setPen(Qt.PenStyle.NoPen)
        p.setBrush(base if device.usable else QColor(0, 0, 0, 18))
        p.drawRoundedRect(rect, 6, 6)
        self._paint_label(p, lane, device, needs.get(device.device_id, 0))
        if self._hover_drop is not None and self._hover_drop[0] == lane:
            p.setBrush(QColor(colour.red(), colour.green(), colour.blue(), 60))
            p.drawRoundedRect(rect.adjusted(-2, -2, 2, 2), 7, 7)
        layout = self.model.layout
        if layout is None:
            return
        for i, stage in enumerate(layout.stages):
            if stage.device_id != device.device_id:
                continue
            block = QRectF(self._x(stage.start) + 1, rect.top() + 4, stage.n_layers * self._cell_w() - 2, LANE_H - 8)
            p.setBrush(colour if device.usable else QColor("#B8BEC8"))
            p.setPen(QPen(colour.darker(130), 1))
            p.drawRoundedRect(block, 5, 5)
            p.setPen(QColor("white"))
            text = f"Stage {i + 1} · layers {stage.start}–{stage.end - 1}"
            if p.fontMetrics().horizontalAdvance(text) > block.width() - 8:
                text = f"{i + 1}" if p.fontMetrics().horizontalAdvance(f"S{i + 1}") > block.width() - 4 else f"S{i + 1}"
            p.drawText(block, Qt.AlignmentFlag.AlignCenter, text)
        if self._selection is not None and self._selection[0] == lane:
            _, a, b = self._selection
            p.setBrush(Qt.BrushStyle.NoBrush)
            p.setPen(QPen(QColor("#1B1F24"), 2, Qt.PenStyle.DashLine))
            p.drawRoundedRect(QRectF(self._x(a) + 1, rect.top() + 2, (b - a) * self._cell_w() - 2, LANE_H - 4), 5, 5)

    def _paint_label(self, p: QPainter, lane: int, device, need: int) -> None:
        top = RULER_H + lane * (LANE_H + LANE_GAP)
        p.setBrush(device_colour(lane))
        p.setPen(Qt.PenStyle.NoPen)
        p.drawEllipse(QRectF(8, top + 8, 10, 10))
        p.setPen(self.palette().text().color())
        bold = QFont(self.font())
        bold.setBold(True)
        p.setFont(bold)
        name = p.fontMetrics().elidedText(device.name, Qt.TextElideMode.ElideRight, LANE_LABEL_W - 90)
        p.drawText(QRectF(24, top + 2, LANE_LABEL_W - 90, 22), Qt.AlignmentFlag.AlignVCenter, name)
        p.setFont(self.font())
        state_colour = BAD if not device.usable else MUTED
        p.setPen(state_colour)
        p.drawText(QRectF(LANE_LABEL_W - 70, top + 2, 60, 22), Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter,
                   device.state)
        free = max(1, device.memory_free)
        fraction = need / free
        bar = QRectF(24, top + 28, LANE_LABEL_W - 44, 10)
        p.setPen(Qt.PenStyle.NoPen)
        p.setBrush(QColor(0, 0, 0, 30))
        p.drawRoundedRect(bar, 4, 4)
        p.setBrush(QBrush(memory_colour(fraction)))
        p.drawRoundedRect(QRectF(bar.left(), bar.top(), bar.width() * min(1.0, fraction), bar.height()), 4, 4)
        small = QFont(self.font())
        small.setPointSizeF(max(7.0, small.pointSizeF() - 2))
        p.setFont(small)
        p.setPen(MUTED)
        free_text = f"{format_bytes(device.memory_free)} free" if device.memory_free else "memory unknown"
        p.drawText(QRectF(24, top + 37, LANE_LABEL_W - 44, 12), Qt.AlignmentFlag.AlignLeft,
                   f"{format_bytes(need)} of {free_text}")
        p.setFont(self.font())

    # --- mouse: select and start drags

    def mousePressEvent(self, event) -> None:
        pos = event.position().toPoint()
        self._press = pos
        handle = self._handle_at(pos)
        if handle is not None:
            self._press_target = {"kind": "boundary", "stage": handle}
            return
        lane = self.lane_at(pos.y())
        self._press_target = None
        if lane is None or self.model.layout is None or pos.x() < LANE_LABEL_W:
            return
        column = self.column_at(pos.x())
        stage = self.model.stage_at(lane, column)
        if stage is None:
            self._set_selection(None)
            return
        s = self.model.layout.stages[stage]
        sel = self._selection
        if event.modifiers() & Qt.KeyboardModifier.ShiftModifier and sel is not None and sel[0] == lane:
            a, b = min(sel[1], column), max(sel[2], column + 1)
            if all(self.model.stage_at(lane, c) is not None for c in range(a, b)):
                self._set_selection((lane, a, b))
        elif sel is None or sel[0] != lane or not sel[1] <= column < sel[2]:
            self._set_selection((lane, s.start, s.end))
        _, a, b = self._selection
        self._press_target = {"kind": "range", "start": a, "end": b, "offset": column - a}

    def mouseMoveEvent(self, event) -> None:
        pos = event.position().toPoint()
        over_handle = self._handle_at(pos) is not None
        self.setCursor(Qt.CursorShape.SplitHCursor if over_handle else Qt.CursorShape.ArrowCursor)
        if self._press is None or self._press_target is None:
            return
        if (pos - self._press).manhattanLength() < 6:
            return
        target, self._press_target, self._press = self._press_target, None, None
        mime = (self.model.boundary_mime_data(target["stage"]) if target["kind"] == "boundary"
                else self.model.range_mime_data(target["start"], target["end"]))
        if target["kind"] == "range":
            payload = json.loads(bytes(mime.data(MIME_TYPE).data()))
            payload["offset"] = target["offset"]
            mime.setData(MIME_TYPE, json.dumps(payload, sort_keys=True).encode("utf-8"))
        drag = QDrag(self)
        drag.setMimeData(mime)
        drag.exec(Qt.DropAction.MoveAction)
        self._hover_drop = None
        self.update()

    def mouseReleaseEvent(self, event) -> None:
        self._press = None
        self._press_target = None

    def _set_selection(self, selection) -> None:
        self._selection = selection
        self.sig_selection_changed.emit(None if selection is None else selection[1:])
        self.update()

    def _on_model_reset(self) -> None:
        if self.model.layout != self._drawn_layout:  # device updates (memory, state) keep the selection
            self._selection = None
            self._drawn_layout = self.model.layout
        self.setMinimumHeight(self.sizeHint().height())
        self.updateGeometry()
        self.update()

    # --- drops

    def dragEnterEvent(self, event) -> None:
        if event.mimeData().hasFormat(MIME_TYPE):
            event.acceptProposedAction()

    def dragMoveEvent(self, event) -> None:
        pos = event.position()
        lane = self.lane_at(pos.y())
        self._hover_drop = None if lane is None else (lane, self.column_at(pos.x()))
        self.update()
        event.acceptProposedAction()

    def dragLeaveEvent(self, event) -> None:
        self._hover_drop = None
        self.update()

    def dropEvent(self, event) -> None:
        self._hover_drop = None
        self.drop_at(event.mimeData(), event.position().x(), event.position().y())
        event.acceptProposedAction()
        self.update()

    def drop_at(self, mime, x: float, y: float) -> bool:
        """Hand a drop at widget point (x, y) to the model: lane from y, layer column from x."""
        try:
            payload = json.loads(bytes(mime.data(MIME_TYPE).data()))
        except ValueError:
            payload = {}
        lane = self.lane_at(y)
        if isinstance(payload, dict) and payload.get("kind") == "boundary":
            column, lane = self.boundary_at(x), (lane if lane is not None else 0)
        else:
            column = self.column_at(x) - int(payload.get("offset", 0) if isinstance(payload, dict) else 0)
            if lane is None:
                lane = -1
        return self.model.dropMimeData(mime, Qt.DropAction.MoveAction, lane, column, QModelIndex())

    def cell_center(self, lane: int, column: float) -> QPoint:
        """Widget point at the middle of layer ``column`` in ``lane`` (tests and keyboard moves use it)."""
        rect = self._lane_rect(lane)
        return QPoint(int(self._x(column) + self._cell_w() / 2), int(rect.center().y()))

    def boundary_point(self, layer: int) -> QPoint:
        return QPoint(int(self._x(layer)), RULER_H - 8)


