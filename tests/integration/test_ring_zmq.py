"""ProcessRing: stage workers as local processes over ZeroMQ on 127.0.0.1.

A tiny random Llama (fp32) must generate exactly what Hugging Face greedy `generate` does, with
every strategy, over 2 stages with the link shaper on and 3 stages without it (each ring start
costs seconds of CPU, so the shaped ring doubles as the 2-stage one). Failures: a killed worker becomes
StageLost quickly, a malformed frame is logged and skipped, a bad load is a RingError naming the
stage, and no worker outlives its ring or its parent process.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import torch
import zmq
from transformers import LlamaConfig, LlamaForCausalLM

from engine import wire
from engine.config import LinkConfig
from engine.coordinator import Coordinator, StageLost
from engine.draft import LookupDrafter
from engine.ring_zmq import ProcessRing, RingError
from engine.stage import load_head
from engine.stage_proc import LinkSender
from tests.integration.engine_kit import RING_CASES, case_config, local_ring

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
MAX_NEW_TOKENS = 100
STAGE_LOST_WITHIN_S = 3.0
ORPHANS_GONE_WITHIN_S = 5.0
WAIT_S = 10.0


@dataclass(frozen=True)
class Tiny:
    path: str
    prompt: list[int]
    expected: list[int]  # Hugging Face greedy continuation, MAX_NEW_TOKENS long


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Tiny:
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3)  # sharper logits: fewer near-ties between fp32 orders of summation
    path = tmp_path_factory.mktemp("ring_zmq") / "tiny-llama"
    model.save_pretrained(path)
    # This prompt's continuation mixes repeats (drafts accepted) with new tokens (drafts rejected).
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(3))  # [1, T]
    out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return Tiny(str(path), ids[0].tolist(), out[0, ids.shape[1]:].tolist())


@pytest.fixture(scope="module")
def head(tiny):
    return load_head(tiny.path, "fp32")


@pytest.fixture(scope="module")
def ring2(tiny):
    """Two stages, every hop through an emulated 50 Mbit/s, 2 ms link."""
    with ProcessRing(tiny.path, [(0, 2), (2, 4)], "fp32", link=LinkConfig(mbps=50, latency_ms=2)) as ring:
        yield ring


@pytest.fixture(scope="module")
def ring3(tiny):
    with ProcessRing(tiny.path, [(0, 1), (1, 3), (3, 4)], "fp32") as ring:
        yield ring


def make_coordinator(ring, head, case: str) -> Coordinator:
    return Coordinator(ring, head, LookupDrafter(), case_config(case, ring.n_stages, MAX_NEW_TOKENS), eos_ids=set())


def stage_processes(tag: str) -> list[psutil.Process]:
    """Live (non-zombie) stage workers whose command line carries `tag`."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        cmdline = proc.info["cmdline"] or []
        if "engine.stage_proc" in cmdline and tag in cmdline and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def wait_until(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


# --- equivalence with Hugging Face greedy decoding


@pytest.mark.parametrize("strategy", RING_CASES)
@pytest.mark.parametrize("ring_name", ["ring2", "ring3"])
def test_greedy_output_equals_hugging_face(request, tiny, head, ring_name, strategy):
    ring = request.getfixturevalue(ring_name)
    busy_before = ring.stage_busy_s()
    result = make_coordinator(ring, head, strategy).generate(tiny.prompt)
    assert result.token_ids == tiny.expected
    if strategy == "flowspec-full":
        assert result.ring_slots == ring.n_stages + 1 and result.in_flight > 1
    # One segment in flight: stages compute one at a time, so each is asked to use every core.
    cores = len(os.sched_getaffinity(0))
    assert result.stage_threads == (cores if result.ring_slots == 1 else ring.threads_per_stage)
    busy_after = ring.stage_busy_s()
    assert len(busy_after) == ring.n_stages
    assert all(after > before for after, before in zip(busy_after, busy_before))


@pytest.mark.parametrize("strategy", ["ar", "flowspec-full"])
def test_prefill_keeps_as_many_chunks_in_flight_as_the_request_keeps_segments(ring2, tiny, head, strategy):
    """Local stages share the cores, so the prompt goes through in the request's own slots (one at
    a time for ar, whose stages take every core); an in-process ring, which plans no threads, gets
    every chunk at once."""
    config = dataclasses.replace(case_config(strategy, ring2.n_stages, MAX_NEW_TOKENS), prefill_chunk=4)
    coordinator = Coordinator(ring2, head, LookupDrafter(), config, eos_ids=set())
    coordinator.start(tiny.prompt)  # 16 tokens: 4 chunks

    assert len(coordinator.flights) == min(4, coordinator.slots)
    while coordinator.prefill_left:
        assert coordinator.step() and len(coordinator.flights) <= coordinator.slots
    while coordinator.step():
        pass
    assert coordinator.result().token_ids == tiny.expected

    in_process = Coordinator(local_ring(Path(tiny.path), bounds=[(0, 2), (2, 4)]), head, LookupDrafter(), config,
                             eos_ids=set())
    in_process.start(tiny.prompt)
    assert len(in_process.flights) == 4


def test_link_sender_emulates_bandwidth_then_latency():
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    endpoint = f"tcp://127.0.0.1:{pull.bind_to_random_port('tcp://127.0.0.1')}"
    sender = LinkSender(context, endpoint, LinkConfig(mbps=10, latency_ms=50))
    try:
        t0 = time.monotonic()
        for _ in range(2):  # 125 kB at 10 Mbit/s: 0.1 s on the link each, the second queues behind
            sender.send([bytes(125_000)])
        assert time.monotonic() - t0 < 0.05, "send must not wait for the emulated link"
        arrivals = []
        for _ in range(2):
            assert pull.poll(int(WAIT_S * 1000))
            pull.recv_multipart()
            arrivals.append(time.monotonic() - t0)
    finally:
        sender.close()
        pull.close(linger=0)
        context.term()
    assert arrivals[0] >= 0.15 - 0.01  # 0.1 s on the link + 50 ms latency
    assert arrivals[1] >= 0.25 - 0.01
    assert arrivals[1] < 1.0


# --- failures


def test_malformed_frames_are_logged_and_skipped(ring2, tiny, head, caplog):
    caplog.set_level(logging.ERROR, logger="engine.ring_zmq.worker")
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.connect(ring2.data_endpoints[1])
    try:
        push.send_multipart([b"not a FlowSpec frame"])
        push.send_multipart([wire.PROTOCOL, b"\xc1 not msgpack"])
        push.send_multipart(wire.encode(wire.Shutdown()))  # valid, but not a data message

        def logged() -> list[str]:
            return [r.getMessage() for r in caplog.records if "stage 2/2" in r.getMessage()]

        assert wait_until(lambda: len(logged()) >= 3, WAIT_S), logged()
    finally:
        push.close(linger=0)
        context.term()
    assert sum("malformed" in line for line in logged()) == 2
    assert any("Shutdown that came on the data socket" in line for line in logged())
    result = make_coordinator(ring2, head, "flowspec").generate(tiny.prompt)
    assert result.token_ids == tiny.expected


def test_killed_worker_raises_stage_lost_and_close_leaves_no_children(tiny, head):
    progress: list[str] = []
    threads, odd = torch.get_num_threads(), os.cpu_count() + 1  # more than the coordinator's share can be
    torch.set_num_threads(odd)
    ring = ProcessRing(tiny.path, [(0, 2), (2, 4)], "fp32", on_progress=progress.append)
    try:
        assert torch.get_num_threads() == ring.coordinator_threads
        assert "stage 2/2: loading layers 2-3 ..." in progress
        assert any(line.startswith("stage 2/2 ready in") for line in progress)
        coordinator = make_coordinator(ring, head, "ar")
        coordinator.start(tiny.prompt)
        for _ in range(5):
            assert coordinator.step()
        os.kill(ring.pids[1], signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(StageLost, match=r"stage 2/2 .*SIGKILL"):
            while coordinator.step():
                pass
        assert time.monotonic() - t0 < STAGE_LOST_WITHIN_S
    finally:
        ring.close()
        assert torch.get_num_threads() == odd  # the process's own thread count is given back
        torch.set_num_threads(threads)
    children = psutil.Process().children(recursive=True)
    assert not [child for child in children if child.pid in ring.pids and child.is_running()]
    assert stage_processes(ring.tag) == []


@pytest.mark.parametrize(("bounds", "model", "stage", "reason"), [
    ([(0, 2), (2, 6)], None, "stage 2/2", "this model has 4 layers"),
    ([(0, 4)], "/nonexistent/flowspec-model", "stage 1/1", "nonexistent"),
])
def test_bad_stage_load_raises_ring_error_naming_the_stage(tiny, bounds, model, stage, reason):
    tag = f"bad-load-{os.getpid()}-{stage[-1]}"
    with pytest.raises(RingError, match=stage) as failure:
        ProcessRing(model or tiny.path, bounds, "fp32", tag=tag)
    assert reason in str(failure.value)
    assert stage_processes(tag) == []


def test_killing_the_parent_leaves_no_orphan_workers(tiny, tmp_path):
    tag = f"orphan-check-{os.getpid()}"
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from engine.ring_zmq import ProcessRing
        ring = ProcessRing(sys.argv[1], [(0, 2), (2, 4)], "fp32", tag=sys.argv[2])
        print("ready", flush=True)
        time.sleep(600)
    """))
    parent = subprocess.Popen([sys.executable, str(script), tiny.path, tag], cwd=REPO_ROOT,
                              stdout=subprocess.PIPE, text=True)
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    threading.Thread(target=lambda: lines.put(parent.stdout.readline()), daemon=True).start()
    try:
        assert lines.get(timeout=120).strip() == "ready"
        assert len(stage_processes(tag)) == 2
        parent.kill()
        parent.wait()
        assert wait_until(lambda: not stage_processes(tag), ORPHANS_GONE_WITHIN_S), stage_processes(tag)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()
        for leftover in stage_processes(tag):  # do not leak workers if the test failed
            leftover.kill()
