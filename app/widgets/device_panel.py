"""DevicePanel: the devices that can run stages, with state, memory, accelerator and measured speed.

Agents found by mDNS appear on their own; "Add" takes a host:port for networks that block
multicast. An unpaired agent is listed but cannot be used until its pairing code is entered.
"""

from __future__ import annotations

import re

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (QAbstractItemView, QHBoxLayout, QHeaderView, QInputDialog, QLabel, QLineEdit,
                               QPushButton, QTableView, QVBoxLayout, QWidget)

from app.devices import DeviceInfo
from app.models.device_list_model import DeviceListModel, DeviceRole

_HOST_PORT = re.compile(r"^\[?[A-Za-z0-9_.:-]+\]?:\d{1,5}$")


class DevicePanel(QWidget):
    # --- Signals
    sig_add_requested = Signal(str)
    """The user typed a host:port to add an agent by address."""
    sig_pair_requested = Signal(str, str)
    """(device_id, pairing code) the user entered for an unpaired agent."""

    def __init__(self, model: DeviceListModel, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = model
        self.table = QTableView()
        self.table.setModel(model)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.verticalHeader().setVisible(False)
        self.table.setShowGrid(False)
        self.table.setAlternatingRowColors(True)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setStretchLastSection(True)
        self.address = QLineEdit()
        self.address.setPlaceholderText("host:port of an agent")
        self.add_button = QPushButton("Add")
        self.pair_button = QPushButton("Pair…")
        self.pair_button.setEnabled(False)
        self.message = QLabel("")
        self.message.setObjectName("muted")
        self.message.setWordWrap(True)
        self._build()
        self.add_button.clicked.connect(self._on_add_clicked)
        self.address.returnPressed.connect(self._on_add_clicked)
        self.pair_button.clicked.connect(self._on_pair_clicked)
        self.table.selectionModel().selectionChanged.connect(self._update_buttons)
        model.modelReset.connect(self._update_buttons)

    def _build(self) -> None:
        title = QLabel("Devices")
        title.setObjectName("panelTitle")
        top = QHBoxLayout()
        top.addWidget(title)
        top.addStretch(1)
        top.addWidget(self.pair_button)
        add = QHBoxLayout()
        add.addWidget(self.address, 1)
        add.addWidget(self.add_button)
        box = QVBoxLayout(self)
        box.setContentsMargins(10, 8, 10, 8)
        box.addLayout(top)
        box.addWidget(self.table, 1)
        box.addLayout(add)
        box.addWidget(self.message)

    def set_message(self, text: str) -> None:
        self.message.setText(text)

    def selected_device(self) -> DeviceInfo | None:
        rows = self.table.selectionModel().selectedRows()
        return self.model.data(rows[0], DeviceRole) if rows else None

    def _update_buttons(self, *args) -> None:
        device = self.selected_device()
        self.pair_button.setEnabled(device is not None and device.state == "unpaired")

    def _on_add_clicked(self) -> None:
        text = self.address.text().strip()
        if not _HOST_PORT.match(text):
            self.set_message(f"“{text}” is not host:port (for example 192.168.1.20:5555).")
            return
        self.address.clear()
        self.set_message(f"Adding {text} …")
        self.sig_add_requested.emit(text)

    def _on_pair_clicked(self) -> None:
        device = self.selected_device()
        if device is None:
            return
        code, ok = QInputDialog.getText(self, "Pair device",
                                        f"Enter the pairing code that {device.name} printed when it started:",
                                        QLineEdit.EchoMode.Normal)
        if ok and code.strip():
            self.sig_pair_requested.emit(device.device_id, code.strip())



