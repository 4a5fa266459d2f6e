"""AgentDevices: the devices panel's view of the agents that engine.discovery finds (mDNS + host:port).

Discovery runs its own worker thread and calls back there; the callback only emits a private
signal, which Qt queues to the GUI thread, where the registry snapshot is turned into
app.devices.DeviceInfo values. What Discovery cannot know on its own is kept here as an overlay:
the result of pairing from this window (paired, memory and accelerator from the agent's Hello)
and speeds measured by this app's generations.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from app.devices import DeviceInfo, DeviceState
from engine.layout import DeviceId

logger = logging.getLogger(__name__)


def to_device_info(device) -> DeviceInfo:
    """engine.discovery.Device -> DeviceInfo (an agent's state: lost, unpaired, busy or online)."""
    state: DeviceState
    if not device.online:
        state = "lost"
    elif not device.paired:
        state = "unpaired"
    else:
        state = "busy" if device.stage else "online"
    if device.accelerator in ("", "none") and device.torch_device in ("", "cpu"):
        accelerator = "CPU" if device.paired else "?"
    else:
        accelerator = device.accelerator or "?"
        if device.torch_device and device.torch_device not in accelerator:
            accelerator = f"{accelerator} ({device.torch_device})"
    return DeviceInfo(DeviceId(device.key), device.name or device.address, device.address, state,
                      device.memory_total, device.memory_free, accelerator, None, device.source)


class AgentDevices(QObject):
    # --- Signals
    sig_devices_changed = Signal(object)
    """tuple[DeviceInfo, ...]: every agent known now, in a stable order."""

    _sig_discovery_event = Signal(object)  # emitted on Discovery's thread, delivered on the GUI thread

    def __init__(self, interfaces: Sequence[str] | None = None, mdns: bool = True, keys_dir: Path | None = None,
                 parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._interfaces = list(interfaces) if interfaces is not None else None
        self._mdns = mdns
        self._keys_dir = keys_dir
        self._discovery = None
        self._paired: dict[str, DeviceInfo] = {}  # address -> what pairing and its Hello told
        self._speeds: dict[str, float] = {}
        self._lost: set[str] = set()  # device ids whose stage this app saw fail, until seen again
        self.devices: tuple[DeviceInfo, ...] = ()
        self._sig_discovery_event.connect(self._refresh)

    def start(self) -> None:
        """Start browsing; paired agents are also watched by address (they may be on another subnet)."""
        from engine.agent_client import AgentError, ClientKeys
        from engine.discovery import Discovery

        keys = ClientKeys(self._keys_dir) if self._keys_dir else ClientKeys()
        self._discovery = Discovery(on_event=self._sig_discovery_event.emit, interfaces=self._interfaces,
                                    mdns=self._mdns, keys=keys).start()
        try:
            for agent in keys.agents():
                self._discovery.add_manual(agent.address)
        except AgentError as error:
            logger.warning("%s", error)

    def close(self) -> None:
        if self._discovery is not None:
            self._discovery.close()
            self._discovery = None

    def add(self, address: str) -> None:
        """Watch host:port (ValueError if it is not host:port)."""
        if self._discovery is None:
            raise RuntimeError("device discovery is not running")
        self._discovery.add_manual(address)

    def on_paired(self, info: DeviceInfo) -> None:
        """Pairing from this window succeeded; ``info`` holds the agent's Hello."""
        self._paired[info.address] = info
        self._lost.discard(info.device_id)
        if self._discovery is not None:
            self._discovery.add_manual(info.address)
        self._refresh()

    def set_speeds(self, speeds: dict[str, float]) -> None:
        self._speeds.update(speeds)
        self._refresh()

    def mark_lost(self, device_id: str) -> None:
        self._lost.add(device_id)
        self._refresh()

    def mark_found(self, device_id: str) -> None:
        """The user says the device is back: stop showing it as lost."""
        self._lost.discard(device_id)
        self._refresh()

    def _refresh(self, event=None) -> None:
        if event is not None and type(event).__name__ in ("DeviceSeen", "DeviceUpdated") and event.device.online:
            self._lost.discard(event.device.key)
            self._lost.discard(event.device.agent_id)
        found = self._discovery.devices() if self._discovery is not None else ()
        devices = []
        for device in found:
            info = to_device_info(device)
            paired = self._paired.get(device.address)
            if paired is not None and info.state == "unpaired":
                info = replace(paired, source=info.source)
            if info.device_id in self._lost and info.state != "unpaired":
                info = replace(info, state="lost")
            devices.append(replace(info, ms_per_layer=self._speeds.get(info.device_id)))
        self.devices = tuple(devices)
        self.sig_devices_changed.emit(self.devices)
