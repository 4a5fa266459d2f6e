"""The wire format: every message between the coordinator, stages and agents, and its byte layout.

This is the only module that knows how a message looks on a socket (STYLE S3, S4). It imports
only the standard library and msgspec, never torch or numpy, so the app, the agent and tools can
use it cheaply; `engine/tensor_codec.py` turns torch tensors into the payloads it carries.

Terms:
- frame: one part of a ZeroMQ multipart message. A message is `[PROTOCOL, header, *payloads]`.
- header: msgpack of `{"msg": {"kind": <class name>, ...}, "tensors": [{"dtype", "shape"}, ...]}`.
- payload: the raw little-endian bytes of one C-contiguous tensor, `product(shape) * itemsize` long.

`decode` is fed untrusted bytes: for any bad input it raises `WireError` (a `ValueError`), never
anything else. ROUTER/DEALER routing-id frames are stripped by the transport before `decode`.
Receivers also set `zmq.MAXMSGSIZE = MAX_FRAME_BYTES`, so libzmq drops larger frames before
buffering them. Adding a message: write its class below and add it to the `Message` union.
No pickle, ever.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from typing import Annotated, Any, get_args

import msgspec

logger = logging.getLogger(__name__)

PROTOCOL = b"FLOWSPEC1"  # frame 0; bump on any breaking change to a message or the layout

# --- Discovery (mDNS): identity and version only, each key=value at most 255 bytes (S14)
SERVICE_TYPE = "_flowspec._tcp.local."
TXT_ID = "id"
TXT_NAME = "name"
TXT_PROTO = "proto"
TXT_CTL_PORT = "ctl_port"
TXT_FINGERPRINT = "fp"

# --- Limits on what decode accepts (and encode produces)
MAX_TENSORS = 16
MAX_FRAME_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024
MAX_NDIM = 8

DTYPE_ITEMSIZE: dict[str, int] = {  # the allowlist: dtype name -> bytes per element
    "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "bool": 1,
}

_PREVIEW_BYTES = 24
_VERSION_RE = re.compile(rb"FLOWSPEC(\d+)")
_OUR_VERSION = int(PROTOCOL.removeprefix(b"FLOWSPEC"))

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveInt = Annotated[int, msgspec.Meta(ge=1)]


class WireError(ValueError):
    """A message that cannot be encoded or decoded; the text is one sentence saying why."""


class TensorSpec(msgspec.Struct, frozen=True):
    """What a payload frame holds: a dtype name from the allowlist and a shape."""

    dtype: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        # Runs on construction and on decode (where msgspec wraps the error in a ValidationError).
        if self.dtype not in DTYPE_ITEMSIZE:
            raise WireError(
                f"tensor dtype {self.dtype!r} is not in the allowlist {sorted(DTYPE_ITEMSIZE)}"
            )
        if not isinstance(self.shape, tuple) or len(self.shape) > MAX_NDIM:
            raise WireError(f"tensor shape {self.shape!r} is not a tuple of <= {MAX_NDIM} dims")
        if any(type(dim) is not int or dim < 0 for dim in self.shape):
            raise WireError(f"tensor shape {self.shape!r} must hold non-negative ints only")
        # Zero-length dims count as 1 so that (0, 10**30) cannot smuggle in an absurd stride.
        if math.prod(max(dim, 1) for dim in self.shape) * self.itemsize > MAX_FRAME_BYTES:
            raise WireError(
                f"tensor shape {self.shape} of {self.dtype} is absurd: "
                f"it exceeds the {MAX_FRAME_BYTES}-byte frame limit"
            )

    @property
    def itemsize(self) -> int:
        return DTYPE_ITEMSIZE[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


class _MessageBase(msgspec.Struct, frozen=True, tag=True, tag_field="kind"):
    """Base of every message; the `kind` tag on the wire is the class name."""

    def tensor_count(self) -> int:
        """How many tensor payloads travel with this message."""
        return 0


# --- Data plane


class Segment(_MessageBase, frozen=True):
    """A segment of the token tree travelling D0 -> V1 -> ... -> VN -> D0.

    Tensors, in order (n = nodes in this segment):
      x          # [n] int64 token ids into V1, or [n, hidden] hidden states after it
      positions  # [n] int64 absolute positions
      mask       # [n, start + n] bool tree-mask rows over the draft nodes; only when `masked`
    `start` is the index of the segment's first node in the current epoch; every prune starts a
    new epoch; `busy_s` gains one entry (seconds of compute) per stage passed.
    """

    request_id: NonNegativeInt
    seg_id: NonNegativeInt
    epoch: NonNegativeInt
    prefix_len: NonNegativeInt
    start: NonNegativeInt
    masked: bool
    busy_s: tuple[float, ...] = ()

    def tensor_count(self) -> int:
        return 3 if self.masked else 2


class Prune(_MessageBase, frozen=True):
    """Commit `n_accepted` tokens to the prefix and keep only tree nodes `keep`; starts `epoch`."""

    request_id: NonNegativeInt
    epoch: NonNegativeInt
    prefix_len: NonNegativeInt
    n_accepted: NonNegativeInt
    keep: tuple[NonNegativeInt, ...]


class Reset(_MessageBase, frozen=True):
    """Forget the request's KV cache and tree; with `threads`, compute this request's forwards with
    that many torch threads (0 keeps the stage's count)."""

    request_id: NonNegativeInt
    threads: NonNegativeInt = 0


# --- Control plane


class LoadStage(_MessageBase, frozen=True):
    """Load layers [start, end) of `model` as stage `stage_index` of `n_stages`."""

    model: str
    start: NonNegativeInt
    end: NonNegativeInt
    dtype: str
    stage_index: NonNegativeInt
    n_stages: PositiveInt

    def __post_init__(self) -> None:
        if not self.start < self.end:
            raise WireError(f"LoadStage layer range [{self.start}, {self.end}) is empty")
        if not 0 <= self.stage_index < self.n_stages:
            raise WireError(
                f"LoadStage stage_index {self.stage_index} is outside 0..{self.n_stages - 1}"
            )


class StageReady(_MessageBase, frozen=True):
    """A stage finished loading layers [start, end)."""

    stage_index: NonNegativeInt
    start: NonNegativeInt
    end: NonNegativeInt
    n_params: NonNegativeInt
    load_s: float


class StageFailed(_MessageBase, frozen=True):
    """A stage could not load or run; `reason` is shown to the user."""

    stage_index: NonNegativeInt
    reason: str


class Shutdown(_MessageBase, frozen=True):
    """Stop serving and exit cleanly."""


# --- Agents: control messages between a client (app or CLI) and `flowspec-agent`, over CurveZMQ.
# Pairing socket: PairRequest -> PairAccepted. Control socket: Hello/StatusQuery -> Capabilities;
# Profile -> ProfileResult; HostStage -> LoadProgress* [WeightsNeeded, WeightChunk*] StageReady |
# StageFailed; Unload -> Capabilities; Heartbeat both ways; Shutdown -> Capabilities (then the agent
# exits); CommandFailed for refusals.

MAX_CHUNK_BYTES = 512 * 1024  # weight bytes per WeightChunk; the header carries them (MAX_HEADER_BYTES)
Sha256Hex = Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]
ShortText = Annotated[str, msgspec.Meta(max_length=256)]


