"""The devices panel and real agents on loopback: mDNS discovery, pairing from the window, loss."""

from __future__ import annotations

import pytest

from app.agents import AgentDevices
from app.bridge import EngineBridge
from app.models.device_list_model import DeviceListModel
from app.widgets.device_panel import DevicePanel
from tests.integration.agent_kit import AgentProcess

pytestmark = pytest.mark.integration

SEEN_MS = 20_000


def _state(model: DeviceListModel, name: str) -> str | None:
    return next((d.state for d in model.devices if d.name == name), None)


def test_device_list_follows_a_real_agent_on_loopback(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSPEC_CLIENT_DIR", str(tmp_path / "client"))
    model = DeviceListModel()
    panel = DevicePanel(model)
    qtbot.addWidget(panel)
    agents = AgentDevices(interfaces=["127.0.0.1"], mdns=True)
    agents.sig_devices_changed.connect(model.set_devices)
    bridge = EngineBridge()
    bridge.sig_paired.connect(agents.on_paired)
    bridge.start()
    agents.start()
    agent = AgentProcess(tmp_path / "agent-state", "kitchen-pc", mdns=True)
    try:
        agent.start()
        qtbot.waitUntil(lambda: _state(model, "kitchen-pc") == "unpaired", timeout=SEEN_MS)  # found by mDNS
        row = next(i for i, d in enumerate(model.devices) if d.name == "kitchen-pc")
        panel.table.selectRow(row)
        assert panel.pair_button.isEnabled()  # visible, but not usable until paired
        with qtbot.waitSignal(bridge.sig_paired, timeout=SEEN_MS):
            bridge.pair(agent.address, agent.code)
        qtbot.waitUntil(lambda: _state(model, "kitchen-pc") == "online", timeout=SEEN_MS)
        device = next(d for d in model.devices if d.name == "kitchen-pc")
        assert device.memory_total > 0 and device.address == agent.address and device.accelerator
        agent.stop()  # SIGTERM: the agent says goodbye on mDNS
        qtbot.waitUntil(lambda: _state(model, "kitchen-pc") in (None, "lost"), timeout=SEEN_MS)
    finally:
        agent.kill()
        agent.log.close()
        agents.close()
        bridge.close()


def test_a_wrong_pairing_code_is_shown(qtbot, tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWSPEC_CLIENT_DIR", str(tmp_path / "client"))
    bridge = EngineBridge()
    bridge.start()
    try:
        with AgentProcess(tmp_path / "agent-state", "garage-pc") as agent:
            with qtbot.waitSignal(bridge.sig_engine_error, timeout=SEEN_MS) as error:
                bridge.pair(agent.address, "ZZZZ-ZZZZ")
        assert "Pairing with" in error.args[0] and agent.address in error.args[0]
    finally:
        bridge.close()
