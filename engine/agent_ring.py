"""AgentRing: the pipeline over `flowspec-agent`s, every socket CurveZMQ; the interface of ProcessRing.

The ring is D0 (this process) -> agent 1 -> ... -> agent N -> D0. Set-up, on the caller's thread:
Hello to each paired agent (its control port), HostStage with the stage's bundle manifest, weights
for agents that lack them (engine/agent_client.py), StageReady from all. Each agent's data PULL
accepts only the previous hop's key (this client's for stage 1); this process's return PULL
accepts only the last agent's key, checked by a KeyGate during the handshake.

Threads (S9): the caller's thread owns the data PUSH (to stage 1) and the return PULL; after
set-up a watcher thread owns the control DEALERs: it sends a Heartbeat to every agent each
HEARTBEAT_INTERVAL_S, reads theirs, and marks the ring lost when an agent's control connection
drops, when it reports StageFailed, or when nothing came from it for HEARTBEAT_LIVENESS_S. `recv`
then raises StageLost within POLL_SLICE_S. `close()` unloads the stages and frees everything.

Not thread-safe: create, use and close a ring from one thread.
"""

from __future__ import annotations

import logging
import socket as socketlib
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from engine import wire
from engine.agent_client import (AgentError, ClientKeys, Connection, PairedAgent, endpoint, send_weights,
                                 split_address, stage_bundle)
from engine.coordinator import StageLost
from engine.curve_auth import KeyGate, curve_client, curve_server
from engine.ring_zmq import RingError
from engine.tensor_codec import decode_tensors, encode_tensors

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 300.0
POLL_SLICE_S = 0.1
HEARTBEAT_INTERVAL_S = 0.5
HEARTBEAT_LIVENESS_S = 2.5  # silence after which an agent is lost
WATCH_JOIN_S = 3.0


@dataclass
class _Stage:
    index: int
    device: str
    start: int
    end: int
    agent: PairedAgent
    host: str
    connection: Connection
    data_port: int = 0
    last_seen: float = 0.0
    label: str = ""


def local_address_towards(host: str) -> str:
    """The address of this machine on the route to `host` (no packet is sent)."""
    with socketlib.socket(socketlib.AF_INET, socketlib.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, 9))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


