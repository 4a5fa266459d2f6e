"""Agents found by real mDNS on 127.0.0.1 and by manual host:port, in one registry; the `devices`
and `pair` commands; `flowspec generate --layout` over two agents with the shipped SmolLM2."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time

import pytest

import zmq

from engine import wire
from engine.agent_client import ClientKeys, Connection, hello, pair
from engine.discovery import DeviceLost, DeviceSeen, Discovery
from tests.integration.agent_kit import REPO_ROOT, AgentProcess

pytestmark = pytest.mark.integration

WAIT_S = 15.0


_seen: list = []  # every event read so far, so that waiting for one never drops another


def wait_for(events: queue.SimpleQueue, predicate, timeout_s: float = WAIT_S):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found = next((event for event in _seen if predicate(event)), None)
        if found is not None:
            _seen.remove(found)
            return found
        try:
            _seen.append(events.get(timeout=0.2))
        except queue.Empty:
            continue
    raise AssertionError("the expected discovery event did not come")


def run_cli(args: list[str], client_dir, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
    env = dict(os.environ, FLOWSPEC_CLIENT_DIR=str(client_dir), PYTHONPATH=str(REPO_ROOT))
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], cwd=REPO_ROOT, env=env, text=True,
                          capture_output=True, timeout=timeout_s)


def test_discovery_by_mdns_and_by_address(tmp_path):
    keys = ClientKeys(tmp_path / "client")
    with AgentProcess(tmp_path / "m", "mdns-agent", mdns=True) as advertised, \
            AgentProcess(tmp_path / "x", "manual-agent") as hidden:
        pair(hidden.address, hidden.code, keys)
        with Discovery(interfaces=["127.0.0.1"], keys=keys) as discovery:
            discovery.add_manual(hidden.address)
            seen = wait_for(discovery.events, lambda e: isinstance(e, DeviceSeen) and e.device.name == "mdns-agent")
            assert seen.device.address == advertised.address and seen.device.source == "mdns"
            assert seen.device.agent_id.startswith("ag-") and len(seen.device.fingerprint) == 16
            assert not seen.device.paired
            manual = wait_for(discovery.events, lambda e: isinstance(e, DeviceSeen) and e.device.source == "manual")
            assert manual.device.paired and manual.device.name == "manual-agent" and manual.device.memory_total > 0
            ours = {advertised.address, hidden.address}  # other agents may be on loopback mDNS too
            assert {d.address for d in discovery.devices()} >= ours
            assert advertised.stop() == 0  # SIGTERM: unregisters and exits cleanly
            lost = wait_for(discovery.events, lambda e: isinstance(e, DeviceLost) and e.device.address in ours)
            assert lost.device.agent_id == seen.device.agent_id
            assert {d.address for d in discovery.devices()} & ours == {hidden.address}
            with AgentProcess(tmp_path / "k", "killed-agent", mdns=True) as killed:
                wait_for(discovery.events, lambda e: isinstance(e, DeviceSeen) and e.device.address == killed.address)
                killed.kill()  # SIGKILL: its mDNS record stays, but it is no ghost
                killed_at = time.monotonic()
                wait_for(discovery.events, lambda e: isinstance(e, DeviceLost) and e.device.address == killed.address)
                assert time.monotonic() - killed_at < 8.0


def test_devices_and_pair_commands(tmp_path):
    with AgentProcess(tmp_path / "m", "listed-agent", mdns=True) as agent:
        paired = run_cli(["pair", agent.address, agent.code.lower()], tmp_path / "client")
        assert paired.returncode == 0 and "paired with listed-agent" in paired.stdout, paired.stderr
        keys = ClientKeys(tmp_path / "client")
        deadline = time.monotonic() + 60  # the agent probes its accelerator once torch is imported
        while not hello(agent.address, keys, keys.find(agent.address).public_key).torch_device:
            assert time.monotonic() < deadline
            time.sleep(0.5)
        listed = run_cli(["devices", "--interface", "127.0.0.1", "--seconds", "3"], tmp_path / "client")
        assert listed.returncode == 0, listed.stderr
        row = next(line for line in listed.stdout.splitlines() if line.startswith("listed-agent"))
        assert agent.address in row and " mdns " in row and " yes " in row and "GiB" in row and "(cpu)" in row
        wrong = run_cli(["pair", agent.address, "AAAA-BBBB"], tmp_path / "client")
        assert wrong.returncode == 1 and "pairing with" in wrong.stderr
        connection = Connection(zmq.Context.instance(), keys, agent.address, keys.find(agent.address).public_key)
        try:
            connection.request(wire.Shutdown(), wire.Capabilities)  # a paired client may stop the agent
        finally:
            connection.close()
        assert agent.proc.wait(15) == 0


def test_generate_with_a_layout_of_two_agents_equals_local_smollm2(tmp_path):
    from engine.config import SessionConfig
    from engine.session import Engine, EngineSpec

    client = tmp_path / "client"
    prompt, max_new = "Name three colours.", 16
    with AgentProcess(tmp_path / "a", "left") as left, AgentProcess(tmp_path / "b", "right") as right:
        for agent in (left, right):
            pair(agent.address, agent.code, ClientKeys(client))
        layout = tmp_path / "two-agents.toml"
        layout.write_text(f'model = "smollm2-135m"\nn_layers = 30\n[[stage]]\ndevice = "{left.address}"\n'
                          f'layers = [0, 15]\n[[stage]]\ndevice = "{right.address}"\nlayers = [15, 30]\n')
        remote = run_cli(["generate", "--layout", str(layout), "--prompt", prompt, "--dtype", "fp32", "--json",
                          "--max-new-tokens", str(max_new), "--draft", "lookup"], client)
        assert remote.returncode == 0, remote.stderr[-3000:]
        assert "MiB of weights" not in remote.stderr  # both agents have the built-in model themselves
    with Engine(EngineSpec("smollm2-135m", dtype="fp32", draft="lookup", in_process=True)) as engine:
        local = engine.generate(engine.encode(prompt), SessionConfig(max_new_tokens=max_new))
    assert json.loads(remote.stdout)["token_ids"] == local.token_ids


def test_an_agent_named_by_id_is_found_at_its_new_address(tmp_path):
    from engine.agent_cli import refresh_addresses

    keys = ClientKeys(tmp_path / "client")
    with AgentProcess(tmp_path / "a", "mover", mdns=True) as before:
        agent_id = pair(before.address, before.code, keys).agent_id
    with AgentProcess(tmp_path / "a", "mover", mdns=True) as after:  # same state, another port
        assert after.port != before.port
        refresh_addresses(keys, [agent_id], seconds=10.0, interfaces=["127.0.0.1"])
        assert keys.find(agent_id).address == after.address
