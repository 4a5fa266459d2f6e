"""ProcessRing: the pipeline as local worker processes joined by ZeroMQ on 127.0.0.1.

The ring is D0 (this process) -> stage 0 -> ... -> stage N-1 -> D0, one PUSH -> PULL link per
hop; each stage is a `python -m engine.stage_proc` process (see that module for the worker side
and the start-up handshake). ProcessRing has the interface of `engine.ring_local.LocalRing`, so a
`Coordinator` drives either one.

Sockets of D0: a PULL bound on an OS-chosen port (the last stage's next hop), a PUSH to stage 0
owned by a `LinkSender`, and one control DEALER per worker, connected to the worker's ROUTER.
Messages travel only as `engine.wire` frames. With `link` set, every hop's sender emulates the
link's bandwidth and latency, D0 -> stage 0 and last stage -> D0 included (labelled as emulation
wherever its numbers appear).

Liveness: the workers are children of this process, so `recv` watches them directly with
`Popen.poll()` between short polls; a dead worker raises `StageLost` within POLL_SLICE_S. A
worker whose compute failed sends StageFailed first, which also raises StageLost, with its reason.
Workers never outlive this process: `close()` (also on `with`, and from an atexit hook) shuts them
down, and each worker has PR_SET_PDEATHSIG and watches its parent pid.

Not thread-safe: create, use and close a ring from one thread at a time. On Linux the workers are
killed when the thread that created the ring ends, so create it on a thread that outlives it.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch
import zmq

from engine import wire
from engine.config import LinkConfig
from engine.coordinator import StageLost
from engine.stage_proc import LOOPBACK, LinkSender, parse_handshake
from engine.tensor_codec import decode_tensors, encode_tensors
from engine.wire import LoadStage, Segment, Shutdown, StageFailed, StageReady, WireError

logger = logging.getLogger(__name__)
worker_logger = logging.getLogger(__name__ + ".worker")  # what the workers write to stderr

START_TIMEOUT_S = 300.0  # default for start-up: spawn, handshake and loading the layers
POLL_SLICE_S = 0.1  # recv and start-up wait in slices this long, checking that workers live
SHUTDOWN_GRACE_S = 3.0  # after Shutdown, how long workers get to exit before SIGTERM
TERMINATE_GRACE_S = 2.0  # after SIGTERM, how long before SIGKILL
READER_JOIN_S = 1.0
STDERR_TAIL_LINES = 20  # kept per worker, for error messages
_REPO_ROOT = Path(__file__).resolve().parent.parent  # so `-m engine.stage_proc` imports this engine
_LOG_LEVELS = {name: getattr(logging, name) for name in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")}


class RingError(RuntimeError):
    """The ring could not start: a worker failed to spawn, hand-shake or load its layers."""


@dataclass
class _Worker:
    """D0's view of one stage process."""

    index: int
    start: int
    end: int
    name: str  # "stage 2/3"
    proc: subprocess.Popen
    tail: deque = field(default_factory=lambda: deque(maxlen=STDERR_TAIL_LINES))
    handshake: queue.SimpleQueue = field(default_factory=queue.SimpleQueue)  # first stdout line
    readers: list[threading.Thread] = field(default_factory=list)
    control: zmq.Socket | None = None  # DEALER -> the worker's ROUTER
    data_endpoint: str = ""

    @property
    def label(self) -> str:
        """The name and layers (inclusive, as people count them): "stage 2/3 (layers 2-2)"."""
        return f"{self.name} (layers {self.start}-{self.end - 1})"