class AgentRing:
    """Stages on agents; `stages` lists (device, start, end) with device an agent id or host:port."""

    def __init__(self, model: str, model_dir: str | Path, stages: Sequence[tuple[str, int, int]], dtype: str,
                 keys: ClientKeys | None = None, on_progress: Callable[[str], None] | None = None,
                 start_timeout_s: float = START_TIMEOUT_S) -> None:
        _check_stages(stages)
        self.n_stages = len(stages)
        self.keys = keys or ClientKeys()
        self._progress = on_progress or (lambda line: None)
        self._busy = [0.0] * self.n_stages
        self._lost: str | None = None
        self._closed = False
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._context = zmq.Context()
        self._stages: list[_Stage] = []
        self._push = self._pull = None
        self._gate = KeyGate(self._context, {"return": self._return_allowed}, label="client")
        self._gate.start()
        try:
            self._start(model, Path(model_dir), stages, dtype, start_timeout_s)
        except BaseException:
            self.close()
            raise

    # --- the Ring interface

    def send(self, msg: object, tensors: list[torch.Tensor]) -> None:
        if self._closed:
            raise RingError("the ring is closed")
        if self._lost:
            raise StageLost(self._lost)
        frames = encode_tensors(msg, tensors)
        deadline = time.monotonic() + HEARTBEAT_LIVENESS_S * 2
        while not self._push.poll(int(POLL_SLICE_S * 1000), zmq.POLLOUT):
            if self._lost:
                raise StageLost(self._lost)
            if time.monotonic() > deadline:
                raise StageLost(f"{self._stages[0].label} does not take data")
        self._push.send_multipart(frames)

    def recv(self, timeout_s: float) -> tuple[object, list[torch.Tensor]] | None:
        """The next message back from the last stage, or None after `timeout_s`; StageLost when an
        agent was lost (see the module docstring)."""
        if self._closed:
            raise RingError("the ring is closed")
        deadline = time.monotonic() + timeout_s
        while True:
            if self._lost:
                raise StageLost(self._lost)
            wait_s = min(POLL_SLICE_S, max(0.0, deadline - time.monotonic()))
            if self._pull.poll(int(wait_s * 1000)):
                frames = self._pull.recv_multipart(copy=False)
                try:
                    msg, tensors = decode_tensors(frames)
                except wire.WireError as exc:
                    logger.error("dropped a malformed message from the last stage: %s", exc)
                    continue
                if isinstance(msg, wire.Segment):
                    for index, seconds in enumerate(msg.busy_s[: self.n_stages]):
                        self._busy[index] += seconds
                return msg, tensors
            if time.monotonic() >= deadline:
                return None

    def stage_busy_s(self) -> list[float]:
        return list(self._busy)

    def close(self) -> None:
        """Unload every stage, stop the watcher and release all sockets."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(WATCH_JOIN_S)
        else:
            for stage in self._stages:
                _quietly_send(stage.connection, wire.Unload())
                stage.connection.close()
        for socket in (self._push, self._pull):
            if socket is not None:
                socket.close(linger=0)
        self._gate.stop()
        self._context.term()

    def __enter__(self) -> AgentRing:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def agents(self) -> list[PairedAgent]:
        return [stage.agent for stage in self._stages]

    # --- set-up

    def _start(self, model: str, model_dir: Path, stages: Sequence[tuple[str, int, int]], dtype: str,
               timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for index, (device, start, end) in enumerate(stages):
            self._stages.append(self._connect(index, device, start, end))
        # Agents on one host share its cores: they compute in turn, so a host counts once.
        self.parallel_stages = len({stage.host for stage in self._stages})
        for stage in self._stages:
            caps = stage.connection.request(wire.Hello(client_name=self.keys.name[:200]), wire.Capabilities)
            if caps.public_key != stage.agent.public_key:
                raise RingError(f"{stage.label} answered with a different key than at pairing: pair with it again")
            stage.data_port = caps.data_port
            stage.last_seen = time.monotonic()
        self._pull = self._context.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
        curve_server(self._pull, self.keys.secret_key, "return")
        last = self._stages[-1]
        return_host = local_address_towards(last.host)
        return_port = self._pull.bind_to_random_port(endpoint(return_host, 0).rpartition(":")[0])
        bundles = []
        for stage, successor in zip(self._stages, [*self._stages[1:], None]):
            self._progress(f"{stage.label}: hashing the stage's weights ...")
            bundle = stage_bundle(model_dir, stage.start, stage.end, cache_dir=self.keys.path)
            bundles.append(bundle)
            previous_key = self._stages[stage.index - 1].agent.public_key if stage.index else self.keys.public_key
            if successor is None:
                next_endpoint, next_key = endpoint(return_host, return_port), self.keys.public_key
            else:
                next_endpoint, next_key = endpoint(successor.host, successor.data_port), successor.agent.public_key
            stage.connection.send(wire.HostStage(
                model=model, bundle=bundle.bundle_id, start=stage.start, end=stage.end, dtype=dtype,
                stage_index=stage.index, n_stages=self.n_stages, next_endpoint=next_endpoint, next_key=next_key,
                prev_key=previous_key, config_json=bundle.config_json, tensors=bundle.tensors))
            self._progress(f"{stage.label}: loading ...")
        self._wait_ready(bundles, deadline, timeout_s)
        first = self._stages[0]
        self._push = self._context.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        curve_client(self._push, self.keys.public_key, self.keys.secret_key, first.agent.public_key)
        self._push.connect(endpoint(first.host, first.data_port))
        self._watcher = threading.Thread(target=self._watch, name="agent ring watcher", daemon=True)
        self._watcher.start()

    def _connect(self, index: int, device: str, start: int, end: int) -> _Stage:
        agent = self.keys.find(device)
        if agent is None:
            raise RingError(f"stage {index + 1} is on device {device!r}, which this client has not paired with: "
                            "run `flowspec pair HOST:PORT CODE` with the code the agent prints")
        if any(s.agent.agent_id == agent.agent_id for s in self._stages):
            raise RingError(f"agent {agent.name} ({agent.agent_id}) appears twice in the layout; an agent hosts one "
                            "stage: merge its ranges or start another agent")
        address = device if ":" in device else agent.address
        host, _ = split_address(address)
        connection = Connection(self._context, self.keys, address, agent.public_key)
        label = f"stage {index + 1}/{self.n_stages} on {agent.name} at {address} (layers {start}-{end - 1})"
        return _Stage(index, device, start, end, agent, host, connection, label=label)

    def _wait_ready(self, bundles: list, deadline: float, timeout_s: float) -> None:
        waiting = {stage.index for stage in self._stages}
        poller = zmq.Poller()
        for stage in self._stages:
            poller.register(stage.connection.socket, zmq.POLLIN)
        next_beat = 0.0
        while waiting:
            if time.monotonic() >= next_beat:
                for stage in self._stages:
                    stage.connection.send(wire.Heartbeat())
                next_beat = time.monotonic() + HEARTBEAT_INTERVAL_S
            ready = dict(poller.poll(int(POLL_SLICE_S * 1000)))
            for stage in self._stages:
                if stage.connection.socket in ready:
                    msg = stage.connection.recv(0)
                    if msg is not None:
                        self._on_setup_message(stage, msg, bundles[stage.index], waiting)
            if waiting and time.monotonic() > deadline:
                labels = ", ".join(s.label for s in self._stages if s.index in waiting)
                raise RingError(f"{labels} not ready after {timeout_s:.0f} s")

    def _on_setup_message(self, stage: _Stage, msg: wire.Message, bundle, waiting: set[int]) -> None:
        stage.last_seen = time.monotonic()
        if isinstance(msg, wire.StageReady):
            waiting.discard(stage.index)
            self._progress(f"{stage.label} ready in {msg.load_s:.1f} s")
        elif isinstance(msg, wire.StageFailed):
            raise RingError(f"{stage.label} failed to load: {msg.reason}")
        elif isinstance(msg, wire.CommandFailed):
            raise RingError(f"{stage.label} refused the stage: {msg.reason}")
        elif isinstance(msg, wire.WeightsNeeded):
            held = sum(msg.have)
            self._progress(f"{stage.label}: sending {(bundle.nbytes - held) / 2**20:.1f} MiB of weights"
                           f"{f' (resuming after {held / 2**20:.1f} MiB)' if held else ''} ...")
            shown = [0.0]

            def on_weights(done: int, total: int) -> None:
                if done == total or time.monotonic() - shown[0] > 1.0:
                    shown[0] = time.monotonic()
                    self._progress(f"{stage.label}: weights {done / 2**20:.1f}/{total / 2**20:.1f} MiB")

            try:
                others = send_weights(stage.connection, bundle, msg, on_weights)
            except AgentError as exc:
                raise RingError(f"{stage.label}: {exc}") from exc
            for other in others:
                self._on_setup_message(stage, other, bundle, waiting)
        elif isinstance(msg, wire.LoadProgress) and msg.phase == "loading":
            self._progress(f"{stage.label}: loading layers into memory ...")

    # --- liveness (the watcher thread owns the control sockets from here on)

    def _watch(self) -> None:
        """Boundary: any error here marks the ring lost (logged), so recv raises instead of hanging."""
        monitors = {}
        try:
            for stage in self._stages:
                monitors[stage.connection.socket.get_monitor_socket(zmq.EVENT_DISCONNECTED)] = stage
                stage.last_seen = time.monotonic()
            self._watch_loop(monitors)
        except Exception as exc:  # noqa: BLE001 - see docstring
            logger.exception("agent ring watcher failed")
            self._lost = self._lost or f"the ring's watcher failed: {exc}"
        finally:
            for stage in self._stages:
                if self._lost is None or stage.label not in self._lost:
                    _quietly_send(stage.connection, wire.Unload())
                stage.connection.socket.disable_monitor()
                stage.connection.close()
            for monitor in monitors:
                monitor.close(linger=0)

    def _watch_loop(self, monitors: dict) -> None:
        poller = zmq.Poller()
        for stage in self._stages:
            poller.register(stage.connection.socket, zmq.POLLIN)
        for monitor in monitors:
            poller.register(monitor, zmq.POLLIN)
        next_beat = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_beat:
                for stage in self._stages:
                    _quietly_send(stage.connection, wire.Heartbeat())
                next_beat = now + HEARTBEAT_INTERVAL_S
            ready = dict(poller.poll(int(POLL_SLICE_S * 1000)))
            for monitor, stage in monitors.items():
                if monitor in ready and recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
                    self._mark_lost(f"{stage.label} is lost: its connection dropped (agent stopped or unreachable)")
            for stage in self._stages:
                while stage.connection.socket in ready and (msg := stage.connection.recv(0)) is not None:
                    stage.last_seen = time.monotonic()
                    if isinstance(msg, wire.StageFailed):
                        self._mark_lost(f"{stage.label} failed: {msg.reason}")
            now = time.monotonic()
            for stage in self._stages:
                if now - stage.last_seen > HEARTBEAT_LIVENESS_S:
                    self._mark_lost(f"{stage.label} is lost: no heartbeat for {HEARTBEAT_LIVENESS_S:.1f} s")

    def _mark_lost(self, reason: str) -> None:
        if self._lost is None:
            logger.error("%s", reason)
            self._lost = reason

    def _return_allowed(self, key: str) -> bool:
        return bool(self._stages) and key == self._stages[-1].agent.public_key


def _quietly_send(connection: Connection, msg: wire.Message) -> None:
    try:
        connection.socket.send_multipart(wire.encode(msg), zmq.NOBLOCK)
    except zmq.ZMQError as exc:
        logger.debug("could not send %s to %s: %s", type(msg).__name__, connection.address, exc)


def _check_stages(stages: Sequence[tuple[str, int, int]]) -> None:
    if not stages:
        raise ValueError("a ring needs at least one stage")
    previous_end = 0
    for index, (_, start, end) in enumerate(stages):
        if start != previous_end or not start < end:
            raise ValueError(f"stage {index + 1} has layers [{start}, {end}); ranges must be non-empty, "
                             "contiguous and start at layer 0")
        previous_end = end
