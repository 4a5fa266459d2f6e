"""Chat panel, charts, device list and settings with real widgets (offscreen), no engine."""

from __future__ import annotations

import json

import pytest

from app.devices import DeviceInfo, local_worker_devices, with_state
from app.messages import AcceptedText
from app.models.device_list_model import DeviceListModel
from app.settings import AppSettings, ChatPreferences, load_settings, save_settings, settings_path
from app.widgets.charts_panel import ChartsPanel, RingBuffer
from app.widgets.chat_panel import ChatPanel
from app.widgets.device_panel import DevicePanel
from app.widgets.palette import DRAFT_HIGHLIGHT
from engine.events import RequestFinished, RequestId, StepStats


def _finished(text: str, n: int) -> RequestFinished:
    return RequestFinished(RequestId(1), text, tuple(range(n)), "eos", 1.0, 0.25, 12.5, 2.5, 3, 5, (0.4, 0.3))


def test_chat_streams_pieces_highlights_drafts_and_shows_stats(qtbot, tmp_path):
    chat = ChatPanel()
    qtbot.addWidget(chat)
    chat.set_ready(True)
    chat.highlight.setChecked(True)
    chat.prompt.setPlainText("Why is the sky blue?")
    with qtbot.waitSignal(chat.sig_prompt_submitted) as sent:
        chat.send_button.click()
    assert sent.args == ["Why is the sky blue?"]
    assert chat.stop_button.isEnabled() and not chat.send_button.isEnabled()
    chat.on_text_accepted(AcceptedText(RequestId(1), (("Rayleigh", False),), 1))
    chat.on_text_accepted(AcceptedText(RequestId(1), ((" scattering", True), (".", False)), 3))
    assert "Rayleigh scattering." in chat.transcript.toPlainText()
    chat.on_request_finished(_finished("Rayleigh scattering.", 4))
    assert DRAFT_HIGHLIGHT.lower() in chat.transcript.toHtml().lower()
    assert "TTFT 0.25 s" in chat.transcript.toPlainText() and "accepted 2.50 per verification" in chat.transcript.toPlainText()
    chat.highlight.setChecked(False)
    assert DRAFT_HIGHLIGHT.lower() not in chat.transcript.toHtml().lower()
    assert chat.send_button.isEnabled() and not chat.stop_button.isEnabled()
    chat.save_conversation(str(tmp_path / "c.json"))
    saved = json.loads((tmp_path / "c.json").read_text())
    assert [m["role"] for m in saved] == ["user", "assistant"] and saved[1]["content"] == "Rayleigh scattering."
    chat.save_conversation(str(tmp_path / "c.md"))
    assert "**Assistant:**" in (tmp_path / "c.md").read_text()


def test_a_cut_answer_keeps_its_text_and_continues_in_place(qtbot):
    chat = ChatPanel()
    qtbot.addWidget(chat)
    chat.add_user_message("hi")
    chat.on_text_accepted(AcceptedText(RequestId(1), (("Hel", False),), 1))
    chat.mark_cut("cut short: Device 2 was lost")
    assert "Hel" in chat.transcript.toPlainText() and "Device 2 was lost" in chat.transcript.toPlainText()
    chat.continue_answer()
    chat.on_text_accepted(AcceptedText(RequestId(2), (("lo", False),), 1))
    assert chat.conversation()[-1]["content"] == "Hello"
    assert "was lost" not in chat.transcript.toPlainText()


def _stats(k: int, n_stages: int = 2) -> StepStats:
    return StepStats(RequestId(1), 1 + k % 3, 4 * k, 0.1 * k, 10.0 + k, k % 4, tuple([0.5] * n_stages))


def test_charts_buffer_stats_and_redraw_on_the_timer_with_pause_and_reset(qtbot):
    charts = ChartsPanel()
    qtbot.addWidget(charts)
    for k in range(1, 21):
        charts.on_step_stats(_stats(k))
    assert charts.speed_curve.getData()[0] is None or len(charts.speed_curve.getData()[0]) == 0  # nothing drawn yet
    qtbot.waitUntil(lambda: charts.speed_curve.getData()[0] is not None and len(charts.speed_curve.getData()[0]) == 20,
                    timeout=2000)
    assert list(charts.speed_curve.getData()[1][-2:]) == [29.0, 30.0]
    assert list(charts.busy_bars.opts["height"]) == [0.5, 0.5]
    assert "mean accepted length" in charts.summary.text()
    charts.pause_button.click()
    charts.on_step_stats(_stats(21))
    qtbot.wait(250)
    assert len(charts.speed_curve.getData()[0]) == 20  # paused: data kept, not drawn
    charts.pause_button.click()
    assert len(charts.speed_curve.getData()[0]) == 21
    charts.reset_button.click()
    assert len(charts.x) == 0 and charts.summary.text() == "No answer yet."