def default_threads(n_stages: int) -> int:
    """torch threads per worker: the cores this process may use, less one for the coordinator,
    shared by the stages (at least one each)."""
    return max(1, (_cores() - 1) // max(1, n_stages))


def stage_threads(busy_stages: int, threads_per_stage: int) -> int:
    """torch threads per worker for a request that keeps `busy_stages` stages computing at once.

    One busy stage at a time (one segment in flight: `ar`, flowspec on shared cores) takes every
    core: the coordinator waits meanwhile and the other stages hold no work. Measured over 4 stage
    processes on 2 cores (SmolLM2, quick prompts): `ar` 15% and flowspec 12% more tokens/s with 2
    threads than with 1. Stages that compute side by side keep the start-up share.
    """
    return _cores() if busy_stages <= 1 else threads_per_stage


def coordinator_threads(n_stages: int, threads_per_stage: int) -> int:
    """torch threads for the coordinator's process beside its workers: the cores they leave free,
    at least one. More would make its OpenMP team spin against the workers for the same cores
    (on a busy 2-core machine a draft took 4x longer with 2 threads than with 1)."""
    return max(1, _cores() - n_stages * threads_per_stage)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class ProcessRing:
    """N local stage worker processes in a ring with this process as D0; see the module docstring.

    `bounds` holds each stage's half-open layer range [start, end), contiguous from layer 0.
    `on_progress` receives one human-readable line per start-up step. `tag` is passed to every
    worker on its command line (a random one by default), so its processes can be found.
    Raises RingError, after closing everything, if any stage fails to start.
    """

    def __init__(self, model: str, bounds: list[tuple[int, int]], dtype: str, link: LinkConfig | None = None,
                 on_progress: Callable[[str], None] | None = None, start_timeout_s: float = START_TIMEOUT_S,
                 threads_per_stage: int | None = None, tag: str | None = None) -> None:
        _check_bounds(bounds)
        self.n_stages = len(bounds)
        self.tag = tag or f"ring-{uuid.uuid4().hex[:12]}"
        self._link = link if link is not None and link.active else None
        self._progress = on_progress or (lambda line: None)
        self._busy = [0.0] * self.n_stages
        self._context = zmq.Context()
        self._workers: list[_Worker] = []
        self._sender: LinkSender | None = None
        self._pull: zmq.Socket | None = None
        self._poller = zmq.Poller()
        self._closed = False
        self._threads_before = torch.get_num_threads()  # given back on close: the coordinator's count is for this ring
        atexit.register(self.close)
        threads = self.threads_per_stage = threads_per_stage or default_threads(len(bounds))
        try:
            self._start(str(model), bounds, dtype, start_timeout_s, threads)
        except BaseException:
            self.close()
            raise
        self.coordinator_threads = coordinator_threads(self.n_stages, threads)
        torch.set_num_threads(self.coordinator_threads)
        # Stages that can compute at the same time: the cores the coordinator leaves, in workers' teams.
        self.parallel_stages = max(1, min(self.n_stages, (_cores() - self.coordinator_threads) // threads))

    # --- the Ring interface

    def stage_threads(self, in_flight: int) -> int:
        """torch threads each worker should use for a request keeping `in_flight` segments in flight
        (sent in its Reset); see the module-level `stage_threads`."""
        return stage_threads(min(in_flight, self.n_stages), self.threads_per_stage)

    def send(self, msg: object, tensors: list[torch.Tensor]) -> None:
        """Send a data message (Segment, Prune, Reset) to stage 0."""
        if self._closed:
            raise RingError("the ring is closed")
        self._sender.send(encode_tensors(msg, tensors))

    def recv(self, timeout_s: float) -> tuple[object, list[torch.Tensor]] | None:
        """The next message back from the last stage, or None after `timeout_s`.

        Raises StageLost when a worker has exited or reported StageFailed.
        """
        if self._closed:
            raise RingError("the ring is closed")
        deadline = time.monotonic() + timeout_s
        while True:
            wait_s = min(POLL_SLICE_S, max(0.0, deadline - time.monotonic()))
            ready = dict(self._poller.poll(int(wait_s * 1000)))
            if self._pull in ready:
                item = self._recv_data()
                if item is not None:
                    return item
            for worker in self._workers:
                if worker.control in ready:
                    self._on_control_while_running(worker)
            self._check_alive()
            if time.monotonic() >= deadline:
                return None

    def stage_busy_s(self) -> list[float]:
        """Seconds of compute per stage, summed over the segments that came back."""
        return list(self._busy)

    def close(self) -> None:
        """Shut every worker down (terminate, then kill, stragglers) and release all sockets."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        torch.set_num_threads(self._threads_before)
        for worker in self._workers:
            if worker.proc.poll() is not None:
                continue
            if worker.control is None:  # still starting: it cannot hear Shutdown yet
                worker.proc.terminate()
                continue
            try:
                worker.control.send_multipart(wire.encode(Shutdown()), zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # it will be terminated below
                logger.debug("%s: Shutdown not sent: %s", worker.label, exc)
        self._reap()
        if self._sender is not None:
            self._sender.close()
        for socket in [self._pull] + [w.control for w in self._workers]:
            if socket is not None:
                socket.close(linger=0)
        self._context.term()
        for worker in self._workers:
            for reader in worker.readers:
                reader.join(READER_JOIN_S)
            for pipe in (worker.proc.stdin, worker.proc.stdout, worker.proc.stderr):
                if pipe is not None and not pipe.closed:
                    pipe.close()

    def __enter__(self) -> ProcessRing:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- what tests and tools may look at

    @property
    def pids(self) -> list[int]:
        return [worker.proc.pid for worker in self._workers]

    @property
    def data_endpoints(self) -> list[str]:
        """Each stage's data PULL endpoint (stage i's inbox)."""
        return [worker.data_endpoint for worker in self._workers]

    # --- start-up

    def _start(self, model: str, bounds: list[tuple[int, int]], dtype: str, timeout_s: float, threads: int) -> None:
        deadline = time.monotonic() + timeout_s
        self._pull = self._context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
        return_endpoint = f"{LOOPBACK}:{self._pull.bind_to_random_port(LOOPBACK)}"
        self._poller.register(self._pull, zmq.POLLIN)
        for index, (start, end) in enumerate(bounds):
            self._workers.append(self._spawn(index, start, end, threads))
        for worker in self._workers:
            self._read_handshake(worker, deadline)
        for worker, successor in zip(self._workers, self._workers[1:] + [None]):
            try:
                worker.proc.stdin.write(f"next={successor.data_endpoint if successor else return_endpoint}\n")
                worker.proc.stdin.close()
            except BrokenPipeError:
                raise RingError(f"{worker.label} did not start: {self._exit_reason(worker, TERMINATE_GRACE_S)}") from None
        self._sender = LinkSender(self._context, self._workers[0].data_endpoint, self._link, name="D0 link")
        for worker in self._workers:
            self._progress(f"{worker.name}: loading layers {worker.start}-{worker.end - 1} ...")
            worker.control.send_multipart(wire.encode(
                LoadStage(model, worker.start, worker.end, dtype, worker.index, self.n_stages)))
        self._wait_ready(deadline, timeout_s)

    def _spawn(self, index: int, start: int, end: int, threads: int) -> _Worker:
        command = [sys.executable, "-m", "engine.stage_proc", "--index", str(index), "--n-stages",
                   str(self.n_stages), "--parent-pid", str(os.getpid()), "--threads", str(threads), "--tag", self.tag]
        if self._link is not None:
            command += ["--link-mbps", str(self._link.mbps or 0), "--link-latency-ms", str(self._link.latency_ms)]
        python_path = os.pathsep.join(p for p in (str(_REPO_ROOT), os.environ.get("PYTHONPATH")) if p)
        env = dict(os.environ, PYTHONPATH=python_path, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, encoding="utf-8", errors="replace", bufsize=1)
        worker = _Worker(index, start, end, f"stage {index + 1}/{self.n_stages}", proc)
        label = worker.label
        worker.readers = [
            threading.Thread(target=_read_handshake_line, args=(proc.stdout, worker.handshake),
                             name=f"{label} stdout", daemon=True),
            threading.Thread(target=_forward_stderr, args=(proc.stderr, label, worker.tail),
                             name=f"{label} stderr", daemon=True),
        ]
        for reader in worker.readers:
            reader.start()
        logger.debug("started %s as pid %d", label, proc.pid)
        return worker

    def _read_handshake(self, worker: _Worker, deadline: float) -> None:
        while True:
            try:
                line = worker.handshake.get(timeout=POLL_SLICE_S)
                break
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise RingError(f"{worker.label} did not start: no handshake in time") from None
        if not line:  # stdout closed: the worker died before binding its sockets
            raise RingError(f"{worker.label} did not start: {self._exit_reason(worker, wait_s=TERMINATE_GRACE_S)}")
        try:
            control_endpoint, worker.data_endpoint = parse_handshake(line)
        except ValueError as exc:
            raise RingError(f"{worker.label} did not start: {exc}") from exc
        worker.control = self._context.socket(zmq.DEALER)
        worker.control.setsockopt(zmq.LINGER, 0)
        worker.control.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
        worker.control.connect(control_endpoint)
        self._poller.register(worker.control, zmq.POLLIN)

    def _wait_ready(self, deadline: float, timeout_s: float) -> None:
        waiting = {worker.index for worker in self._workers}
        while waiting:
            ready = dict(self._poller.poll(int(POLL_SLICE_S * 1000)))
            for worker in self._workers:
                if worker.control not in ready:
                    continue
                msg = self._recv_control(worker)
                if isinstance(msg, StageReady):
                    waiting.discard(worker.index)
                    self._progress(f"{worker.name} ready in {msg.load_s:.1f} s")
                elif isinstance(msg, StageFailed):
                    raise RingError(f"{worker.label} failed to load: {msg.reason}")
            for worker in self._workers:
                if worker.index in waiting and worker.proc.poll() is not None:
                    raise RingError(f"{worker.label} failed to load: {self._exit_reason(worker)}")
            if waiting and time.monotonic() > deadline:
                labels = ", ".join(w.label for w in self._workers if w.index in waiting)
                raise RingError(f"{labels} not ready after {timeout_s:.0f} s")

    # --- while running

    def _recv_data(self) -> tuple[object, list[torch.Tensor]] | None:
        frames = self._pull.recv_multipart(copy=False)
        try:
            msg, tensors = decode_tensors(frames)
        except WireError as exc:
            logger.error("dropped a malformed message from the last stage: %s", exc)
            return None
        if isinstance(msg, Segment):
            for index, seconds in enumerate(msg.busy_s[: self.n_stages]):
                self._busy[index] += seconds
        return msg, tensors

    def _recv_control(self, worker: _Worker) -> object | None:
        frames = worker.control.recv_multipart(copy=False)
        try:
            return wire.decode(frames)[0]
        except WireError as exc:
            logger.error("%s: dropped a malformed control message: %s", worker.label, exc)
            return None

    def _on_control_while_running(self, worker: _Worker) -> None:
        msg = self._recv_control(worker)
        if isinstance(msg, StageFailed):
            raise StageLost(f"{worker.label} failed: {msg.reason}")
        if msg is not None:
            logger.warning("%s: unexpected %s on the control socket", worker.label, type(msg).__name__)

    def _check_alive(self) -> None:
        for worker in self._workers:
            if worker.proc.poll() is not None:
                raise StageLost(f"{worker.label} is lost: {self._exit_reason(worker)}")

    def _exit_reason(self, worker: _Worker, wait_s: float = 0.0) -> str:
        """Why a worker ended: the signal that killed it, or its exit code and last stderr line."""
        try:
            code = worker.proc.wait(wait_s) if wait_s else worker.proc.poll()
        except subprocess.TimeoutExpired:
            code = None
        worker.readers[-1].join(READER_JOIN_S if code is not None else 0)  # let stderr drain
        if code is None:
            return "it closed its output but is still running"
        if code < 0:
            return f"killed by {signal.Signals(-code).name} (exit code {code})"
        last = next((line for line in reversed(worker.tail) if line.strip()), "")
        return f"exited with code {code}; its last output: {last}" if last else f"exited with code {code}"

    # --- teardown

    def _reap(self) -> None:
        """Wait for the workers to exit after Shutdown; terminate, then kill, the rest."""
        alive = [w.proc for w in self._workers if _wait(w.proc, 0)]
        deadline = time.monotonic() + SHUTDOWN_GRACE_S
        alive = [p for p in alive if _wait(p, max(0.0, deadline - time.monotonic()))]
        for proc in alive:
            proc.terminate()
        deadline = time.monotonic() + TERMINATE_GRACE_S
        alive = [p for p in alive if _wait(p, max(0.0, deadline - time.monotonic()))]
        for proc in alive:
            logger.warning("worker pid %d ignored SIGTERM; killing it", proc.pid)
            proc.kill()
            proc.wait()


def _wait(proc: subprocess.Popen, timeout_s: float) -> bool:
    """Wait up to timeout_s for proc to exit; True if it is still running."""
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        return True
    return False


def _check_bounds(bounds: list[tuple[int, int]]) -> None:
    if not bounds:
        raise ValueError("a ring needs at least one stage")
    previous_end = 0
    for index, (start, end) in enumerate(bounds):
        if start != previous_end or not start < end:
            raise ValueError(f"stage {index + 1} has layers [{start}, {end}); ranges must be non-empty, "
                             f"contiguous and start at layer 0: {bounds}")
        previous_end = end


def _read_handshake_line(stream: IO[str], out: queue.SimpleQueue) -> None:
    """Reader thread: hand the worker's first stdout line ("" at EOF) to the starting thread."""
    out.put(stream.readline())


def _forward_stderr(stream: IO[str], label: str, tail: deque) -> None:
    """Reader thread: log each stderr line of a worker at its own level (tracebacks keep the level
    of the record they follow) and keep the last lines for error messages."""
    level = logging.WARNING
    for line in stream:
        line = line.rstrip("\n")
        tail.append(line)
        level = _LOG_LEVELS.get(line.partition(" ")[0], level)
        worker_logger.log(level, "[%s] %s", label, line)
