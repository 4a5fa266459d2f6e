"""The client side of `flowspec-agent`: this client's keys, pairing, control requests, stage bundles.

Terms:
- *client keys*: this client's CURVE key pair and the agents it has paired with, kept in
  `platformdirs.user_state_dir("flowspec-studio")/agents` (or `$FLOWSPEC_CLIENT_DIR`); the secret
  key file has mode 0600.
- *pairing*: a one-time exchange on the agent's pairing socket (control port + 2), whose CURVE key
  derives from the pairing code. The agent then trusts this client's key and tells its own
  (pinned from now on), so later connections need no code.
- *stage bundle*: exactly the tensors of one stage (its layers, plus the embedding on the first
  and the final norm on the last) and the model's config.json, named by the sha256 of its
  manifest. An agent without a bundle receives it from the client in chunks (see `send_weights`).

Ports of an agent started with `--port P`: control P, stage data P + 1, pairing P + 2.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket as socketlib
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import zmq

from engine import wire
from engine.curve_auth import curve_client, new_key_pair, pairing_keys, read_key_pair, write_private

logger = logging.getLogger(__name__)

DATA_PORT_OFFSET = 1
PAIR_PORT_OFFSET = 2
REQUEST_TIMEOUT_S = 5.0
PAIR_TIMEOUT_S = 4.0
WEIGHT_WINDOW = 8  # chunks in flight before waiting for the agent's progress report
READ_BLOCK = 8 * 1024 * 1024


class AgentError(RuntimeError):
    """An agent could not be reached, refused a command or failed; the text says what to do."""


def default_client_dir() -> Path:
    env = os.environ.get("FLOWSPEC_CLIENT_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_state_dir("flowspec-studio")) / "agents"


def split_address(address: str) -> tuple[str, int]:
    """"host:port" -> (host, port); ValueError with the expected form otherwise."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{address!r} is not host:port (for example 192.168.1.20:5555)")
    return host.strip("[]"), int(port)


def endpoint(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


@dataclass(frozen=True)
class PairedAgent:
    agent_id: str
    name: str
    public_key: str  # z85, pinned at pairing
    address: str  # host:port of its control socket, as last seen


class ClientKeys:
    """This client's key pair and paired agents (see the module docstring). Not thread-safe."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = Path(path) if path is not None else default_client_dir()
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        keys = read_key_pair(self.path, "client")
        self.public_key, self.secret_key = keys if keys is not None else new_key_pair(self.path, "client")
        self.name = socketlib.gethostname()

    def agents(self) -> list[PairedAgent]:
        try:
            data = json.loads((self.path / "paired_agents.json").read_text(encoding="utf-8"))
            return [PairedAgent(**entry) for entry in data.get("agents", [])]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError) as error:
            raise AgentError(f"{self.path / 'paired_agents.json'} is damaged ({error}): delete it and pair again") from error

    def find(self, device: str) -> PairedAgent | None:
        """The paired agent named by `device`: its agent id, or the host:port it was last seen at."""
        matches = [a for a in self.agents() if device in (a.agent_id, a.address)]
        by_id = [a for a in matches if a.agent_id == device]
        return (by_id or matches or [None])[0]

    def remember(self, agent: PairedAgent) -> None:
        """Add or update an agent (matched by id; an older entry at the same address is dropped)."""
        agents = [a for a in self.agents() if a.agent_id != agent.agent_id and a.address != agent.address]
        text = json.dumps({"agents": [asdict(a) for a in [*agents, agent]]}, indent=1) + "\n"
        write_private(self.path / "paired_agents.json", text)


class Connection:
    """A CURVE DEALER to one agent's control (or pairing) socket, for request/reply on one thread."""

    def __init__(self, context: zmq.Context, keys: ClientKeys, address: str, server_key: str, port_offset: int = 0) -> None:
        host, port = split_address(address)
        self.address = address
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.MAXMSGSIZE, wire.MAX_FRAME_BYTES)
        curve_client(self.socket, keys.public_key, keys.secret_key, server_key)
        self.socket.connect(endpoint(host, port + port_offset))

    def send(self, msg: wire.Message) -> None:
        self.socket.send_multipart(wire.encode(msg))

    def recv(self, timeout_s: float) -> wire.Message | None:
        """The next message, or None after `timeout_s`; malformed messages are logged and skipped."""
        deadline = time.monotonic() + timeout_s
        while True:
            left_ms = max(0, int((deadline - time.monotonic()) * 1000))
            if not self.socket.poll(left_ms):
                return None
            try:
                return wire.decode(self.socket.recv_multipart(copy=False))[0]
            except wire.WireError as error:
                logger.error("agent %s sent a malformed message: %s", self.address, error)

    def request(self, msg: wire.Message, reply: type, timeout_s: float = REQUEST_TIMEOUT_S):
        """Send `msg` and wait for a message of type `reply` (Heartbeats and progress are skipped)."""
        self.send(msg)
        deadline = time.monotonic() + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            answer = self.recv(left)
            if isinstance(answer, reply):
                return answer
            if isinstance(answer, wire.CommandFailed):
                raise AgentError(f"agent at {self.address} refused {type(msg).__name__}: {answer.reason}")
        raise AgentError(
            f"no answer from the agent at {self.address} within {timeout_s:.0f} s: check that flowspec-agent runs "
            "there and that this client is paired with it (an agent ignores clients it has not paired with; "
            "`flowspec pair HOST:PORT CODE`)"
        )

    def close(self) -> None:
        self.socket.close(linger=0)


