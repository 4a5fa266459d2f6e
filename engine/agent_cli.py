"""The agent commands of `flowspec`: `devices` and `pair`, and `generate --layout` on agents."""

from __future__ import annotations

import sys
import time

from engine.config import ConfigError

DISCOVERY_WAIT_S = 3.0


def add_parsers(sub) -> None:
    dev = sub.add_parser("devices", help="list the agents found by mDNS (and --add HOST:PORT), paired or not")
    dev.add_argument("--add", action="append", default=[], metavar="HOST:PORT",
                     help="also probe an agent at this address (for networks that block multicast); repeatable")
    dev.add_argument("--seconds", type=float, default=DISCOVERY_WAIT_S, help="how long to listen for agents")
    dev.add_argument("--interface", action="append", default=None, metavar="ADDR",
                     help="listen for mDNS only on this local address (default: all); repeatable")
    dev.add_argument("--no-mdns", action="store_true", help="only the --add entries and paired agents")
    pair = sub.add_parser("pair", help="pair with an agent using the code it prints, so it accepts this client")
    pair.add_argument("address", metavar="HOST:PORT", help="the agent's address and control port")
    pair.add_argument("code", help="the pairing code the agent printed (or the cluster secret)")


def cmd_pair(args) -> int:
    from engine.agent_client import ClientKeys, pair

    agent = pair(args.address, args.code, ClientKeys())
    print(f"paired with {agent.name} ({agent.agent_id}) at {agent.address}; "
          f"use device = \"{agent.agent_id}\" or \"{agent.address}\" in a layout file")
    return 0


def cmd_devices(args) -> int:
    from engine.agent_client import ClientKeys
    from engine.discovery import Discovery

    if args.seconds < 0:
        raise ConfigError(f"--seconds must not be negative (got {args.seconds})")
    keys = ClientKeys()
    discovery = Discovery(interfaces=args.interface, mdns=not args.no_mdns, keys=keys)
    with discovery:
        for address in [*args.add, *(a.address for a in keys.agents())]:
            discovery.add_manual(address)
        time.sleep(args.seconds)
        devices = discovery.devices()
    if not devices:
        print("No agents found. Start one with `flowspec-agent --name NAME --port 5555`; if multicast is blocked "
              "on this network, add it with --add HOST:PORT.")
        return 0
    print(f"{'name':<16} {'agent id':<20} {'address':<22} {'found by':<8} {'paired':<6} {'state':<8} "
          f"{'memory free/total':<18} accelerator")
    for d in devices:
        memory = f"{d.memory_free / 2**30:.1f}/{d.memory_total / 2**30:.1f} GiB" if d.memory_total else "?"
        state = "offline" if not d.online else ("busy" if d.stage else "online")
        accel = f"{d.accelerator} ({d.torch_device})" if d.torch_device else "?"
        print(f"{d.name or '?':<16} {d.agent_id or '?':<20} {d.address:<22} {d.source:<8} "
              f"{'yes' if d.paired else 'no':<6} {state:<8} {memory:<18} {accel}")
    if any(not d.paired for d in devices):
        print("\nPair with an agent: flowspec pair HOST:PORT CODE (the agent prints its code when it starts)",
              file=sys.stderr)
    return 0


def agent_ring_factory(layout, source: str):
    """A ring factory for engine.session.EngineSpec that runs `layout`'s stages on agents."""
    remote = [s.device_id for s in layout.stages if s.device_id != "local"]
    if len(remote) != len(layout.stages):
        raise ConfigError(
            f"{source} mixes \"local\" stages with agents; run the local stages on an agent too "
            "(flowspec-agent --bind 127.0.0.1 --port 5555, then flowspec pair 127.0.0.1:5555 CODE)"
        )
    stages = [(s.device_id, s.start, s.end) for s in layout.stages]

    def make_ring(model: str, model_dir, bounds, dtype: str, on_progress):
        from engine.agent_client import ClientKeys
        from engine.agent_ring import AgentRing

        keys = ClientKeys()
        refresh_addresses(keys, [device for device, _, _ in stages if ":" not in device])
        return AgentRing(model, model_dir, stages, dtype, keys, on_progress=on_progress)

    return make_ring


def refresh_addresses(keys, agent_ids: list[str], seconds: float = DISCOVERY_WAIT_S,
                      interfaces: list[str] | None = None) -> None:
    """Agents named by id may have moved since pairing (a new DHCP lease, another port): each one
    that does not answer at its last address is looked for on mDNS, and a new address remembered."""
    from dataclasses import replace

    from engine.agent_client import AgentError, hello
    from engine.discovery import Discovery

    moved = {}
    for agent_id in agent_ids:
        paired = keys.find(agent_id)
        if paired is None:
            continue  # AgentRing says it is not paired
        try:
            hello(paired.address, keys, paired.public_key, timeout_s=2.0)
        except AgentError:
            moved[agent_id] = paired
    if not moved:
        return
    with Discovery(interfaces=interfaces) as discovery:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            found = {d.agent_id: d for d in discovery.devices() if d.agent_id in moved}
            if len(found) == len(moved):
                break
            time.sleep(0.1)
    for agent_id, device in found.items():
        keys.remember(replace(moved[agent_id], address=device.address))
        print(f"agent {device.name or agent_id} moved to {device.address}", file=sys.stderr)