class PairRequest(_MessageBase, frozen=True):
    """Client -> agent on the pairing socket, whose CURVE key derives from the pairing code, so only
    a client that knows the code gets this far. The client's key (from the handshake) becomes trusted."""

    client_name: ShortText


class PairAccepted(_MessageBase, frozen=True):
    """Agent -> client: who the agent is; `public_key` (z85) is what the client pins from now on."""

    agent_id: ShortText
    name: ShortText
    public_key: ShortText


class Hello(_MessageBase, frozen=True):
    """Client -> agent, first on a control connection; the reply is Capabilities."""

    client_name: ShortText = ""


class StatusQuery(_MessageBase, frozen=True):
    """Client -> agent: the agent's state now; the reply is Capabilities."""


class Capabilities(_MessageBase, frozen=True):
    """What an agent is and has. Sizes in bytes; `memory_limit` 0 means "free memory is the limit"."""

    agent_id: ShortText
    name: ShortText
    version: ShortText
    public_key: ShortText
    data_port: NonNegativeInt
    memory_total: NonNegativeInt
    memory_free: NonNegativeInt
    memory_limit: NonNegativeInt
    cpu: ShortText
    cpu_count: NonNegativeInt
    accelerator: ShortText
    torch_device: ShortText
    disk_free: NonNegativeInt
    models: tuple[ShortText, ...] = ()
    stage: str = ""  # what it hosts now, for people ("" when idle)
    busy: bool = False


class Profile(_MessageBase, frozen=True):
    """Client -> agent: time one decoder layer of the model described by `config_json` (random
    weights, `dtype`) at each token count; the reply is ProfileResult (cached by the agent)."""

    config_json: str
    dtype: str
    token_counts: tuple[PositiveInt, ...]


class ProfileResult(_MessageBase, frozen=True):
    token_counts: tuple[PositiveInt, ...]
    ms_per_layer: tuple[float, ...]
    cached: bool


class TensorEntry(msgspec.Struct, frozen=True):
    """One tensor of a stage bundle, as stored in its safetensors file (dtype "F32", "BF16", ...)."""

    name: str
    dtype: str
    shape: tuple[NonNegativeInt, ...]
    nbytes: NonNegativeInt
    sha256: Sha256Hex


