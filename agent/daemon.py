"""The agent: control and pairing sockets, one hosted stage, heartbeats, mDNS.

Sockets (all CurveZMQ, all checked by one `engine.curve_auth.KeyGate`):

- control ROUTER on PORT, ZAP domain "control": only paired clients' keys complete the handshake,
  so nothing from anyone else is ever parsed. Commands: Hello, StatusQuery, Profile, HostStage,
  WeightChunk, Unload, Heartbeat, Shutdown (acknowledged with Capabilities, then the agent exits).
- pairing ROUTER on PORT + 2, domain "pair": its key pair derives from the pairing code, so only
  clients that know the code get through; a PairRequest makes the client's key trusted (persisted).
- stage data PULL on PORT + 1, domain "data", owned by the StageHost thread; it accepts only the
  previous hop's key, which the client names in HostStage.

One stage at a time, owned by the client that sent HostStage. Liveness: while it hosts a stage
the agent sends the owner a Heartbeat every HEARTBEAT_INTERVAL_S; when nothing has come from the
owner for CLIENT_TIMEOUT_S it unloads the stage (the client disappeared).

The main thread owns the control and pairing sockets; the StageHost thread its data sockets; the
KeyGate thread the ZAP socket. `stop()` may be called from a signal handler.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import queue
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import zmq

from agent.capabilities import capabilities, free_memory, stage_memory_bytes
from agent.identity import CODE_LENGTH, StateDir, format_code
from agent.stage_host import StageHost
from agent.weights import BundleError, BundleStore, Receiving
from engine import wire
from engine.agent_client import DATA_PORT_OFFSET, PAIR_PORT_OFFSET, endpoint
from engine.curve_auth import KeyGate, curve_server, fingerprint, pairing_keys

logger = logging.getLogger(__name__)

HEARTBEAT_INTERVAL_S = 0.5
CLIENT_TIMEOUT_S = 3.0
POLL_MS = 100
CLOSE_LINGER_MS = 500


@dataclass(frozen=True)
class AgentConfig:
    name: str
    port: int
    bind: str = "0.0.0.0"
    mdns: bool = True
    models_dir: Path | None = None
    state_dir: Path | None = None
    memory_limit: int = 0  # bytes stages may use; 0 = whatever is free
    cluster_secret: str | None = None


@dataclass
class _Owner:
    key: str  # z85 client key
    route: bytes  # ROUTER routing id of its connection
    last_seen: float


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.state = StateDir(config.state_dir, config.cluster_secret)
        self.identity = self.state.identity
        self.models_dir = Path(config.models_dir) if config.models_dir else self.state.path / "models"
        self.store = BundleStore(self.models_dir)
        self._stopping = threading.Event()
        self._data_keys: set[str] = set()
        self._data_lock = threading.Lock()
        self.context = zmq.Context()
        self.gate = KeyGate(self.context, {"control": self.state.is_trusted, "pair": lambda key: True,
                                           "data": self._data_allowed}, label=f"agent {config.name}")
        self.control = self.pairing = None
        self.advertiser = None
        self.stage: StageHost | None = None
        self.stage_text = ""
        self.owner: _Owner | None = None
        self.receiving: Receiving | None = None
        self.pending_host: wire.HostStage | None = None
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self._accel: tuple[str, str] | None = None

    # --- lifecycle

    def stop(self) -> None:
        self._stopping.set()

    def run(self) -> int:
        """Bind, advertise and serve until stop(); always unregisters and closes everything."""
        try:
            self._bind()
            self._announce()
            threading.Thread(target=self._warm_up, name="warm-up", daemon=True).start()
            if self.config.mdns:
                from agent.advertise import Advertiser

                self.advertiser = Advertiser(self.identity.agent_id, self.config.name, self.config.port,
                                             self.identity.fingerprint, self.config.bind)
                self.advertiser.start()
            self._serve()
            return 0
        finally:
            self._close()

    def _bind(self) -> None:
        self._check_data_port()
        self.gate.start()
        self.control = self._router(self.identity.secret_key, "control", self.config.port)
        self.pairing = self._router(pairing_keys(self.identity.pairing_code)[1], "pair",
                                    self.config.port + PAIR_PORT_OFFSET)

    def _check_data_port(self) -> None:
        """The data port is bound only while a stage is hosted; make sure now that it is free, so a
        clash shows at start rather than at the first load."""
        import socket as socketlib

        family = socketlib.AF_INET6 if ":" in self.config.bind else socketlib.AF_INET
        with socketlib.socket(family, socketlib.SOCK_STREAM) as probe:
            probe.setsockopt(socketlib.SOL_SOCKET, socketlib.SO_REUSEADDR, 1)
            try:
                probe.bind((self.config.bind.replace("*", "0.0.0.0"), self.config.port + DATA_PORT_OFFSET))
            except OSError as exc:
                raise zmq.ZMQError(exc.errno or zmq.EADDRINUSE, f"data port {self.config.port + DATA_PORT_OFFSET}: "
                                   f"{exc.strerror}") from exc

    def _router(self, secret: str, domain: str, port: int) -> zmq.Socket:
        socket = self.context.socket(zmq.ROUTER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        curve_server(socket, secret, domain)
        try:
            socket.bind(endpoint(self.config.bind, port))
        except zmq.ZMQError:
            socket.close(linger=0)  # else context.term() would wait for it forever
            raise
        return socket

    def _announce(self) -> None:
        code = self.identity.pairing_code
        shown = format_code(code) if len(code) == CODE_LENGTH else "(the cluster secret)"
        print(f"flowspec-agent {self.config.name} ({self.identity.agent_id}) listening on "
              f"{self.config.bind}:{self.config.port}\n  key fingerprint {self.identity.fingerprint}\n"
              f"  pairing code {shown}  (on the desktop: flowspec pair HOST:{self.config.port} {shown})",
              flush=True)

    def _close(self) -> None:
        self._unload("the agent is stopping")
        if self.advertiser is not None:
            self.advertiser.close()
        for socket in (self.control, self.pairing):
            if socket is not None:
                socket.close(linger=CLOSE_LINGER_MS)  # long enough to deliver the Shutdown acknowledgement
        self.gate.stop()
        self.context.term()

    # --- the loop

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self.control, zmq.POLLIN)
        poller.register(self.pairing, zmq.POLLIN)
        next_beat = time.monotonic()
        while not self._stopping.is_set():
            ready = dict(poller.poll(POLL_MS))
            if self.pairing in ready:
                self._on_pairing()
            if self.control in ready:
                for _ in range(64):  # drain, but let heartbeats through under a flood
                    if not self.control.poll(0):
                        break
                    self._on_control()
            self._forward_events()
            now = time.monotonic()
            if self.owner is not None and now >= next_beat:
                self._send(self.owner.route, wire.Heartbeat())
                next_beat = now + HEARTBEAT_INTERVAL_S
            if self.owner is not None and now - self.owner.last_seen > CLIENT_TIMEOUT_S:
                self._unload(f"no word from the client for {CLIENT_TIMEOUT_S:.0f} s")

    def _on_pairing(self) -> None:
        frames = self.pairing.recv_multipart(copy=False)
        if len(frames) < 2:
            return
        key = frames[1].get("User-Id")
        try:
            msg, _ = wire.decode(frames[1:])
        except wire.WireError as exc:
            logger.warning("pairing: dropped a malformed message from %s: %s", frames[1].get("Peer-Address"), exc)
            return
        if not isinstance(msg, wire.PairRequest):
            logger.warning("pairing: ignored a %s", type(msg).__name__)
            return
        self.state.trust(key, msg.client_name)
        logger.info("paired with client %r (key %s) from %s", msg.client_name, fingerprint(key),
                    frames[1].get("Peer-Address"))
        reply = wire.PairAccepted(self.identity.agent_id, self.config.name, self.identity.public_key)
        try:
            self.pairing.send_multipart([frames[0].bytes, *wire.encode(reply)])
        except zmq.ZMQError as exc:
            logger.warning("pairing: the client left before the reply: %s", exc)

    def _on_control(self) -> None:
        """Boundary: a command that fails is logged and answered with CommandFailed, so one bad
        command never stops the agent; malformed frames are logged and dropped."""
        frames = self.control.recv_multipart(copy=False)
        if len(frames) < 2:
            return
        route, key = frames[0].bytes, frames[1].get("User-Id")
        try:
            msg, _ = wire.decode(frames[1:])
        except wire.WireError as exc:
            logger.warning("control: dropped a malformed message from %s: %s", frames[1].get("Peer-Address"), exc)
            return
        if self.owner is not None and key == self.owner.key and (route == self.owner.route or isinstance(msg, wire.Heartbeat)):
            self.owner.last_seen = time.monotonic()  # the owner's connection (a heartbeat after a reconnect too)
            self.owner.route = route
        try:
            reply = self._dispatch(msg, route, key)
        except Exception as exc:  # noqa: BLE001 - see docstring
            logger.exception("control: %s failed", type(msg).__name__)
            reply = wire.CommandFailed(f"{type(msg).__name__} failed on the agent: {type(exc).__name__}: {exc}"[:4000])
        if reply is not None:
            self._send(route, reply)

    def _dispatch(self, msg: wire.Message, route: bytes, key: str) -> wire.Message | None:
        if isinstance(msg, (wire.Hello, wire.StatusQuery)):
            return self._capabilities()
        if isinstance(msg, wire.Heartbeat):
            return None
        if isinstance(msg, wire.HostStage):
            return self._host(msg, route, key)
        if isinstance(msg, wire.WeightChunk):
            return self._chunk(msg, key)
        if isinstance(msg, wire.Unload):
            if self.owner is None or self.owner.key == key:
                self._unload("the client asked")
            return self._capabilities()
        if isinstance(msg, wire.Shutdown):
            logger.info("shutting down at a client's request")
            self.stop()
            return self._capabilities()  # the acknowledgement; the agent exits after sending it
        if isinstance(msg, wire.Profile):
            from agent.profile import profile

            if self.stage is not None:  # profiling would steal the stage's compute and stall heartbeats
                return wire.CommandFailed(f"busy: hosting {self.stage_text}; profile before loading a stage")

            return profile(msg, self.state.path)
        return wire.CommandFailed(f"{type(msg).__name__} is not a command for the agent's control socket")

    # --- stages

    def _host(self, msg: wire.HostStage, route: bytes, key: str) -> wire.Message | None:
        if self.owner is not None and self.owner.key != key:
            return wire.CommandFailed(f"busy: this agent hosts {self.stage_text} for another client; "
                                      "unload it there or use another device")
        self._unload("a new stage replaces it")
        need, free = stage_memory_bytes(msg), free_memory(self.config.memory_limit)
        if need > free:
            return wire.StageFailed(msg.stage_index, (
                f"not enough memory on {self.config.name}: layers {msg.start}-{msg.end - 1} in {msg.dtype} need "
                f"{need / 2**20:.0f} MiB, {free / 2**20:.0f} MiB are free{' (--max-memory)' if self.config.memory_limit else ''}; "
                "give this device fewer layers or free memory"))
        self.owner = _Owner(key, route, time.monotonic())
        self.stage_text = f"layers {msg.start}-{msg.end - 1} of {msg.model}"
        with self._data_lock:
            self._data_keys = {msg.prev_key}
        installed = self.store.installed(msg.bundle) or self._local_model(msg)
        if installed is None:
            self.receiving = self.store.receive(msg)
            missing = self.receiving.total - self.receiving.done
            disk_free = shutil.disk_usage(self.store.root).free
            if 2 * missing + self.receiving.total > disk_free:  # the parts, then the assembled file
                self._unload("not enough disk")
                return wire.StageFailed(msg.stage_index, (
                    f"not enough disk on {self.config.name} for the stage's weights: {missing / 2**20:.0f} MiB "
                    f"to receive and {self.receiving.total / 2**20:.0f} MiB to assemble, {disk_free / 2**20:.0f} MiB "
                    f"free in {self.models_dir}; free space or start the agent with another --models-dir"))
            if not self.receiving.complete:
                self.pending_host = msg
                return wire.WeightsNeeded(msg.bundle, tuple(self.receiving.have))
            installed, self.receiving = self.receiving, None
        self._start_stage(msg, installed)
        return None

    def _local_model(self, msg: wire.HostStage) -> Path | None:
        """A model this agent has itself (a built-in, or a directory in --models-dir named like the
        reference) whose stage tensors are exactly the bundle's; None otherwise."""
        from engine.agent_client import stage_bundle
        from engine.models import BUILTIN_MODELS, resolve_model

        if msg.model in BUILTIN_MODELS:
            path = Path(resolve_model(msg.model, progress=False).path)
        elif msg.model and "/" not in msg.model and msg.model not in (".", "..") and \
                (self.models_dir / msg.model / "config.json").is_file():
            path = self.models_dir / msg.model
        else:
            return None
        local = stage_bundle(path, msg.start, msg.end, cache_dir=self.state.path)
        if local.bundle_id != msg.bundle:
            logger.info("local copy of %s differs from the client's; receiving the client's stage weights", msg.model)
            return None
        return path

    def _chunk(self, chunk: wire.WeightChunk, key: str) -> wire.Message | None:
        if self.receiving is None or self.owner is None or self.owner.key != key:
            return wire.CommandFailed("no weights are expected now: send HostStage first")
        receiving, msg = self.receiving, self.pending_host
        try:
            receiving.write(chunk)
        except BundleError as exc:
            logger.warning("weights: %s", exc)
            return wire.WeightsNeeded(receiving.bundle, tuple(receiving.have))
        self._send(self.owner.route, wire.LoadProgress(msg.stage_index, "weights", receiving.done, receiving.total))
        if not receiving.complete:
            return None
        self.receiving = self.pending_host = None
        self._start_stage(msg, receiving)  # checked and installed on the stage's thread
        return None

    def _start_stage(self, msg: wire.HostStage, model_dir: Path | Receiving) -> None:
        data = endpoint(self.config.bind, self.config.port + DATA_PORT_OFFSET)
        self.stage = StageHost(self.context, (self.identity.public_key, self.identity.secret_key), msg,
                               model_dir, data, self.events)
        self.stage.start()

    def _unload(self, why: str) -> None:
        if self.stage is None and self.owner is None:
            return
        logger.info("unloading %s: %s", self.stage_text or "the stage", why)
        if self.stage is not None:
            self.stage.stop()
            self.stage = None
        self.owner = None
        self.receiving = self.pending_host = None
        self.stage_text = ""
        with self._data_lock:
            self._data_keys = set()
        while True:  # events of the old stage are stale now
            try:
                self.events.get_nowait()
            except queue.Empty:
                break
        gc.collect()
        _trim_heap()

    def _forward_events(self) -> None:
        while True:
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            if self.owner is not None:
                self._send(self.owner.route, event)

    # --- helpers

    def _data_allowed(self, key: str) -> bool:
        with self._data_lock:
            return key in self._data_keys

    def _warm_up(self) -> None:
        """Import torch and the stage code in the background, so that the agent answers at once and
        the first HostStage loads sooner; then probe the accelerator (which needs torch)."""
        import engine.stage  # noqa: F401
        import engine.stage_worker  # noqa: F401
        import engine.tensor_codec  # noqa: F401
        from agent.capabilities import accelerator

        self._accel = accelerator()

    def _capabilities(self) -> wire.Capabilities:
        return capabilities(self.identity.agent_id, self.config.name, self.identity.public_key,
                            self.config.port + DATA_PORT_OFFSET, self.models_dir, self.config.memory_limit,
                            self.stage_text, self._accel or ("(still probing)", ""))

    def _send(self, route: bytes, msg: wire.Message) -> None:
        try:
            self.control.send_multipart([route, *wire.encode(msg)])
        except zmq.ZMQError as exc:  # the client is gone (ROUTER_MANDATORY); liveness handles it
            logger.debug("control: could not send %s: %s", type(msg).__name__, exc)


def _trim_heap() -> None:
    """Give freed stage memory back to the OS (glibc keeps it otherwise)."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            logger.debug("malloc_trim is not available")