def test_ring_buffer_keeps_the_newest_values_in_order():
    buffer = RingBuffer(4)
    for v in range(7):
        buffer.append(v)
    assert list(buffer.values()) == [3, 4, 5, 6] and len(buffer) == 4


def test_device_list_shows_state_memory_and_speed_and_checks_addresses(qtbot):
    model = DeviceListModel()
    panel = DevicePanel(model)
    qtbot.addWidget(panel)
    devices = local_worker_devices(2, memory_available=8 * 1024**3)
    model.set_devices(with_state(devices, "local-2", "lost"))
    assert model.rowCount() == 2
    assert [model.index(r, 2).data() for r in range(2)] == ["online", "lost"]
    assert model.index(0, 3).data() == "4.0 / 4.0 GiB" and model.index(0, 5).data() == "–"
    panel.address.setText("not an address")
    panel.add_button.click()
    assert "not host:port" in panel.message.text()
    with qtbot.waitSignal(panel.sig_add_requested) as added:
        panel.address.setText("192.168.1.20:5555")
        panel.add_button.click()
    assert added.args == ["192.168.1.20:5555"]
    unpaired = DeviceInfo("a1", "Jetson", "10.0.0.9:5555", "unpaired", source="mdns")
    model.set_devices((unpaired,))
    panel.table.selectRow(0)
    assert panel.pair_button.isEnabled()
    assert "pairing code" in model.index(0, 0).data(3)  # ToolTipRole


def test_settings_round_trip_and_a_corrupt_file_is_set_aside(tmp_path):
    path = settings_path()
    assert str(tmp_path) in str(path)  # the test fixture points the config dir at tmp_path
    settings = AppSettings(model="smollm2-135m", last_layout="n_layers = 2\n", chat=ChatPreferences(temperature=0.7))
    save_settings(settings)
    assert load_settings() == settings
    path.write_text("{broken")
    assert load_settings() == AppSettings()
    assert path.with_suffix(".json.bad").read_text() == "{broken"


@pytest.mark.parametrize("bad", ["[1, 2]", '{"chat": {"temperature": "hot", "unknown": 1}}'])
def test_settings_of_the_wrong_shape_do_not_crash(tmp_path, bad):
    settings_path().parent.mkdir(parents=True, exist_ok=True)
    settings_path().write_text(bad)
    assert isinstance(load_settings(), AppSettings)


def test_a_setting_of_the_wrong_type_falls_back_to_its_default(tmp_path):
    settings_path().parent.mkdir(parents=True, exist_ok=True)
    settings_path().write_text('{"model": 3, "chat": {"temperature": "hot", "max_new_tokens": 64, "topk": true}}')
    settings = load_settings()
    assert settings.model == "" and settings.chat.temperature == 0.0
    assert settings.chat.max_new_tokens == 64 and settings.chat.topk == 10


def test_agent_states_and_load_progress_lines():
    from app.agents import to_device_info
    from app.worker import _stage_fraction
    from engine.discovery import Device

    base = Device("ag-1", "10.0.0.5:5555", "mdns", "ag-1", "jetson", paired=True, memory_total=8, memory_free=4,
                  accelerator="CUDA", torch_device="cuda:0")
    assert to_device_info(base).state == "online" and to_device_info(base).accelerator == "CUDA (cuda:0)"
    assert to_device_info(Device("10.0.0.6:5555", "10.0.0.6:5555", "manual")).state == "unpaired"
    from dataclasses import replace

    assert to_device_info(replace(base, stage="layers 0-14")).state == "busy"
    assert to_device_info(replace(base, online=False)).state == "lost"
    assert _stage_fraction("stage 1/2 on a at b (layers 0-14): weights 5.0/10.0 MiB") == pytest.approx(0.45)
    assert _stage_fraction("stage 1/2 on a at b (layers 0-14) ready in 1.0 s") == 1.0
    assert _stage_fraction("stage 2/2: loading layers 4-7 ...") == 0.4
