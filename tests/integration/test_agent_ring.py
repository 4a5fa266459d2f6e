"""Agents as real subprocesses on 127.0.0.1, driven by AgentRing exactly as ProcessRing is driven.

A tiny random Llama (fp32) over a 3-stage layout on three agents generates exactly what Hugging
Face greedy `generate` does, with every strategy; the weights reach the agents through the
chunked, checked transfer (a client's temporary directory means nothing to an agent). Security:
an unpaired client and a wrong pairing code get nothing. Liveness: SIGKILL of an agent in the
middle of a generation is a StageLost within 3 s; the agent restarted on the same port serves the
same client without pairing again; an agent whose client vanished frees its stage. Weights: a
transfer cut in the middle resumes where it stopped.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from engine import wire
from engine.agent_client import AgentError, ClientKeys, Connection, hello, pair, stage_bundle, weight_chunks
from engine.agent_ring import AgentRing
from engine.coordinator import Coordinator, StageLost
from engine.draft import LookupDrafter
from engine.ring_zmq import RingError
from engine.stage import load_head
from tests.integration.agent_kit import MAX_NEW_TOKENS, REPO_ROOT, AgentProcess, Tiny, make_tiny
from tests.integration.engine_kit import RING_CASES, case_config

pytestmark = pytest.mark.integration

STAGE_LOST_WITHIN_S = 3.0
FREED_WITHIN_S = 6.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    return make_tiny(tmp_path_factory.mktemp("agents") / "tiny-llama")


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> ClientKeys:
    return ClientKeys(tmp_path_factory.mktemp("client"))


@pytest.fixture(scope="module")
def three_agents(tmp_path_factory, keys):
    root = tmp_path_factory.mktemp("three")
    agents = [AgentProcess(root / f"a{i}", f"agent{i}") for i in range(3)]
    try:
        for agent in agents:
            agent.start()
            pair(agent.address, agent.code, keys)
        yield agents
    finally:
        for agent in agents:
            agent.kill()


@pytest.fixture(scope="module")
def ring3(tiny, keys, three_agents):
    middle = keys.find(three_agents[1].address).agent_id  # a device named by agent id, the others by host:port
    layout = [(three_agents[0].address, 0, 1), (middle, 1, 3), (three_agents[2].address, 3, 4)]
    lines: list[str] = []
    with AgentRing(str(tiny.path), tiny.path, layout, "fp32", keys, on_progress=lines.append) as ring:
        ring.progress_lines = lines
        yield ring


def coordinator(ring, tiny, case: str, max_new_tokens: int = MAX_NEW_TOKENS) -> Coordinator:
    """`case` is one of RING_CASES (agents on one host count as one device, so plain flowspec keeps one slot)."""
    config = case_config(case, ring.n_stages, max_new_tokens)
    return Coordinator(ring, load_head(tiny.path, "fp32"), LookupDrafter(), config, eos_ids=set())


@pytest.mark.parametrize("strategy", RING_CASES)
def test_greedy_output_through_three_agents_equals_hugging_face(tiny, ring3, strategy):
    busy_before = ring3.stage_busy_s()
    result = coordinator(ring3, tiny, strategy).generate(tiny.prompt)
    assert result.token_ids == tiny.expected
    assert ring3.parallel_stages == 1  # three agents on one host take turns on its cores
    if strategy == "flowspec":
        assert result.ring_slots == 1
    elif strategy == "flowspec-full":
        assert result.ring_slots == 4 and result.in_flight > 1
    assert all(after > before for after, before in zip(ring3.stage_busy_s(), busy_before))


def test_weights_went_through_the_checked_transfer(ring3):
    sent = [line for line in ring3.progress_lines if "sending" in line and "MiB of weights" in line]
    assert len(sent) == 3, ring3.progress_lines


def test_agents_report_their_stage_and_capabilities(ring3, three_agents, keys):
    caps = hello(three_agents[1].address, keys, keys.find(three_agents[1].address).public_key)
    assert caps.busy and caps.stage.startswith("layers 1-2")
    assert caps.memory_total > caps.memory_free > 0 and caps.cpu_count >= 1 and caps.torch_device == "cpu"


def test_unpaired_client_is_refused_and_logged(tmp_path, three_agents, keys):
    stranger = ClientKeys(tmp_path / "stranger")
    target = three_agents[0]
    with pytest.raises(AgentError, match="paired"):
        hello(target.address, stranger, keys.find(target.address).public_key, timeout_s=1.5)
    assert "refused a connection from 127.0.0.1" in target.log_text()
    assert stranger.public_key in target.log_text()
    with pytest.raises(AgentError, match="pairing with .* failed"):
        pair(target.address, "WRNG-C0DE", stranger, timeout_s=1.5)
    assert hello(target.address, keys, keys.find(target.address).public_key).agent_id  # still serving


def test_private_key_is_private(three_agents):
    assert (three_agents[0].state_dir / "agent.key_secret").stat().st_mode & 0o777 == 0o600


# --- liveness: these tests start their own agents


def test_killed_agent_is_stage_lost_quickly_and_restarts_trusted(tmp_path, tiny, keys, capsys):
    a, b = AgentProcess(tmp_path / "a", "a"), AgentProcess(tmp_path / "b", "b")
    with a, b:
        pair(a.address, a.code, keys)
        pair(b.address, b.code, keys)
        layout = [(a.address, 0, 2), (b.address, 2, 4)]
        with AgentRing(str(tiny.path), tiny.path, layout, "fp32", keys) as ring:
            c = coordinator(ring, tiny, "flowspec", max_new_tokens=10_000 - 100)
            c.start(tiny.prompt)
            for _ in range(5):
                c.step()
            b.proc.kill()
            killed_at = time.monotonic()
            with pytest.raises(StageLost, match="stage 2/2"):
                while True:
                    c.step()
            lost_after = time.monotonic() - killed_at
            with capsys.disabled():
                print(f"\nSIGKILL of an agent mid-generation -> StageLost after {lost_after:.2f} s")
            assert lost_after < STAGE_LOST_WITHIN_S
        b.proc.wait(5)
        assert b.proc.returncode == -signal.SIGKILL
        assert not hello(a.address, keys, keys.find(a.address).public_key).busy  # the survivor was unloaded
        restarted = AgentProcess(b.state_dir, "b", port=b.port)
        with restarted:
            assert restarted.code == b.code
            with AgentRing(str(tiny.path), tiny.path, layout, "fp32", keys) as ring:  # no pairing again
                assert coordinator(ring, tiny, "ar").generate(tiny.prompt).token_ids == tiny.expected
                c = coordinator(ring, tiny, "flowspec", max_new_tokens=10_000 - 100)
                c.start(tiny.prompt)
                restarted.proc.send_signal(signal.SIGSTOP)  # frozen, its connection open: only heartbeats tell
                try:
                    stopped_at = time.monotonic()
                    with pytest.raises(StageLost, match="no heartbeat"):
                        while True:
                            c.step()
                    silent_for = time.monotonic() - stopped_at
                finally:
                    restarted.proc.send_signal(signal.SIGCONT)
            with capsys.disabled():
                print(f"frozen agent (SIGSTOP) -> StageLost after {silent_for:.2f} s")
            assert silent_for < STAGE_LOST_WITHIN_S


_CLIENT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from engine.agent_client import ClientKeys
    from engine.agent_ring import AgentRing
    ring = AgentRing(sys.argv[1], Path(sys.argv[1]), [(sys.argv[3], 0, 4)], "fp32", ClientKeys(Path(sys.argv[2])))
    print("ready", flush=True)
    time.sleep(600)
""")