def pair(address: str, code: str, keys: ClientKeys, timeout_s: float = PAIR_TIMEOUT_S) -> PairedAgent:
    """Pair with the agent at `address` (its control host:port) using its pairing code; remember it."""
    public, _ = pairing_keys(code)
    context = zmq.Context.instance()
    connection = Connection(context, keys, address, public, PAIR_PORT_OFFSET)
    try:
        connection.send(wire.PairRequest(client_name=keys.name[:200]))
        answer = connection.recv(timeout_s)
    finally:
        connection.close()
    if not isinstance(answer, wire.PairAccepted):
        raise AgentError(
            f"pairing with {address} failed: no answer within {timeout_s:.0f} s. Check the code (the agent prints "
            f"it at start) and that flowspec-agent runs there with its pairing port {split_address(address)[1] + PAIR_PORT_OFFSET} reachable"
        )
    agent = PairedAgent(answer.agent_id, answer.name, answer.public_key, address)
    keys.remember(agent)
    logger.info("paired with agent %s (%s) at %s", agent.name, agent.agent_id, address)
    return agent


def hello(address: str, keys: ClientKeys, server_key: str, timeout_s: float = REQUEST_TIMEOUT_S) -> wire.Capabilities:
    """One Hello -> Capabilities exchange with a paired agent."""
    connection = Connection(zmq.Context.instance(), keys, address, server_key)
    try:
        return connection.request(wire.Hello(client_name=keys.name[:200]), wire.Capabilities, timeout_s)
    finally:
        connection.close()


# --- stage bundles


@dataclass(frozen=True)
class StageBundle:
    """The manifest of one stage's tensors in a model directory (see the module docstring)."""

    model_dir: Path
    config_json: str
    tensors: tuple[wire.TensorEntry, ...]
    locations: tuple[tuple[Path, int], ...]  # per tensor: (file, byte offset of its data)

    @property
    def bundle_id(self) -> str:
        return bundle_id(self.config_json, self.tensors)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


def bundle_id(config_json: str, tensors: tuple[wire.TensorEntry, ...]) -> str:
    listing = [config_json, [[t.name, t.dtype, list(t.shape), t.nbytes, t.sha256] for t in tensors]]
    return hashlib.sha256(json.dumps(listing, separators=(",", ":")).encode("utf-8")).hexdigest()


def stage_tensor_names(keys: list[str], config: dict, start: int, end: int) -> list[str]:
    """The checkpoint keys a stage needs: its layers, the embedding if first, the final norm if last."""
    from engine.model_adapters import get_adapter

    adapter = get_adapter(config.get("model_type"))
    n_layers = int(config["num_hidden_layers"])
    prefixes = tuple(adapter.layer_key.format(i=i) for i in range(start, end))
    names = [k for k in keys if k.startswith(prefixes)]
    if start == 0:
        names.append(adapter.embed_key)
    if end == n_layers:
        names.append(adapter.norm_key)
    return names


