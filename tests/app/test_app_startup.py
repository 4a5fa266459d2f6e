"""The window shows before torch or transformers are imported; `flowspec-studio` parses its flags."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SHOW_WINDOW = textwrap.dedent("""
    import sys, time
    t0 = time.monotonic()
    from PySide6.QtWidgets import QApplication
    import app.main
    from app.resources import resource_path
    qt_app = QApplication([])
    qt_app.setStyleSheet(resource_path("style.qss").read_text(encoding="utf-8"))
    window = app.main.build_window(app.main.build_parser().parse_args(["--model", "smollm2-135m"]))
    window.show()
    qt_app.processEvents()
    shown = time.monotonic() - t0
    heavy = sorted(m for m in ("torch", "transformers", "zmq", "zeroconf") if m in sys.modules)
    assert window.isVisible()
    assert not heavy, f"imported before the window showed: {heavy}"
    assert not window.bridge.running, "the engine thread starts only after the window shows"
    print(f"window shown {shown:.2f} s after the interpreter started the script")
    window.close()
    del window  # widgets go before the QApplication, or Qt's teardown may crash
    import gc
    gc.collect()
""")


def test_window_shows_before_torch_is_imported(tmp_path):
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", XDG_CONFIG_HOME=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", SHOW_WINDOW], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    print(result.stdout.strip())


def test_command_line_rejects_bad_flags():
    result = subprocess.run([sys.executable, "-m", "app", "--local-agents", "-1"], cwd=REPO, capture_output=True,
                            text=True, timeout=60, env=dict(os.environ, QT_QPA_PLATFORM="offscreen"))
    assert result.returncode == 2 and "--local-agents must be 0 or more" in result.stderr
    help_text = subprocess.run([sys.executable, "-m", "app", "--help"], cwd=REPO, capture_output=True, text=True,
                               timeout=60).stdout
    assert "--local-agents" in help_text and "--model" in help_text
