"""DeviceListModel: a Qt table model over an immutable tuple of app.devices.DeviceInfo."""

from __future__ import annotations

from collections.abc import Sequence

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QPersistentModelIndex, Qt
from PySide6.QtGui import QColor, QPainter, QPixmap

from app.devices import DeviceInfo, format_bytes
from app.widgets.palette import BAD, MUTED, OK, WARN

COLUMNS = ("Device", "Address", "State", "Memory free", "Accelerator", "ms/layer")
STATE_COLOURS = {"online": OK, "busy": WARN, "lost": BAD, "unpaired": MUTED}
DeviceRole = Qt.ItemDataRole.UserRole + 1

AnyIndex = QModelIndex | QPersistentModelIndex


_DOTS: dict[str, QPixmap] = {}


def _dot(colour: QColor) -> QPixmap:
    """A small filled circle in ``colour`` (the state badge)."""
    key = colour.name()
    if key not in _DOTS:
        pixmap = QPixmap(10, 10)
        pixmap.fill(QColor(0, 0, 0, 0))
        painter = QPainter(pixmap)
        painter.setRenderHint(QPainter.RenderHint.Antialiasing)
        painter.setBrush(colour)
        painter.setPen(QColor(0, 0, 0, 0))
        painter.drawEllipse(1, 1, 8, 8)
        painter.end()
        _DOTS[key] = pixmap
    return _DOTS[key]


class DeviceListModel(QAbstractTableModel):
    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self._devices: tuple[DeviceInfo, ...] = ()

    @property
    def devices(self) -> tuple[DeviceInfo, ...]:
        return self._devices

    def set_devices(self, devices: Sequence[DeviceInfo]) -> None:
        self.beginResetModel()
        self._devices = tuple(devices)
        self.endResetModel()

    def rowCount(self, parent: AnyIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self._devices)

    def columnCount(self, parent: AnyIndex = QModelIndex()) -> int:
        return 0 if parent.isValid() else len(COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation, role: int = Qt.ItemDataRole.DisplayRole):
        if role == Qt.ItemDataRole.DisplayRole and orientation == Qt.Orientation.Horizontal:
            return COLUMNS[section]
        return None

    def data(self, index: AnyIndex, role: int = Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        device = self._devices[index.row()]
        column = index.column()
        if role == DeviceRole:
            return device
        if role == Qt.ItemDataRole.DisplayRole:
            return self._text(device, column)
        if role == Qt.ItemDataRole.ForegroundRole and column == 2:
            return STATE_COLOURS.get(device.state, MUTED)
        if role == Qt.ItemDataRole.DecorationRole and column == 2:
            return _dot(STATE_COLOURS.get(device.state, MUTED))
        if role == Qt.ItemDataRole.ToolTipRole:
            return self._tooltip(device)
        if role == Qt.ItemDataRole.BackgroundRole and device.state == "lost":
            return QColor(214, 69, 65, 24)
        return None

    @staticmethod
    def _text(device: DeviceInfo, column: int) -> str:
        if column == 0:
            return device.name
        if column == 1:
            return device.address
        if column == 2:
            return device.state
        if column == 3:
            if not device.memory_total:
                return format_bytes(device.memory_free) if device.memory_free else "?"
            free, total = format_bytes(device.memory_free), format_bytes(device.memory_total)
            return f"{free.split()[0]} / {total}" if free.split()[1] == total.split()[1] else f"{free} / {total}"
        if column == 4:
            return device.accelerator
        return f"{device.ms_per_layer:.2f}" if device.ms_per_layer else "–"

    @staticmethod
    def _tooltip(device: DeviceInfo) -> str:
        how = {"local": "a stage worker process on this machine", "mdns": "found on the local network",
               "manual": "added by host:port"}[device.source]
        extra = " It must be paired (its pairing code) before it can run a stage." if device.state == "unpaired" else ""
        speed = (f" Measured {device.ms_per_layer:.2f} ms per layer per pipeline segment." if device.ms_per_layer
                 else " Speed not measured yet: it is measured while it runs a stage.")
        return f"{device.name} ({device.device_id}): {how}.{speed}{extra}"
