"""`flowspec-studio`: the desktop app. Opens the window first; the engine (torch) loads afterwards.

    flowspec-studio [--local-agents N] [--model REF] [--dtype bf16|fp32]
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import signal
import sys
import time

logger = logging.getLogger("app")

DEFAULT_MODEL = "smollm2-135m"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flowspec-studio", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help=f"model reference (default: the last one used, else {DEFAULT_MODEL})")
    p.add_argument("--local-agents", type=int, default=0, metavar="N",
                   help="start N flowspec-agents on this machine's loopback, pair with them and load the model")
    p.add_argument("--local-workers", type=int, default=2, metavar="N",
                   help="without agents: offer N stage worker processes on this machine (default 2)")
    p.add_argument("--interface", action="append", default=None, metavar="ADDR",
                   help="look for agents by mDNS only on this local address (default: all); repeatable")
    p.add_argument("--no-mdns", action="store_true", help="do not browse mDNS; add agents by host:port")
    p.add_argument("--no-discovery", action="store_true", help="no agents at all: local worker processes only")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--diagnose", type=float, default=None, metavar="SECONDS",
                   help="start as usual, print the devices found for SECONDS, then close (checks an install)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def build_window(args: argparse.Namespace):
    """The main window with its bridge, not started yet (no torch is imported here)."""
    from app.agents import AgentDevices
    from app.bridge import EngineBridge
    from app.devices import local_worker_devices
    from app.main_window import MainWindow
    from app.settings import load_settings

    settings = load_settings()
    model = args.model or settings.model or DEFAULT_MODEL
    devices = () if args.local_agents > 0 else local_worker_devices(args.local_workers)
    agents = None if args.no_discovery else AgentDevices(interfaces=args.interface, mdns=not args.no_mdns)
    return MainWindow(EngineBridge(), settings, model, args.dtype, devices, auto_apply=args.local_agents > 0,
                      agents=agents, local_agents=args.local_agents)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.local_agents < 0 or args.local_workers < 1:
        print("flowspec-studio: --local-agents must be 0 or more and --local-workers at least 1", file=sys.stderr)
        return 2
    if sys.platform == "linux" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                                        or os.environ.get("QT_QPA_PLATFORM")):
        print("flowspec-studio: no display found (DISPLAY and WAYLAND_DISPLAY are unset). Run it in a desktop "
              "session, over `ssh -X`, or set QT_QPA_PLATFORM=offscreen to run it without showing the window.",
              file=sys.stderr)
        return 2
    t0 = time.monotonic()
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication

    from app.resources import resource_path

    app = QApplication(sys.argv[:1])
    app.setApplicationName("FlowSpec Studio")
    app.setStyleSheet(resource_path("style.qss").read_text(encoding="utf-8"))
    window = build_window(args)
    window.show()
    logger.info("window shown in %.2f s", time.monotonic() - t0)
    QTimer.singleShot(0, window.start)
    if args.diagnose is not None:
        _diagnose(window, args.diagnose, time.monotonic() - t0)
    _close_on_signals(window)
    code = app.exec()
    del window  # widgets go before the QApplication, or Qt's teardown may crash
    gc.collect()
    return code


def _diagnose(window, seconds: float, shown_s: float) -> None:
    """Print what a user would check first (the window came up, which devices were found), then close."""
    from PySide6.QtCore import QTimer

    print(f"window shown in {shown_s:.2f} s", flush=True)
    printed: set[tuple[str, str, str]] = set()

    def report(devices) -> None:
        for d in devices:
            row = (d.name, d.address, d.state)
            if row not in printed:
                printed.add(row)
                print(f"device {d.name} at {d.address}: {d.state}", flush=True)

    if window.agents is not None:
        window.agents.sig_devices_changed.connect(report)
    QTimer.singleShot(int(seconds * 1000), window.close)


def _close_on_signals(window) -> None:
    """Ctrl+C or SIGTERM closes the window as its close button does (settings saved, stages shut down).

    Python runs signal handlers only between bytecodes, so a short timer keeps it waking up.
    """
    from PySide6.QtCore import QTimer

    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: window.close())
    wake = QTimer(window)
    wake.timeout.connect(lambda: None)
    wake.start(250)


if __name__ == "__main__":
    raise SystemExit(main())
