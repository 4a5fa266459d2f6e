"""Fixtures of the app's tests: offscreen Qt, a guard against QThreads left running, a tiny model.

The guard follows napari's `_dangling_qthreads`: every QThread.start is recorded with where it was
called, and a test fails if one of its threads still runs at teardown.
"""

from __future__ import annotations

import os
import traceback

os.environ["QT_QPA_PLATFORM"] = "offscreen"  # before any Qt import

import pytest
from PySide6.QtCore import QThread


@pytest.fixture(autouse=True)
def _no_dangling_qthreads(monkeypatch, qapp):
    started: list[tuple[QThread, str]] = []
    original = QThread.start

    def recording_start(self, *args, **kwargs):
        started.append((self, "".join(traceback.format_stack(limit=6)[:-1])))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(QThread, "start", recording_start)
    yield
    running = [where for thread, where in started if thread.isRunning()]
    for thread, _ in started:  # do not leave them behind for the next test either
        if thread.isRunning():
            thread.quit()
            thread.wait(5000)
    assert not running, "QThread still running after the test; started at:\n" + "\n".join(running)


@pytest.fixture(autouse=True)
def _isolated_config(tmp_path, monkeypatch):
    """Settings go to a temporary config directory, never the user's."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama (4 layers, fp32) with the tiny chat tokenizer; its LM head is sharpened so
    greedy answers fall into repeats that prompt lookup drafts well."""
    import torch

    from tests.tiny_models import make_tiny_model, make_tiny_tokenizer

    model = make_tiny_model("llama", n_layers=4, seed=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(12.0)
    out = tmp_path_factory.mktemp("app-tiny") / "tiny-chat-llama"
    model.save_pretrained(out)
    make_tiny_tokenizer().save_pretrained(out)
    return out
