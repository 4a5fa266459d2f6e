"""The whole window on a real engine: a tiny model on two local stage processes.

One scenario (each ring start costs seconds of CPU): Apply loads the stages with per-stage
progress, a prompt streams into the chat through the bridge, the charts receive the stats and
draw them, the devices get measured speeds, Stop ends an answer early; then a stage process is
killed mid-answer, the banner names the lost device, the partial answer stays, and "Re-plan and
continue" finishes the answer on the remaining device.
"""

from __future__ import annotations

import os
import signal

import pytest

from app.bridge import EngineBridge
from app.devices import local_worker_devices
from app.main_window import MainWindow
from app.settings import AppSettings, load_settings
from engine.layout import Layout

pytestmark = pytest.mark.integration

LOAD_MS = 120_000
ANSWER_MS = 120_000


def test_chat_charts_stage_loss_and_replan(qtbot, tiny_model_dir):
    devices = local_worker_devices(2, memory_available=8 * 1024**3)
    window = MainWindow(EngineBridge(), AppSettings(), str(tiny_model_dir), "fp32", devices, auto_apply=True)
    qtbot.addWidget(window)
    window.show()
    ready_events, progress = [], []
    window.bridge.sig_engine_ready.connect(ready_events.append)
    window.bridge.sig_load_progress.connect(progress.append)
    try:
        with qtbot.waitSignal(window.bridge.sig_engine_ready, timeout=LOAD_MS):
            window.start()
        assert window.layout_model.layout.layer_counts == (2, 2)
        assert {p.stage_index for p in progress} == {0, 1} and all(v == 100 for v in window.editor.bar_values().values())
        assert [d.state for d in window.devices] == ["busy", "busy"]

        # a prompt streams through the bridge into the chat; the charts and the devices get stats
        texts = []
        window.bridge.sig_text_accepted.connect(texts.append)
        window.generation.max_tokens.setValue(40)
        window.chat.prompt.setPlainText("hello world")
        with qtbot.waitSignal(window.bridge.sig_request_finished, timeout=ANSWER_MS) as done:
            window.chat.send_button.click()
        finished = done.args[0]
        assert len(texts) > 1 and "".join(t.text for t in texts) == finished.text
        assert window.chat.conversation()[-1]["content"] == finished.text
        assert "tok/s" in window.chat.conversation()[-1]["stats"]
        def drawn() -> int:
            x = window.charts.speed_curve.getData()[0]
            return 0 if x is None else len(x)

        qtbot.waitUntil(lambda: drawn() == len(window.charts.x) > 0, timeout=2000)
        assert len(window.charts.busy_bars.opts["height"]) == 2
        qtbot.waitUntil(lambda: all(d.ms_per_layer for d in window.devices), timeout=2000)

        # Stop ends an answer early and keeps what was accepted
        def stop_once(event):
            if event.text and window.chat.stop_button.isEnabled():
                window.chat.stop_button.click()

        window.bridge.sig_text_accepted.connect(stop_once)
        window.generation.max_tokens.setValue(150)
        window.chat.prompt.setPlainText("hello")
        with qtbot.waitSignal(window.bridge.sig_request_finished, timeout=ANSWER_MS) as stopped:
            window.chat.send_button.click()
        window.bridge.sig_text_accepted.disconnect(stop_once)
        assert stopped.args[0].stopped_by == "cancelled" and len(stopped.args[0].token_ids) < 150
        assert window.chat.conversation()[-1]["content"] == stopped.args[0].text
        qtbot.waitUntil(lambda: window.chat.send_button.isEnabled(), timeout=5000)

        # stage 2's process dies mid-answer
        texts.clear()
        window.generation.max_tokens.setValue(150)
        killed = []

        def kill_stage_two(event):
            if not killed and event.text:  # once some text is on screen
                killed.append(ready_events[-1].pids[1])
                os.kill(killed[0], signal.SIGKILL)

        window.bridge.sig_text_accepted.connect(kill_stage_two)
        window.chat.prompt.setPlainText("hello there")
        with qtbot.waitSignal(window.bridge.sig_stage_lost, timeout=ANSWER_MS) as lost:
            window.chat.send_button.click()
        window.bridge.sig_text_accepted.disconnect(kill_stage_two)
        report = lost.args[0]
        assert report.stage_index == 1 and report.device_id == "local-2" and report.partial_ids
        assert window.banner.isVisible() and "Local worker 2" in window.banner.text.text()
        assert [d.state for d in window.devices] == ["online", "lost"]
        partial = window.chat.conversation()[-1]
        assert partial["content"] and "was lost" in partial["note"]
        assert len(window.chat.conversation()) == 6  # every question and answer is kept

        # re-plan onto the remaining device and continue the same answer
        with qtbot.waitSignal(window.bridge.sig_request_finished, timeout=LOAD_MS + ANSWER_MS) as done:
            window.banner.replan_button.click()
        assert [(s.device_id, s.start, s.end) for s in window.layout_model.layout.stages] == [("local-1", 0, 4)]
        whole = window.chat.conversation()[-1]["content"]
        assert whole.startswith(partial["content"]) and len(whole) > len(partial["content"])
        assert done.args[0].text == whole
        assert len(done.args[0].token_ids) <= 150
        assert not window.banner.isVisible()
    finally:
        window.close()
    assert not window.bridge.running
    last = Layout.from_text(load_settings().last_layout)  # the layout applied last is remembered
    assert [(s.device_id, s.start, s.end) for s in last.stages] == [("local-1", 0, 4)]
