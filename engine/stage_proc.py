"""A pipeline stage as a local worker process, and the link sender that every ring hop shares.

`engine.ring_zmq.ProcessRing` starts one worker per stage:

    python -m engine.stage_proc --index I --n-stages N --parent-pid PID --tag TAG
                                [--threads K] [--link-mbps X] [--link-latency-ms Y]

Start-up handshake, over the process's pipes and before any socket traffic: the worker binds its
control ROUTER and its data PULL on 127.0.0.1 with ports chosen by the OS and writes one line to
stdout, `FLOWSPEC-STAGE control=tcp://127.0.0.1:P data=tcp://127.0.0.1:Q`; it then reads one line
from stdin, `next=tcp://127.0.0.1:R`, the data endpoint of its next hop (stage I+1, or the
coordinator for the last stage). The pipes carry only these two lines, the way command-line
arguments would; every message afterwards is an `engine.wire` message on a socket:

- control ROUTER, whose one peer is the coordinator's DEALER: LoadStage -> StageReady or
  StageFailed; Shutdown.
- data: PULL from the previous hop, PUSH to the next. A batch is everything queued in the PULL, so
  a Prune that overtakes a queued Segment prunes it in flight (see engine/stage_worker.py).

The worker dies with its parent: PR_SET_PDEATHSIG on Linux, and its poll loop exits when its
parent pid changes. It ignores SIGINT, because Ctrl-C is the parent's to handle (by closing the
ring). Logs go to stderr as `LEVEL name: message`, which ProcessRing forwards to its own logger.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence

import torch
import zmq

from engine import wire
from engine.config import LinkConfig
from engine.stage import load_stage
from engine.stage_worker import StageWorker
from engine.tensor_codec import decode_tensors, encode_tensors
from engine.wire import LoadStage, Prune, Reset, Segment, Shutdown, StageFailed, StageReady, WireError

logger = logging.getLogger(__name__)

LOOPBACK = "tcp://127.0.0.1"
HANDSHAKE_PREFIX = "FLOWSPEC-STAGE"
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"  # ProcessRing reads the level from word one
POLL_MS = 100  # the serve loop checks its parent at least this often
SEND_POLL_MS = 100  # a blocked link sender checks for close at least this often
FAILED_WAIT_S = 10.0  # after StageFailed, how long to wait for the coordinator's Shutdown
SENDER_JOIN_S = 2.0

EXIT_OK = 0
EXIT_FAILED = 3  # could not load or run the stage; the reason went out as StageFailed
EXIT_ORPHANED = 4  # the parent died
EXIT_HANDSHAKE = 5  # the start-up handshake on stdin/stdout failed

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_STOP = object()  # tells a LinkSender thread to close its socket and end
DATA_MESSAGES = (Segment, Prune, Reset)


def format_handshake(control_endpoint: str, data_endpoint: str) -> str:
    """The one line a worker writes to stdout once its sockets are bound."""
    return f"{HANDSHAKE_PREFIX} control={control_endpoint} data={data_endpoint}\n"


def parse_handshake(line: str) -> tuple[str, str]:
    """(control endpoint, data endpoint) from a handshake line; ValueError if it is not one."""
    words = line.split()
    fields = dict(word.partition("=")[::2] for word in words[1:])
    if len(words) != 3 or words[0] != HANDSHAKE_PREFIX or set(fields) != {"control", "data"}:
        raise ValueError(f"expected '{HANDSHAKE_PREFIX} control=... data=...', got {line[:200]!r}")
    return fields["control"], fields["data"]


class LinkSender:
    """Sends wire frames to one endpoint over a PUSH socket, through an emulated link if one is set.

    Without an active link the caller's thread owns the socket and sends at once. With one, a
    sender thread owns it (S9) and emulates the hop: a message of B bytes occupies the link for
    B * 8 / bps seconds after the messages before it, then arrives `latency_ms` later. `send` never
    waits for that delay, so the sender computes on while its message is "on the wire".
    """

    def __init__(self, context: zmq.Context, endpoint: str, link: LinkConfig | None = None,
                 name: str = "link") -> None:
        self._link = link if link is not None and link.active else None
        self._free_at = 0.0  # monotonic time at which the emulated link finishes its last message
        self._error: BaseException | None = None
        self._stopping = threading.Event()
        self._socket: zmq.Socket | None = None
        self._thread: threading.Thread | None = None
        if self._link is None:
            self._socket = _push_socket(context, endpoint)
            return
        self._queue: queue.SimpleQueue = queue.SimpleQueue()  # (due time, frames) | _STOP
        self._thread = threading.Thread(target=self._run, args=(context, endpoint), name=name, daemon=True)
        self._thread.start()

    def send(self, frames: Sequence[bytes | memoryview]) -> None:
        """Send now, or queue for the emulated link; raises if the sender thread has failed."""
        if self._link is None:
            self._socket.send_multipart(frames)
            return
        if self._error is not None:
            raise RuntimeError(f"the link sender failed: {self._error!r}") from self._error
        now = time.monotonic()
        nbytes = sum(memoryview(frame).nbytes for frame in frames)
        transmit_s = self._link.delay_s(nbytes) - self._link.delay_s(0)
        self._free_at = max(now, self._free_at) + transmit_s
        self._queue.put((self._free_at + self._link.delay_s(0), list(frames)))

    def close(self) -> None:
        """Drop what is still on the emulated link and close the socket."""
        if self._thread is None:
            if self._socket is not None:
                self._socket.close(linger=0)
                self._socket = None
            return
        self._stopping.set()
        self._queue.put(_STOP)
        self._thread.join(SENDER_JOIN_S)
        if self._thread.is_alive():
            logger.warning("link sender %s did not stop within %.0f s", self._thread.name, SENDER_JOIN_S)

    def _run(self, context: zmq.Context, endpoint: str) -> None:
        """The sender thread. Boundary: any error is logged and kept, and the next `send` raises it,
        so a broken link fails the caller instead of silently swallowing messages."""
        socket = _push_socket(context, endpoint)
        on_link: deque = deque()  # (due time, frames); due times never decrease (a FIFO link)
        try:
            while True:
                timeout = None if not on_link else max(0.0, on_link[0][0] - time.monotonic())
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    item = None
                if item is _STOP:
                    return
                if item is not None:
                    on_link.append(item)
                now = time.monotonic()
                while on_link and on_link[0][0] <= now:
                    if not send_when_writable(socket, on_link.popleft()[1], self._stopping):
                        return
        except Exception as exc:  # noqa: BLE001 - reported through send(), see docstring
            logger.exception("link sender %s failed", threading.current_thread().name)
            self._error = exc
        finally:
            socket.close(linger=0)


def drain_data(pull: zmq.Socket, label: str) -> list[tuple[object, list[torch.Tensor]]]:
    """Every data message waiting on `pull`, decoded; malformed or misdirected ones logged and dropped."""
    batch = []
    while True:
        try:
            frames = pull.recv_multipart(zmq.NOBLOCK, copy=False)
        except zmq.Again:
            return batch
        try:
            msg, tensors = decode_tensors(frames)
        except WireError as exc:
            logger.error("%s: dropped a malformed message from the previous hop: %s", label, exc)
            continue
        if not isinstance(msg, DATA_MESSAGES):
            logger.error("%s: dropped a %s that came on the data socket", label, type(msg).__name__)
            continue
        batch.append((msg, tensors))


def send_when_writable(socket: zmq.Socket, frames: list, stopping: threading.Event) -> bool:
    """Send, waiting while the peer's queue is full; False if `stopping` is set meanwhile."""
    while not socket.poll(SEND_POLL_MS, zmq.POLLOUT):
        if stopping.is_set():
            return False
    socket.send_multipart(frames)
    return True


