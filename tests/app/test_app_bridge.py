"""The bridge drives a real engine (tiny model, local stage processes) on its worker thread."""

from __future__ import annotations

import pytest

from app.bridge import EngineBridge
from app.messages import EnginePlan
from engine.config import SessionConfig
from engine.layout import DeviceId, Layout

pytestmark = pytest.mark.integration


def test_chat_streams_through_the_bridge(qtbot, tiny_model_dir):
    bridge = EngineBridge()
    bridge.start()
    try:
        with qtbot.waitSignal(bridge.sig_model_inspected, timeout=30_000) as shape:
            bridge.inspect_model(str(tiny_model_dir), "fp32")
        assert shape.args[0].n_layers == 4
        layout = Layout.split_even(4, [DeviceId("local-1"), DeviceId("local-2")])
        with qtbot.waitSignal(bridge.sig_engine_ready, timeout=60_000):
            bridge.load(EnginePlan(str(tiny_model_dir), layout, "fp32"))
        texts = []
        bridge.sig_text_accepted.connect(lambda ev: texts.append(ev))
        stats = []
        bridge.sig_step_stats.connect(stats.append)
        with qtbot.waitSignal(bridge.sig_request_finished, timeout=60_000) as done:
            bridge.submit("hello world", SessionConfig(max_new_tokens=40))
        finished = done.args[0]
        assert "".join(t.text for t in texts) == finished.text
        assert sum(t.n_tokens for t in texts) == len(finished.token_ids)
        assert stats and stats[-1].tokens_so_far <= len(finished.token_ids)
    finally:
        bridge.close()
    assert not bridge.running
