"""`flowspec-agent`: run this device's agent until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

logger = logging.getLogger("flowspec-agent")


def _size(text: str) -> int:
    units = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
    text = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = units.get(text[-1:], 1)
    number = text[:-1] if text[-1:] in units else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: use bytes or a suffix, e.g. 6G or 512M") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("--max-memory must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flowspec-agent", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=None, help="name shown to clients (default: the host name)")
    parser.add_argument("--port", type=int, default=5555,
                        help="control port; the stage data port is PORT+1 and the pairing port PORT+2")
    parser.add_argument("--bind", default="0.0.0.0", help="address to listen on (default: all)")
    parser.add_argument("--no-mdns", action="store_true", help="do not advertise on mDNS (clients add HOST:PORT)")
    parser.add_argument("--models-dir", default=None,
                        help="where stage weights are kept (default: STATE_DIR/models)")
    parser.add_argument("--state-dir", default=os.environ.get("FLOWSPEC_AGENT_STATE_DIR"),
                        help="keys, pairing code and trusted clients (default: the platform state directory)")
    parser.add_argument("--max-memory", type=_size, default=0, help="most memory stages may use here, e.g. 6G")
    parser.add_argument("--cluster-secret", default=os.environ.get("FLOWSPEC_CLUSTER_SECRET"),
                        help="pair clients with this shared secret instead of the generated code")
    parser.add_argument("--show-pairing-code", action="store_true",
                        help="print this agent's id and pairing code (creating them on first use) and exit")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def show_pairing_code(state_dir: Path | None, cluster_secret: str | None) -> int:
    from agent.identity import StateDir, format_code

    state = StateDir(state_dir, cluster_secret)
    print(f"pairing code {format_code(state.identity.pairing_code)}")
    print(f"agent id {state.identity.agent_id}, state in {state.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import socket

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not 0 < args.port < 65534:
        print(f"error: --port {args.port} is outside 1..65533 (the agent uses PORT, PORT+1 and PORT+2)", file=sys.stderr)
        return 2
    if args.cluster_secret is not None and len(args.cluster_secret) < 8:
        print("error: --cluster-secret must be at least 8 characters", file=sys.stderr)
        return 2
    if args.show_pairing_code:
        return show_pairing_code(Path(args.state_dir) if args.state_dir else None, args.cluster_secret)
    name = (args.name or socket.gethostname())[:64]
    from agent.daemon import Agent, AgentConfig

    import zmq

    config = AgentConfig(name=name, port=args.port, bind=args.bind, mdns=not args.no_mdns,
                         models_dir=Path(args.models_dir) if args.models_dir else None,
                         state_dir=Path(args.state_dir) if args.state_dir else None,
                         memory_limit=args.max_memory, cluster_secret=args.cluster_secret)
    agent = Agent(config)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: agent.stop())
    try:
        return agent.run()
    except zmq.ZMQError as exc:
        print(f"error: cannot listen on {args.bind}:{args.port}-{args.port + 2}: {exc}; "
              "pick another --port or stop the program using it", file=sys.stderr)
        return 1