class HostStage(_MessageBase, frozen=True):
    """Client -> agent: host layers [start, end) of `model` as stage `stage_index` of `n_stages`.

    `bundle` names exactly these tensors (`tensors`, with `config_json`); an agent without them
    answers WeightsNeeded. The stage's data socket accepts only `prev_key`; its output goes to
    `next_endpoint`, whose CURVE server key is `next_key` (keys in z85).
    """

    model: str
    bundle: Sha256Hex
    start: NonNegativeInt
    end: NonNegativeInt
    dtype: str
    stage_index: NonNegativeInt
    n_stages: PositiveInt
    next_endpoint: ShortText
    next_key: ShortText
    prev_key: ShortText
    config_json: str
    tensors: tuple[TensorEntry, ...]

    def __post_init__(self) -> None:
        if not self.start < self.end:
            raise WireError(f"HostStage layer range [{self.start}, {self.end}) is empty")
        if not 0 <= self.stage_index < self.n_stages:
            raise WireError(f"HostStage stage_index {self.stage_index} is outside 0..{self.n_stages - 1}")


class LoadProgress(_MessageBase, frozen=True):
    """Agent -> client while preparing a stage: `done` of `total` units (bytes for "weights")."""

    stage_index: NonNegativeInt
    phase: ShortText  # "weights" | "loading"
    done: NonNegativeInt
    total: NonNegativeInt


class WeightsNeeded(_MessageBase, frozen=True):
    """Agent -> client: send the bundle's tensors; `have[i]` bytes of tensor i are already held."""

    bundle: Sha256Hex
    have: tuple[NonNegativeInt, ...]


class WeightChunk(_MessageBase, frozen=True):
    """Client -> agent: bytes [offset, offset + len(data)) of tensor `tensor` of `bundle`."""

    bundle: Sha256Hex
    tensor: NonNegativeInt
    offset: NonNegativeInt
    data: Annotated[bytes, msgspec.Meta(max_length=MAX_CHUNK_BYTES)]
    sha256: Sha256Hex


class Unload(_MessageBase, frozen=True):
    """Client -> agent: stop the stage and free its memory; the reply is Capabilities."""


class Heartbeat(_MessageBase, frozen=True):
    """Either way on a control connection, every HEARTBEAT_INTERVAL_S while a stage is hosted."""


class CommandFailed(_MessageBase, frozen=True):
    """Agent -> client: a command was refused; `reason` says why and what to do."""

    reason: str


Message = (Segment | Prune | Reset | LoadStage | StageReady | StageFailed | Shutdown
           | PairRequest | PairAccepted | Hello | StatusQuery | Capabilities | Profile | ProfileResult
           | HostStage | LoadProgress | WeightsNeeded | WeightChunk | Unload | Heartbeat | CommandFailed)
MESSAGE_TYPES: tuple[type[_MessageBase], ...] = get_args(Message)
_MESSAGE_BY_KIND: dict[str, type[_MessageBase]] = {cls.__name__: cls for cls in MESSAGE_TYPES}
_DECODER_BY_KIND = {kind: msgspec.msgpack.Decoder(cls) for kind, cls in _MESSAGE_BY_KIND.items()}


class _Header(msgspec.Struct, frozen=True):
    msg: msgspec.Raw  # decoded in a second step, so an unknown kind gets its own error
    tensors: tuple[TensorSpec, ...] = ()


class _KindOnly(msgspec.Struct, frozen=True):
    kind: str


_HEADER_DECODER = msgspec.msgpack.Decoder(_Header)
_KIND_DECODER = msgspec.msgpack.Decoder(_KindOnly)
_ENCODER = msgspec.msgpack.Encoder()

Payload = bytes | bytearray | memoryview


def encode(
    msg: Message, payloads: Sequence[tuple[TensorSpec, Payload]] = ()
) -> list[bytes | memoryview]:
    """Frames `[PROTOCOL, header, *payloads]` for `msg`; payloads are passed through, not copied.

    Raises WireError if the result would not decode (bad field values, wrong tensor count,
    payload sizes that do not match their specs, a header over MAX_HEADER_BYTES).
    """
    if not isinstance(msg, MESSAGE_TYPES):
        raise TypeError(f"encode takes a wire message, not {type(msg).__name__}")
    views = [_byte_view(payload) for _, payload in payloads]
    specs = tuple(spec for spec, _ in payloads)
    try:
        header = _ENCODER.encode(_Header(msg=msgspec.Raw(_ENCODER.encode(msg)), tensors=specs))
    except (OverflowError, TypeError) as exc:
        raise WireError(f"Cannot encode {type(msg).__name__}: {exc}.") from exc
    frames: list[bytes | memoryview] = [PROTOCOL, header, *views]
    decode(frames)  # a message this side would refuse is a bug here, not at the peer
    return frames


