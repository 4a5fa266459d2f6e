"""LayoutModel: a Qt table model around one engine.layout.Layout (rows = device lanes, columns = layers).

Drag-and-drop goes through the model, as napari's list model does: `mimeData` encodes which layer
range or which stage boundary is dragged under a custom MIME type (JSON, never pickle), and
`dropMimeData` turns a drop into a pure call from app/layout_plan.py. A drop that would not give a
valid layout returns False and emits sig_drop_refused with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from PySide6.QtCore import QAbstractTableModel, QByteArray, QMimeData, QModelIndex, QPersistentModelIndex, Qt, Signal

from app.devices import DeviceInfo
from app.layout_plan import (MIME_TYPE, ModelShape, apply_drop, check_devices, decode_drag, device_needs,
                             encode_drag)
from engine.layout import DeviceId, Layout, LayoutError

logger = logging.getLogger(__name__)

StageRole = Qt.ItemDataRole.UserRole + 1
"""data(index, StageRole): the 0-based stage index that runs this layer on this lane, or None."""

AnyIndex = QModelIndex | QPersistentModelIndex


class LayoutModel(QAbstractTableModel):
    # --- Signals
    sig_layout_changed = Signal(object)
    """A new valid engine.layout.Layout (never a partial edit)."""
    sig_drop_refused = Signal(str)
    """A drop or edit was refused; the argument says why, for the user."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._layout: Layout | None = None
        self._shape: ModelShape | None = None
        self._devices: tuple[DeviceInfo, ...] = ()

    # --- values

    @property
    def layout(self) -> Layout | None:
        return self._layout

    @property
    def shape(self) -> ModelShape | None:
        return self._shape

    @property
    def devices(self) -> tuple[DeviceInfo, ...]:
        return self._devices

    def set_shape(self, shape: ModelShape) -> None:
        self.beginResetModel()
        self._shape = shape
        if self._layout is not None and self._layout.n_layers != shape.n_layers:
            self._layout = None
        self.endResetModel()

    def set_devices(self, devices: Sequence[DeviceInfo]) -> None:
        """Lanes follow the device list; a device running a stage keeps its lane even when lost."""
        if tuple(devices) == self._devices:
            return
        self.beginResetModel()
        self._devices = tuple(devices)
        self.endResetModel()

    def set_layout(self, layout: Layout, check: bool = True) -> bool:
        """Replace the layout; with ``check``, refuse (False + sig_drop_refused) one the devices cannot run."""
        try:
            if self._shape is not None and layout.n_layers != self._shape.n_layers:
                raise LayoutError(f"This layout is for a model of {layout.n_layers} layers, but "
                                  f"{self._shape.name} has {self._shape.n_layers}: open a layout made for it.")
            if check and self._shape is not None:
                check_devices(layout, self._shape, self._devices)
        except LayoutError as error:
            self.sig_drop_refused.emit(str(error))
            return False
        self.beginResetModel()
        self._layout = layout
        self.endResetModel()
        self.sig_layout_changed.emit(layout)
        return True

    def lane_device(self, row: int) -> DeviceInfo | None:
        return self._devices[row] if 0 <= row < len(self._devices) else None

    def needs(self) -> dict[str, int]:
        """Estimated bytes per device for the current layout."""
        if self._layout is None or self._shape is None:
            return {}
        return device_needs(self._layout, self._shape)

    # --- Qt table model

    def rowCount(self, parent: AnyIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self._devices)

    def columnCount(self, parent: AnyIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() or self._shape is None else self._shape.n_layers

    def stage_at(self, row: int, column: int) -> int | None:
        """The stage index running layer ``column`` on lane ``row``, or None."""
        device = self.lane_device(row)
        if self._layout is None or device is None:
            return None
        for i, stage in enumerate(self._layout.stages):
            if stage.start <= column < stage.end:
                return i if stage.device_id == device.device_id else None
        return None

    def data(self, index: AnyIndex, role: int = Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        stage = self.stage_at(index.row(), index.column())
        if role == StageRole:
            return stage
        if role == Qt.ItemDataRole.DisplayRole:
            return None if stage is None else f"{stage + 1}"
        if role == Qt.ItemDataRole.ToolTipRole and stage is not None:
            s = self._layout.stages[stage]
            return f"Stage {stage + 1}: layers {s.start}-{s.end - 1} on {self._devices[index.row()].name}"
        return None

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole):
        if role != Qt.ItemDataRole.DisplayRole:
            return None
        if orientation == Qt.Orientation.Horizontal:
            return str(section)
        device = self.lane_device(section)
        return device.name if device else None

    def flags(self, index: AnyIndex) -> Qt.ItemFlag:
        base = Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsDropEnabled
        if index.isValid() and self.stage_at(index.row(), index.column()) is not None:
            base |= Qt.ItemFlag.ItemIsSelectable | Qt.ItemFlag.ItemIsDragEnabled
        return base

    def supportedDropActions(self) -> Qt.DropAction:
        return Qt.DropAction.MoveAction

    def supportedDragActions(self) -> Qt.DropAction:
        return Qt.DropAction.MoveAction

    def mimeTypes(self) -> list[str]:
        return [MIME_TYPE]

    def mimeData(self, indexes: Sequence[AnyIndex]) -> QMimeData | None:
        """The layer range covered by ``indexes`` (their lowest to highest column)."""
        columns = [i.column() for i in indexes if i.isValid()]
        if not columns:
            return None
        return self.range_mime_data(min(columns), max(columns) + 1)

    def range_mime_data(self, start: int, end: int) -> QMimeData:
        return self._mime({"kind": "range", "start": start, "end": end})

    def boundary_mime_data(self, stage: int) -> QMimeData:
        """Dragging the boundary where stage ``stage`` (0-based) ends and the next one begins."""
        return self._mime({"kind": "boundary", "stage": stage})

    def _mime(self, payload: dict) -> QMimeData:
        mime = QMimeData()
        mime.setData(MIME_TYPE, QByteArray(encode_drag(payload)))
        return mime

    def canDropMimeData(self, data: QMimeData, action: Qt.DropAction, row: int, column: int,
                        parent: AnyIndex) -> bool:
        return data.hasFormat(MIME_TYPE) and self._layout is not None

    def dropMimeData(self, data: QMimeData, action: Qt.DropAction, row: int, column: int,
                     parent: AnyIndex) -> bool:
        """Drop on lane ``parent.row()`` (or ``row``) at layer ``parent.column()`` (or ``column``)."""
        if action == Qt.DropAction.IgnoreAction:
            return True
        if not data.hasFormat(MIME_TYPE) or self._layout is None or self._shape is None:
            self.sig_drop_refused.emit("Nothing to drop there: open a model and a layout first.")
            return False
        lane, at = (parent.row(), parent.column()) if parent.isValid() else (row, column)
        device = self.lane_device(lane)
        try:
            payload = decode_drag(bytes(data.data(MIME_TYPE).data()))
            new = apply_drop(self._layout, payload, DeviceId(device.device_id) if device else None, at,
                             self._shape, self._devices)
        except LayoutError as error:
            logger.info("drop refused: %s", error)
            self.sig_drop_refused.emit(str(error))
            return False
        self.beginResetModel()
        self._layout = new
        self.endResetModel()
        self.sig_layout_changed.emit(new)
        return True