def _push_socket(context: zmq.Context, endpoint: str) -> zmq.Socket:
    socket = context.socket(zmq.PUSH)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    return socket


class StageProcess:
    """One stage's sockets and serve loop. The main thread owns every socket but the data PUSH,
    which its LinkSender owns."""

    def __init__(self, context: zmq.Context, args: argparse.Namespace) -> None:
        self.context, self.args = context, args
        self.label = f"stage {args.index + 1}/{args.n_stages}"
        self.control = context.socket(zmq.ROUTER)
        self.pull = context.socket(zmq.PULL)
        for socket in (self.control, self.pull):
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.control_endpoint = f"{LOOPBACK}:{self.control.bind_to_random_port(LOOPBACK)}"
        self.data_endpoint = f"{LOOPBACK}:{self.pull.bind_to_random_port(LOOPBACK)}"
        self.sender: LinkSender | None = None
        self.worker: StageWorker | None = None
        self.peer: bytes | None = None  # routing id of the coordinator's DEALER
        self.last = False

    def handshake(self) -> None:
        """Report the bound endpoints on stdout; read the next hop's endpoint from stdin."""
        sys.stdout.write(format_handshake(self.control_endpoint, self.data_endpoint))
        sys.stdout.flush()
        line = sys.stdin.readline()
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints must not fill the pipe
        key, _, endpoint = line.strip().partition("=")
        if key != "next" or not endpoint.startswith(LOOPBACK + ":"):
            raise ValueError(f"expected 'next={LOOPBACK}:PORT' on stdin, got {line[:200]!r}")
        link = LinkConfig(self.args.link_mbps, self.args.link_latency_ms)
        self.sender = LinkSender(self.context, endpoint, link, name=f"{self.label} link")

    def run(self) -> int:
        """Serve until Shutdown, parent death or failure; return the process's exit code.

        Boundary: any exception while loading or computing is logged with its traceback and sent
        to the coordinator as StageFailed(reason). The stage's KV cache can no longer be trusted,
        so the worker stops rather than serve wrong hidden states.
        """
        try:
            return self._serve()
        except Exception as exc:  # noqa: BLE001 - reported as StageFailed, see docstring
            logger.exception("%s failed", self.label)
            return self._fail(f"{type(exc).__name__}: {exc}")

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
        self.control.close(linger=0)
        self.pull.close(linger=0)

    def _serve(self) -> int:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.pull, zmq.POLLIN)
        while True:
            ready = dict(poller.poll(POLL_MS))
            if os.getppid() != self.args.parent_pid:
                logger.warning("%s: parent %d is gone; exiting", self.label, self.args.parent_pid)
                return EXIT_ORPHANED
            if self.control in ready and self._on_control():
                return EXIT_OK
            if self.pull in ready:
                self._on_data()

    def _on_control(self) -> bool:
        """Handle one control message; True on Shutdown."""
        peer, *body = self.control.recv_multipart()
        try:
            msg, _ = wire.decode(body)
        except WireError as exc:
            logger.error("%s: dropped a malformed control message: %s", self.label, exc)
            return False
        if isinstance(msg, Shutdown):
            logger.info("%s: shutting down", self.label)
            return True
        if isinstance(msg, LoadStage):
            self.peer = peer
            self._load(msg)
        else:
            logger.warning("%s: ignored a %s on the control socket", self.label, type(msg).__name__)
        return False

    def _load(self, msg: LoadStage) -> None:
        if (msg.stage_index, msg.n_stages) != (self.args.index, self.args.n_stages):
            raise ValueError(f"{self.label} was sent LoadStage for stage {msg.stage_index + 1}/{msg.n_stages}")
        t0 = time.monotonic()
        module = load_stage(msg.model, msg.start, msg.end, msg.dtype)
        self.worker = StageWorker(module, msg.stage_index, msg.n_stages)
        self.last = msg.stage_index == msg.n_stages - 1
        load_s = time.monotonic() - t0
        self._reply(StageReady(msg.stage_index, msg.start, msg.end, module.n_params(), load_s))

    def _on_data(self) -> None:
        """Drain the PULL socket into one batch, run it, and send the results to the next hop."""
        batch = drain_data(self.pull, self.label)
        if not batch:
            return
        if self.worker is None:
            logger.error("%s: dropped %d data messages that came before LoadStage", self.label, len(batch))
            return
        logger.debug("%s: batch of %d messages", self.label, len(batch))
        for msg, tensors in self.worker.handle(batch):
            if self.last and not tensors:  # only segments travel back to the coordinator
                continue
            self.sender.send(encode_tensors(msg, tensors))

    def _reply(self, msg: StageReady | StageFailed) -> None:
        self.control.send_multipart([self.peer, *wire.encode(msg)])

    def _fail(self, reason: str) -> int:
        """Send StageFailed, then wait (briefly) for Shutdown so the reply is not lost with LINGER=0."""
        if self.peer is None:
            return EXIT_FAILED
        try:
            self._reply(StageFailed(self.args.index, reason[:4000]))
        except zmq.ZMQError as exc:
            logger.error("%s: could not report the failure to the coordinator: %s", self.label, exc)
            return EXIT_FAILED
        deadline = time.monotonic() + FAILED_WAIT_S
        while time.monotonic() < deadline and os.getppid() == self.args.parent_pid:
            if self.control.poll(POLL_MS) and self._on_control():
                break
        return EXIT_FAILED


