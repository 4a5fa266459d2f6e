"""engine.wire over a real ZeroMQ PUSH/PULL pair on 127.0.0.1: bad messages are reported, and the
receiver keeps serving.

libzmq itself drops frames over `zmq.MAXMSGSIZE` (set from `wire.MAX_FRAME_BYTES`) by closing
the connection; the sender reconnects on its own. The limit is lowered for the test so an
oversized frame is cheap to build.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import dataclass

import pytest
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from engine import wire
from engine.tensor_codec import decode_tensors, encode_tensors
from engine.wire import PROTOCOL, Segment, Shutdown, WireError

pytestmark = pytest.mark.integration

TEST_MAX_FRAME_BYTES = 64 * 1024
POLL_MS = 50
WAIT_S = 10.0


@dataclass(frozen=True)
class Report:
    """One outcome of the receiver: "message", "error", "disconnected" or "crashed"."""

    outcome: str
    detail: object = None
    tensors: tuple[torch.Tensor, ...] = ()


class Receiver(threading.Thread):
    """Owns a PULL socket and its monitor (one thread per socket, STYLE S9) and reports every
    inbound message, decode error and disconnect on `reports`."""

    def __init__(self, context: zmq.Context) -> None:
        super().__init__(name="wire-receiver", daemon=True)
        self.context = context
        self.reports: queue.SimpleQueue[Report] = queue.SimpleQueue()
        self.ports: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.stop = threading.Event()

    def run(self) -> None:
        """Boundary: any exception becomes a "crashed" report, so the test sees it instead of a
        silent dead thread."""
        try:
            self._serve()
        except Exception as exc:  # noqa: BLE001 - reported to the test thread
            self.reports.put(Report("crashed", repr(exc)))

    def _serve(self) -> None:
        pull = self.context.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
        monitor = pull.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        try:
            self.ports.put(pull.bind_to_random_port("tcp://127.0.0.1"))
            poller = zmq.Poller()
            poller.register(pull, zmq.POLLIN)
            poller.register(monitor, zmq.POLLIN)
            while not self.stop.is_set():
                ready = dict(poller.poll(POLL_MS))
                if monitor in ready:
                    event = recv_monitor_message(monitor)
                    self.reports.put(Report("disconnected", event["event"]))
                if pull in ready and self._handle(pull.recv_multipart(copy=False)):
                    return
        finally:
            pull.disable_monitor()
            monitor.close(linger=0)
            pull.close(linger=0)

    def _handle(self, frames: list[zmq.Frame]) -> bool:
        """Decode one message and report it; True when it asks the receiver to stop."""
        try:
            msg, tensors = decode_tensors(frames)
        except WireError as exc:
            self.reports.put(Report("error", str(exc)))
            return False
        self.reports.put(Report("message", msg, tuple(tensors)))
        return isinstance(msg, Shutdown)


@pytest.fixture
def context():
    ctx = zmq.Context()
    yield ctx
    ctx.term()


def _wait_for_event(monitor: zmq.Socket, wanted: int) -> None:
    while monitor.poll(int(WAIT_S * 1000)):
        if recv_monitor_message(monitor)["event"] == wanted:
            return
    raise AssertionError(f"no zmq monitor event {wanted} within {WAIT_S} s")


def test_receiver_reports_bad_messages_and_keeps_serving(context, monkeypatch):
    monkeypatch.setattr(wire, "MAX_FRAME_BYTES", TEST_MAX_FRAME_BYTES)
    receiver = Receiver(context)
    receiver.start()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.setsockopt(zmq.RECONNECT_IVL, 10)
    push_monitor = push.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        push.connect(f"tcp://127.0.0.1:{receiver.ports.get(timeout=WAIT_S)}")
        segment = Segment(request_id=5, seg_id=1, epoch=0, prefix_len=12, start=0, masked=True,
                          busy_s=(0.002,))
        tensors = [
            torch.randn(1, 3, 8, dtype=torch.bfloat16),  # [1, n, hidden]
            torch.arange(12, 15),  # [n]
            torch.tril(torch.ones(3, 3, dtype=torch.bool)).reshape(1, 1, 3, 3),  # [1, 1, n, n]
        ]
        valid = encode_tensors(segment, tensors)

        push.send_multipart([PROTOCOL, b"\xc1 not a header"])
        push.send_multipart([b"FLOWSPEC2", *valid[1:]])
        assert receiver.reports.get(timeout=WAIT_S) == Report(
            "error", "Header is not valid msgpack: MessagePack data is malformed: invalid opcode "
            "'\\xc1' (byte 0)."
        )
        wrong_version = receiver.reports.get(timeout=WAIT_S)
        assert wrong_version.outcome == "error"
        assert "FLOWSPEC2 but this side speaks FLOWSPEC1; update this side" in wrong_version.detail

        push.send_multipart([PROTOCOL, valid[1], b"\x00" * (TEST_MAX_FRAME_BYTES + 1)])
        dropped = receiver.reports.get(timeout=WAIT_S)  # by libzmq, before decode sees it
        assert dropped == Report("disconnected", zmq.EVENT_DISCONNECTED)
        _wait_for_event(push_monitor, zmq.EVENT_DISCONNECTED)  # the oversized frame is gone
        _wait_for_event(push_monitor, zmq.EVENT_HANDSHAKE_SUCCEEDED)  # and PUSH reconnected

        push.send_multipart(valid, copy=False)
        push.send_multipart(wire.encode(Shutdown()))
        received = receiver.reports.get(timeout=WAIT_S)
        assert received.outcome == "message" and received.detail == segment
        assert len(received.tensors) == len(tensors)
        for got, sent in zip(received.tensors, tensors):
            assert got.dtype == sent.dtype and torch.equal(got, sent)
        assert receiver.reports.get(timeout=WAIT_S) == Report("message", Shutdown())
    finally:
        receiver.stop.set()
        receiver.join(timeout=WAIT_S)
        push.disable_monitor()
        push_monitor.close(linger=0)
        push.close(linger=0)
    assert not receiver.is_alive()
    assert receiver.reports.empty()
