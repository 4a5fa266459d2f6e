"""Drive the real app (two local agents, smollm2-135m) and save PNGs of it into docs/screenshots/.

Run by render.sh under Xvfb. Settings, agent keys and agent state go to a temporary directory, so
the user's own are never touched. Each picture is a real state of the app, not a mock-up.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent
REPO = OUT.parent.parent
PROMPT = "Explain in three sentences why the sky is blue."


def main() -> int:
    home = Path(tempfile.mkdtemp(prefix="flowspec-screens-"))
    for name in ("XDG_CONFIG_HOME", "XDG_STATE_HOME"):
        os.environ[name] = str(home / name.lower())
    os.environ["FLOWSPEC_CLIENT_DIR"] = str(home / "client")
    sys.path.insert(0, str(REPO))
    import logging

    logging.basicConfig(level=logging.DEBUG if os.environ.get("RENDER_DEBUG") else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from PySide6.QtCore import QEventLoop, QTimer
    from PySide6.QtWidgets import QApplication

    from app.main import build_parser, build_window
    from app.resources import resource_path

    qt_app = QApplication([])
    qt_app.setStyleSheet(resource_path("style.qss").read_text(encoding="utf-8"))
    window = build_window(build_parser().parse_args(["--local-agents", "2", "--model", "smollm2-135m", "--no-mdns"]))
    window.resize(1600, 1000)
    window.show()
    window.start()

    def pause(ms: int) -> None:
        """Run the event loop for ``ms`` (QTest.qWait would keep the GIL from the engine thread)."""
        loop = QEventLoop()
        QTimer.singleShot(ms, loop.quit)
        loop.exec()

    def wait_for(condition, seconds: float, what: str) -> None:
        deadline = time.monotonic() + seconds
        while not condition():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out waiting for {what}")
            pause(100)

    def save(widget, name: str) -> None:
        pause(300)  # let the charts' timer draw
        widget.grab().save(str(OUT / name))
        print(f"saved {OUT / name}")

    wait_for(lambda: window.chat.send_button.isEnabled(), 600, "the stages to load")
    window.chat.highlight.setChecked(True)
    # a light draft tree: this machine's CPUs are shared, and every answer here runs for real
    window.generation.max_tokens.setValue(64)
    window.generation.budget.setValue(24)
    window.generation.topk.setValue(4)
    window.generation.depth.setValue(4)
    window.chat.prompt.setPlainText(PROMPT)
    window.chat.send_button.click()
    wait_for(lambda: len(window.chat.messages[-1].pieces) > 12 or not window.chat._generating, 600,
             "the answer to start")
    save(window, "studio-generating.png")
    wait_for(lambda: not window.chat._generating, 900, "the answer to finish")
    window.generation.max_tokens.setValue(32)
    window.chat.prompt.setPlainText("Now say it in one sentence for a child.")
    window.chat.send_button.click()
    wait_for(lambda: not window.chat._generating, 900, "the second answer")
    save(window, "studio-answer.png")

    # a refused drop: stage 1's layers dropped onto the other lane, shifted by three columns
    model, canvas = window.layout_model, window.editor.canvas
    first = model.layout.stages[0]
    point = canvas.cell_center(1, first.start + 3)
    canvas.drop_at(model.range_mime_data(first.start, first.end), point.x(), point.y())
    save(window.editor, "layout-refused.png")

    # an agent dies mid-answer: the banner names it and offers a re-plan
    pids = list(window.local_agent_pids)
    window.chat.prompt.setPlainText("List five colours of the rainbow and one fact about each.")
    window.chat.send_button.click()
    wait_for(lambda: len(window.chat.messages[-1].pieces) > 6 or not window.chat._generating, 600,
             "the third answer to start")
    if pids:
        os.kill(pids[-1], signal.SIGKILL)
        wait_for(lambda: window.banner.isVisible(), 60, "the stage-loss banner")
        save(window, "stage-lost.png")
        window.banner.replan_button.click()
        wait_for(lambda: window.chat.send_button.isEnabled() and not window.chat._generating, 600, "the re-planned answer")
        save(window, "replanned.png")
    window.close()
    del window
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
