"""One hosted pipeline stage: a thread that loads the layers and serves the data plane.

The thread owns the stage's two data sockets (S9): a CURVE PULL bound on the agent's data port,
which accepts only the previous hop's key (ZAP domain "data"), and a CURVE PUSH to the next hop.
Serving is the same as a local worker's (engine/stage_proc.py): drain the PULL into one batch,
run it through `engine.stage_worker.StageWorker`, send the results on; the last stage sends only
segments back to the client. The agent's main thread keeps answering heartbeats meanwhile.

Events for the client (LoadProgress, StageReady, StageFailed) go to `events`, which the main
thread forwards on the control socket.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

import zmq

from agent.weights import Receiving
from engine import wire
from engine.curve_auth import curve_client, curve_server

logger = logging.getLogger(__name__)

POLL_MS = 100
JOIN_S = 10.0


class StageHost(threading.Thread):
    """Loads `msg`'s layers from `model_dir` and serves them until `stop()`. A bundle still being
    received (agent.weights.Receiving) is checked and installed first, on this thread, so a large
    stage never holds up the agent's heartbeats."""

    def __init__(self, context: zmq.Context, keys: tuple[str, str], msg: wire.HostStage, model_dir: Path | Receiving,
                 data_endpoint: str, events: queue.SimpleQueue) -> None:
        super().__init__(name=f"stage {msg.stage_index + 1}/{msg.n_stages}", daemon=True)
        self.context, self.keys, self.msg, self.model_dir = context, keys, msg, model_dir
        self.data_endpoint, self.events = data_endpoint, events
        self.label = f"stage {msg.stage_index + 1}/{msg.n_stages} (layers {msg.start}-{msg.end - 1})"
        self._stopping = threading.Event()
        self.ready = False

    def stop(self) -> None:
        """Ask the thread to end and wait for it (its sockets close on its own thread)."""
        self._stopping.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(JOIN_S)
            if self.is_alive():
                logger.warning("%s did not stop within %.0f s", self.label, JOIN_S)

    def run(self) -> None:
        """Boundary: a failure while loading or computing is logged and reported as StageFailed;
        the stage's KV cache can no longer be trusted, so the thread stops serving."""
        pull = push = None
        try:  # torch is imported here (or already by the agent's warm-up thread), not at agent start
            from engine.stage import load_stage
            from engine.stage_worker import StageWorker

            msg = self.msg
            self.events.put(wire.LoadProgress(msg.stage_index, "loading", 0, 1))
            t0 = time.monotonic()
            if isinstance(self.model_dir, Receiving):
                self.model_dir = self.model_dir.install()
            module = load_stage(self.model_dir, msg.start, msg.end, msg.dtype)
            worker = StageWorker(module, msg.stage_index, msg.n_stages)
            pull = self.context.socket(zmq.PULL)
            pull.setsockopt(zmq.LINGER, 0)
            pull.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
            curve_server(pull, self.keys[1], "data")
            pull.bind(self.data_endpoint)
            push = self.context.socket(zmq.PUSH)
            push.setsockopt(zmq.LINGER, 0)
            curve_client(push, self.keys[0], self.keys[1], msg.next_key)
            push.connect(msg.next_endpoint)
            if self._stopping.is_set():
                return
            self.ready = True
            self.events.put(wire.StageReady(msg.stage_index, msg.start, msg.end, module.n_params(), time.monotonic() - t0))
            logger.info("%s ready; data on %s, next hop %s", self.label, self.data_endpoint, msg.next_endpoint)
            self._serve(pull, push, worker, last=msg.stage_index == msg.n_stages - 1)
        except Exception as exc:  # noqa: BLE001 - reported as StageFailed, see docstring
            logger.exception("%s failed", self.label)
            self.events.put(wire.StageFailed(self.msg.stage_index, f"{type(exc).__name__}: {exc}"[:4000]))
        finally:
            for socket in (pull, push):
                if socket is not None:
                    socket.close(linger=0)

    def _serve(self, pull: zmq.Socket, push: zmq.Socket, worker, last: bool) -> None:
        from engine.stage_proc import drain_data, send_when_writable
        from engine.tensor_codec import encode_tensors

        while not self._stopping.is_set():
            if not pull.poll(POLL_MS):
                continue
            batch = drain_data(pull, self.label)
            for msg, tensors in worker.handle(batch) if batch else []:
                if last and not tensors:
                    continue
                if not send_when_writable(push, encode_tensors(msg, tensors), self._stopping):
                    return

