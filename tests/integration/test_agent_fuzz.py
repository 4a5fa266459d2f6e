"""Robustness of a running agent: thousands of malformed, truncated, oversized and replayed frames
from a paired client and from a stranger leave it serving; sequential sessions (load, generate,
unload) leave its memory flat. Set FLOWSPEC_AGENT_SESSIONS to run more sessions (50 for the report)."""

from __future__ import annotations

import os
import random
import time

import msgspec
import psutil
import pytest
import zmq

from engine import wire
from engine.agent_client import ClientKeys, Connection, hello, pair
from engine.agent_ring import AgentRing
from engine.config import SessionConfig
from engine.coordinator import Coordinator
from engine.draft import LookupDrafter
from engine.stage import load_head
from tests.integration.agent_kit import AgentProcess, make_tiny

pytestmark = pytest.mark.integration

N_FRAMES = 2000
N_SESSIONS = int(os.environ.get("FLOWSPEC_AGENT_SESSIONS", "5"))
RSS_GROWTH_LIMIT = 40 * 2**20
DROPPED = "control: dropped a malformed message"


def valid_messages(keys: ClientKeys) -> list[list[bytes]]:
    samples = [wire.Hello(client_name="x"), wire.StatusQuery(), wire.Heartbeat(), wire.Unload(),
               wire.WeightChunk("a" * 64, 0, 0, b"abc", "b" * 64), wire.PairRequest(client_name="y"),
               wire.Reset(request_id=3), wire.CommandFailed(reason="z"),
               wire.Profile(config_json="{", dtype="bf16", token_counts=(1,))]
    return [[bytes(f) for f in wire.encode(m)] for m in samples]


def malformed(rng: random.Random, valid: list[list[bytes]]) -> list[bytes]:
    frames = [bytes(f) for f in rng.choice(valid)]
    kind = rng.randrange(7)
    if kind == 0:  # random bytes
        return [rng.randbytes(rng.randrange(0, 300)) for _ in range(rng.randrange(1, 5))]
    if kind == 1:  # truncated header
        return [frames[0], frames[1][: rng.randrange(len(frames[1]))]]
    if kind == 2:  # flipped bits in the header
        header = bytearray(frames[1])
        for _ in range(rng.randrange(1, 4)):
            header[rng.randrange(len(header))] ^= 1 << rng.randrange(8)
        return [frames[0], bytes(header)]
    if kind == 3:  # another protocol version or none
        return [rng.choice([b"FLOWSPEC0", b"FLOWSPEC9", b"GET / HTTP/1.1", b""]), frames[1]]
    if kind == 4:  # oversized: a header over the limit, or a chunk over MAX_CHUNK_BYTES
        if rng.random() < 0.5:
            return [wire.PROTOCOL, b"\x91" + b"\x00" * (wire.MAX_HEADER_BYTES + 10)]
        body = {"msg": {"kind": "WeightChunk", "bundle": "a" * 64, "tensor": 0, "offset": 0,
                        "data": b"\x00" * (wire.MAX_CHUNK_BYTES + 1), "sha256": "b" * 64}, "tensors": []}
        return [wire.PROTOCOL, msgspec.msgpack.encode(body)]
    if kind == 5:  # extra payload frames
        return frames + [b"\x00" * rng.randrange(1, 64)] * rng.randrange(1, 20)
    return frames  # replayed valid messages, some of which make no sense here


def test_malformed_frames_leave_the_agent_serving(tmp_path):
    keys = ClientKeys(tmp_path / "client")
    stranger = ClientKeys(tmp_path / "stranger")
    rng = random.Random(0)
    with AgentProcess(tmp_path / "a", "fuzzed") as agent:
        paired = pair(agent.address, agent.code, keys)
        context = zmq.Context.instance()
        valid = valid_messages(keys)
        answered, bad_sent = {}, 0
        for who in (keys, stranger):
            connection = Connection(context, who, agent.address, paired.public_key)
            connection.socket.setsockopt(zmq.SNDHWM, 0)
            replies = 0
            for i in range(N_FRAMES if who is keys else N_FRAMES // 3):
                frames = malformed(rng, valid) if i % 2 else valid[0]  # every other one a valid Hello
                try:  # a refused stranger has no connection, so its sends would block
                    connection.socket.send_multipart(frames, zmq.NOBLOCK)
                except zmq.Again:
                    connection.socket.poll(10, zmq.POLLOUT)
                    continue
                if who is keys:
                    try:
                        wire.decode(frames)
                    except wire.WireError:
                        bad_sent += 1
                while connection.socket.poll(0):
                    connection.socket.recv_multipart()
                    replies += 1
            # The trusted client's queue is unbounded, so every frame it sent reaches the agent:
            # keep the connection open until the agent has logged each malformed one.
            deadline = time.monotonic() + (60 if who is keys else 0.5)
            while time.monotonic() < deadline and (who is stranger or agent.log_text().count(DROPPED) < bad_sent):
                while connection.socket.poll(100):
                    connection.socket.recv_multipart()
                    replies += 1
            answered[who is keys] = replies
            connection.close()
        caps = hello(agent.address, keys, paired.public_key, timeout_s=20)
        assert caps.agent_id == paired.agent_id and not caps.busy
        connection = Connection(context, keys, agent.address, paired.public_key)  # and it still works
        try:
            config = (tmp_path / "config.json")
            config.write_text('{"model_type": "llama", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 128, '
                              '"num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2}')
            ask = wire.Profile(config_json=config.read_text(), dtype="fp32", token_counts=(1, 32))
            first = connection.request(ask, wire.ProfileResult, timeout_s=60)
            again = connection.request(ask, wire.ProfileResult)
        finally:
            connection.close()
        assert not first.cached and again.cached and again.ms_per_layer == first.ms_per_layer
        assert first.token_counts == (1, 32) and all(ms > 0 for ms in first.ms_per_layer)
        assert agent.proc.poll() is None
        log = agent.log_text()
        assert answered[True] > 0 and answered[False] == 0  # not one Hello of the stranger's was parsed
        assert bad_sent > N_FRAMES / 3  # each malformed frame the trusted client sent was logged and dropped
        assert log.count(DROPPED) == bad_sent
        assert "refused a connection from 127.0.0.1" in log and stranger.public_key in log
        assert "Traceback" not in log


def test_sequential_sessions_leave_agent_memory_flat(tmp_path, capsys):
    tiny = make_tiny(tmp_path / "tiny")
    keys = ClientKeys(tmp_path / "client")
    head = load_head(tiny.path, "fp32")
    rss = []
    with AgentProcess(tmp_path / "a", "soak") as agent:
        pair(agent.address, agent.code, keys)
        process = psutil.Process(agent.proc.pid)
        for _ in range(N_SESSIONS):
            with AgentRing(str(tiny.path), tiny.path, [(agent.address, 0, 4)], "fp32", keys) as ring:
                config = SessionConfig(strategy="flowspec", max_new_tokens=20)
                result = Coordinator(ring, head, LookupDrafter(), config, eos_ids=set()).generate(tiny.prompt)
                assert result.token_ids == tiny.expected[:20]
            time.sleep(0.3)  # the agent unloads on Unload
            rss.append(process.memory_info().rss)
    with capsys.disabled():
        print(f"\nagent RSS over {N_SESSIONS} sessions (MiB): " + " ".join(f"{r / 2**20:.1f}" for r in rss))
    settled = rss[min(2, len(rss) - 1):]
    assert max(settled) - settled[0] < RSS_GROWTH_LIMIT, [r // 2**20 for r in rss]