def decode(frames: Sequence[Any]) -> tuple[Message, list[tuple[TensorSpec, memoryview]]]:
    """Parse and validate `[PROTOCOL, header, *payloads]` into a message and its payload views.

    Frames may be bytes, bytearray, memoryview or zmq.Frame (anything with `.buffer`). The
    returned memoryviews share memory with the frames. Raises WireError for any bad input.
    """
    views = [_byte_view(getattr(frame, "buffer", frame)) for frame in frames]
    if not views:
        raise WireError("Message has no frames; expected the protocol frame and a header.")
    _check_protocol(views[0])
    if len(views) < 2:
        raise WireError("Message has only the protocol frame; the header frame is missing.")
    if len(views) > 2 + MAX_TENSORS:
        raise WireError(
            f"Message has {len(views)} frames; at most {2 + MAX_TENSORS} "
            f"(protocol, header and {MAX_TENSORS} tensors) are allowed."
        )
    for index, view in enumerate(views):
        if view.nbytes > MAX_FRAME_BYTES:
            raise WireError(
                f"Frame {index} is {view.nbytes} bytes, over the {MAX_FRAME_BYTES}-byte limit."
            )
    msg, specs = _parse_header(views[1])
    payloads = views[2:]
    if len(specs) != len(payloads):
        raise WireError(
            f"Header lists {len(specs)} tensors but {len(payloads)} payload frames came."
        )
    if len(specs) != msg.tensor_count():
        raise WireError(
            f"{type(msg).__name__} carries {len(specs)} tensors but needs {msg.tensor_count()}."
        )
    for index, (spec, payload) in enumerate(zip(specs, payloads)):
        check_payload(spec, payload, index=index)
    return msg, list(zip(specs, payloads))


def check_payload(spec: TensorSpec, payload: memoryview, *, index: int = 0) -> None:
    """Raise WireError unless `payload` is a valid body for `spec` (size; bool bytes are 0 or 1)."""
    if payload.nbytes != spec.nbytes:
        raise WireError(
            f"Tensor {index} payload is {payload.nbytes} bytes but {spec.dtype}{list(spec.shape)} "
            f"needs {spec.nbytes}."
        )
    if spec.dtype == "bool" and payload.tobytes().translate(None, b"\x00\x01"):
        raise WireError(f"Tensor {index} is bool but its payload holds bytes other than 0 and 1.")


def _byte_view(buffer: Any) -> memoryview:
    view = memoryview(buffer)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _preview(view: memoryview) -> bytes:
    return view[:_PREVIEW_BYTES].tobytes()


def _check_protocol(view: memoryview) -> None:
    if view == PROTOCOL:
        return
    theirs = _VERSION_RE.fullmatch(_preview(view)) if view.nbytes <= _PREVIEW_BYTES else None
    if theirs is None:
        raise WireError(
            f"Frame 0 is {_preview(view)!r}, not a FlowSpec protocol frame "
            f"(expected {PROTOCOL!r}); something other than FlowSpec Studio sent this message."
        )
    older = "the peer" if int(theirs.group(1)) < _OUR_VERSION else "this side"
    raise WireError(
        f"Peer speaks protocol {theirs.group(0).decode()} but this side speaks "
        f"{PROTOCOL.decode()}; update {older} so both run the same FlowSpec Studio version."
    )


def _parse_header(view: memoryview) -> tuple[Message, tuple[TensorSpec, ...]]:
    if view.nbytes > MAX_HEADER_BYTES:
        raise WireError(
            f"Header is {view.nbytes} bytes, over the {MAX_HEADER_BYTES}-byte limit."
        )
    try:
        header = _HEADER_DECODER.decode(view)
        kind = _KIND_DECODER.decode(header.msg).kind
        decoder = _DECODER_BY_KIND.get(kind)
        if decoder is None:
            raise WireError(
                f"Unknown message kind {kind[:64]!r}; this side knows "
                f"{', '.join(_MESSAGE_BY_KIND)} (the peer may run a newer version)."
            )
        msg = decoder.decode(header.msg)
    except msgspec.ValidationError as exc:  # a subclass of DecodeError, so it goes first
        raise WireError(f"Header does not match the message schema: {exc}.") from exc
    except msgspec.DecodeError as exc:
        raise WireError(f"Header is not valid msgpack: {exc}.") from exc
    except UnicodeDecodeError as exc:  # a ValueError that msgspec lets through as it is
        raise WireError(f"Header holds a string that is not valid UTF-8: {exc}.") from exc
    except RecursionError as exc:
        raise WireError("Header is nested too deeply to be a FlowSpec message.") from exc
    if len(header.tensors) > MAX_TENSORS:
        raise WireError(
            f"Header lists {len(header.tensors)} tensors; at most {MAX_TENSORS} are allowed."
        )
    return msg, header.tensors