def read_safetensors_header(file: Path) -> tuple[dict, int]:
    """(header dict, byte offset where the data starts) of a safetensors file."""
    with open(file, "rb") as handle:
        (size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def stage_bundle(model_dir: Path, start: int, end: int, cache_dir: Path | None = None) -> StageBundle:
    """The bundle of layers [start, end) of the model in `model_dir`, hashing each tensor's bytes.

    Hashes are cached in `cache_dir/manifests.json`, keyed by file, size and modification time.
    """
    model_dir = Path(model_dir)
    config_json = (model_dir / "config.json").read_text(encoding="utf-8")
    where: dict[str, tuple[Path, dict, int]] = {}
    for file in sorted(model_dir.glob("*.safetensors")):
        header, data_start = read_safetensors_header(file)
        for name, info in header.items():
            where[name] = (file, info, data_start)
    names = stage_tensor_names(list(where), json.loads(config_json), start, end)
    missing = [n for n in names if n not in where]
    if missing:
        raise AgentError(f"{model_dir} lacks tensors {missing[:3]}: re-save the model")
    cache = _HashCache(cache_dir)
    tensors, locations = [], []
    for name in names:
        file, info, data_start = where[name]
        first, last = info["data_offsets"]
        digest = cache.get(file, name) or cache.put(file, name, _hash_range(file, data_start + first, last - first))
        tensors.append(wire.TensorEntry(name, info["dtype"], tuple(info["shape"]), last - first, digest))
        locations.append((file, data_start + first))
    cache.save()
    return StageBundle(model_dir, config_json, tuple(tensors), tuple(locations))


def _hash_range(file: Path, offset: int, length: int) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        handle.seek(offset)
        while length > 0:
            block = handle.read(min(READ_BLOCK, length))
            if not block:
                raise AgentError(f"{file} is truncated: re-save or re-download the model")
            digest.update(block)
            length -= len(block)
    return digest.hexdigest()


class _HashCache:
    def __init__(self, cache_dir: Path | None) -> None:
        self.file = Path(cache_dir) / "manifests.json" if cache_dir is not None else None
        self.entries: dict[str, str] = {}
        self.dirty = False
        if self.file is not None and self.file.exists():
            try:
                self.entries = json.loads(self.file.read_text(encoding="utf-8"))
            except ValueError:
                logger.warning("ignoring the damaged hash cache %s", self.file)

    @staticmethod
    def _key(file: Path, name: str) -> str:
        stat = file.stat()
        return f"{file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{name}"

    def get(self, file: Path, name: str) -> str | None:
        return self.entries.get(self._key(file, name))

    def put(self, file: Path, name: str, digest: str) -> str:
        self.entries[self._key(file, name)] = digest
        self.dirty = True
        return digest

    def save(self) -> None:
        if self.file is not None and self.dirty:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            write_private(self.file, json.dumps(self.entries))


def weight_chunks(bundle: StageBundle, have: tuple[int, ...]) -> Iterator[wire.WeightChunk]:
    """The chunks an agent still needs, tensor by tensor, from the bytes it already `have`s."""
    if len(have) != len(bundle.tensors):
        raise AgentError(f"the agent asked for {len(have)} tensors but the bundle has {len(bundle.tensors)}")
    for index, (entry, (file, offset)) in enumerate(zip(bundle.tensors, bundle.locations)):
        done = min(have[index], entry.nbytes)
        with open(file, "rb") as handle:
            handle.seek(offset + done)
            while done < entry.nbytes:
                data = handle.read(min(wire.MAX_CHUNK_BYTES, entry.nbytes - done))
                if not data:
                    raise AgentError(f"{file} is truncated: re-save or re-download the model")
                yield wire.WeightChunk(bundle.bundle_id, index, done, data, hashlib.sha256(data).hexdigest())
                done += len(data)


def send_weights(connection: Connection, bundle: StageBundle, need: wire.WeightsNeeded,
                 on_progress: Callable[[int, int], None] | None = None,
                 timeout_s: float = 30.0) -> list[wire.Message]:
    """Stream the chunks `need` asks for, at most WEIGHT_WINDOW ahead of the agent's progress reports.

    Returns the messages read meanwhile that are neither weight progress nor heartbeats, for the
    caller to handle; it stops early after a StageFailed, CommandFailed or WeightsNeeded.
    """
    others: list[wire.Message] = []
    in_flight = 0
    for chunk in weight_chunks(bundle, need.have):
        while in_flight >= WEIGHT_WINDOW:
            answer = connection.recv(timeout_s)
            if answer is None:
                raise AgentError(f"the agent at {connection.address} stopped acknowledging weights for {timeout_s:.0f} s")
            if isinstance(answer, wire.LoadProgress) and answer.phase == "weights":
                in_flight -= 1
                if on_progress is not None:
                    on_progress(answer.done, answer.total)
            elif not isinstance(answer, wire.Heartbeat):
                others.append(answer)
                if isinstance(answer, (wire.StageFailed, wire.CommandFailed, wire.WeightsNeeded)):
                    return others
        connection.send(chunk)
        in_flight += 1
    return others