def test_agent_frees_its_stage_when_the_client_disappears(tmp_path, tiny, keys):
    with AgentProcess(tmp_path / "a", "a") as agent:
        pair(agent.address, agent.code, keys)
        client = subprocess.Popen([sys.executable, "-c", _CLIENT, str(tiny.path), str(keys.path), agent.address],
                                  cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)
        try:
            assert client.stdout.readline().strip() == "ready"
            server_key = keys.find(agent.address).public_key
            assert hello(agent.address, keys, server_key).busy
            client.kill()
            client.wait(5)
            killed_at = time.monotonic()
            while hello(agent.address, keys, server_key).busy:
                assert time.monotonic() - killed_at < FREED_WITHIN_S, "the agent kept the stage of a vanished client"
                time.sleep(0.2)
            assert "no word from the client" in agent.log_text()
        finally:
            client.kill()
            client.wait()
            client.stdout.close()


def test_weight_transfer_cut_in_the_middle_resumes(tmp_path, keys):
    big = make_tiny(tmp_path / "bigger", hidden=128, intermediate=512)  # 0.8 MiB per layer
    with AgentProcess(tmp_path / "a", "a") as a:
        pair(a.address, a.code, keys)
        bundle = stage_bundle(big.path, 0, 4)
        host = wire.HostStage(model="bigger", bundle=bundle.bundle_id, start=0, end=4, dtype="fp32", stage_index=0,
                              n_stages=1, next_endpoint="tcp://127.0.0.1:9", next_key=keys.public_key,
                              prev_key=keys.public_key, config_json=bundle.config_json, tensors=bundle.tensors)
        import zmq

        connection = Connection(zmq.Context.instance(), keys, a.address, keys.find(a.address).public_key)
        need = connection.request(host, wire.WeightsNeeded)
        assert sum(need.have) == 0
        chunks = weight_chunks(bundle, need.have)
        sent = 0
        for _ in range(5):
            chunk = next(chunks)
            connection.send(chunk)
            sent += len(chunk.data)
        assert connection.recv(5.0) is not None
        time.sleep(0.3)
        connection.close()  # the connection breaks after five chunks
        lines: list[str] = []
        with AgentRing(str(big.path), big.path, [(a.address, 0, 4)], "fp32", keys, on_progress=lines.append) as ring:
            assert coordinator(ring, big, "flowspec").generate(big.prompt).token_ids == big.expected
        assert sent > 2**19
        resumed = [line for line in lines if f"sending {(bundle.nbytes - sent) / 2**20:.1f} MiB of weights "
                   f"(resuming after {sent / 2**20:.1f} MiB)" in line]
        assert resumed, "\n".join(lines)
        assert not list((a.state_dir / "models" / "bundles" / ".partial").iterdir())


def test_agent_refuses_a_stage_that_does_not_fit_before_loading(tmp_path, tiny, keys):
    with AgentProcess(tmp_path / "a", "a", extra=["--max-memory", "32M"]) as agent:
        pair(agent.address, agent.code, keys)
        with pytest.raises(RingError, match="not enough memory on a: layers 0-3 in fp32 need 65 MiB, 32 MiB"):
            AgentRing(str(tiny.path), tiny.path, [(agent.address, 0, 4)], "fp32", keys)
        assert not (agent.state_dir / "models" / "bundles").exists() or not any(
            p.name != ".partial" for p in (agent.state_dir / "models" / "bundles").iterdir())


def test_a_port_clash_is_a_clear_error_at_start(three_agents):
    taken = three_agents[0].port
    clash = subprocess.run([sys.executable, "-m", "agent", "--port", str(taken - 1), "--bind", "127.0.0.1",
                            "--no-mdns", "--state-dir", str(three_agents[0].state_dir.parent / "clash")],
                           cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert clash.returncode == 1
    assert f"cannot listen on 127.0.0.1:{taken - 1}-{taken + 1}" in clash.stderr and "pick another --port" in clash.stderr
