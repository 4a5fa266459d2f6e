"""Real agents on loopback: the device list (mDNS, pairing from the window, a wrong code, loss) and
`flowspec-studio --local-agents 2` loading a model on agents it starts and pairs itself."""

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
        with qtbot.waitSignal(bridge.sig_engine_error, timeout=SEEN_MS) as error:
            bridge.pair(agent.address, "ZZZZ-ZZZZ")
        assert "Pairing with" in error.args[0] and agent.address in error.args[0]
        assert _state(model, "kitchen-pc") == "unpaired"
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


def test_local_agents_start_pair_load_answer_and_stop_with_the_window(qtbot, tmp_path, monkeypatch, tiny_model_dir):
    import psutil

    from app.main_window import MainWindow
    from app.settings import AppSettings

    monkeypatch.setenv("FLOWSPEC_CLIENT_DIR", str(tmp_path / "client"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    window = MainWindow(EngineBridge(), AppSettings(), str(tiny_model_dir), "fp32", (), auto_apply=True,
                        agents=AgentDevices(mdns=False), local_agents=2)
    qtbot.addWidget(window)
    window.show()
    try:
        with qtbot.waitSignal(window.bridge.sig_engine_ready, timeout=120_000) as ready:
            window.start()
        assert ready.args[0].plan.on_agents
        assert sorted(s.device_id for s in window.layout_model.layout.stages) == sorted(
            d.device_id for d in window.devices)
        assert [d.name for d in window.devices] == ["local-1", "local-2"] and len(window.local_agent_pids) == 2
        window.generation.max_tokens.setValue(8)
        window.chat.prompt.setPlainText("hello")
        with qtbot.waitSignal(window.bridge.sig_request_finished, timeout=120_000) as done:
            window.chat.send_button.click()
        assert window.chat.conversation()[-1]["content"] == done.args[0].text
    finally:
        pids = window.local_agent_pids
        window.close()
    for pid in pids:  # the agents stop with the window
        try:
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            pass
