"""The main window without a model load: engine errors shown in the window, Apply cancelled, settings kept."""

from __future__ import annotations

import pytest

from app.bridge import EngineBridge
from app.devices import local_worker_devices
from app.main_window import MainWindow
from app.messages import EnginePlan
from app.settings import AppSettings, load_settings
from engine.layout import DeviceId, Layout

pytestmark = pytest.mark.integration  # the engine thread imports torch


def test_an_unknown_model_is_reported_in_the_window(qtbot, tmp_path):
    window = MainWindow(EngineBridge(), AppSettings(), str(tmp_path / "no-such-model"), "fp32",
                        local_worker_devices(2, memory_available=8 * 1024**3))
    qtbot.addWidget(window)
    window.show()
    try:
        with qtbot.waitSignal(window.bridge.sig_engine_error, timeout=60_000):
            window.start()
        assert "Cannot open model" in window.editor.message.text()
        assert window.editor.message.property("kind") == "error"
        assert window.state_label.text().startswith("Error:")
    finally:
        window.close()


def test_apply_can_be_cancelled_and_settings_persist(qtbot, tiny_model_dir):
    window = MainWindow(EngineBridge(), AppSettings(), str(tiny_model_dir), "fp32",
                        local_worker_devices(2, memory_available=8 * 1024**3))
    qtbot.addWidget(window)
    window.show()
    states = []
    window.bridge.sig_engine_state.connect(lambda s: states.append(s.state))
    window.bridge.start()
    layout = Layout.split_even(4, [DeviceId("local-1"), DeviceId("local-2")])
    window.editor.begin_loading(layout)
    window.bridge.load(EnginePlan(str(tiny_model_dir), layout, "fp32"))
    window.editor.cancel_button.click()  # before the first stage starts
    qtbot.waitUntil(lambda: "idle" in states, timeout=60_000)
    assert "cancelled" in window.state_label.text().lower()
    assert window.editor.apply_button.isEnabled() and not window.editor.cancel_button.isVisible()
    window.generation.temperature.setValue(0.7)
    window.generation.max_tokens.setValue(77)
    window.chat.highlight.setChecked(False)
    window.close()
    saved = load_settings()
    assert saved.chat.temperature == 0.7 and saved.chat.max_new_tokens == 77 and not saved.chat.highlight_drafts
    assert saved.geometry and saved.model == str(tiny_model_dir)
    again = MainWindow(EngineBridge(), saved, str(tiny_model_dir), "fp32", ())
    qtbot.addWidget(again)
    assert again.session_config().sampling.temperature == 0.7 and again.session_config().max_new_tokens == 77
    assert not again.chat.highlight.isChecked()
    again.close()