def die_with_parent(parent_pid: int) -> None:
    """Have Linux SIGKILL this process when its parent dies; exit now if it already has.

    Done here rather than in a `preexec_fn`, which is unsafe in a parent with threads. Linux sends
    the signal when the *thread* that started this process ends, so ProcessRing must be created on
    a thread that lives as long as the ring. Elsewhere the serve loop's parent-pid check remains.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            logger.warning("prctl(PR_SET_PDEATHSIG) failed: %s", os.strerror(ctypes.get_errno()))
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        raise SystemExit(EXIT_ORPHANED)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m engine.stage_proc", description=__doc__.split("\n")[0])
    parser.add_argument("--index", type=int, required=True, help="this stage's index, from 0")
    parser.add_argument("--n-stages", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True, help="exit when this process is gone")
    parser.add_argument("--tag", default="", help="a marker that identifies the ring's workers")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--link-mbps", type=float, default=None, help="emulated bandwidth of the next hop")
    parser.add_argument("--link-latency-ms", type=float, default=0.0, help="emulated latency of the next hop")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=LOG_FORMAT)
    die_with_parent(args.parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(max(1, args.threads))
    context = zmq.Context()
    process = StageProcess(context, args)
    try:
        try:
            process.handshake()
        except (OSError, ValueError) as exc:
            logger.error("stage %d/%d: start-up handshake failed: %s", args.index + 1, args.n_stages, exc)
            return EXIT_HANDSHAKE
        return process.run()
    finally:
        process.close()
        context.term()


if __name__ == "__main__":
    exit_code = main()
    logging.shutdown()
    sys.stderr.flush()
    # Sockets are closed and logs flushed; skip the interpreter's teardown of torch and
    # transformers, which takes 1-2 s and would hold up ProcessRing.close().
    os._exit(exit_code)
