"""engine.wire: every message round-trips, and every kind of bad input is a clear WireError."""

from __future__ import annotations

import struct
import subprocess
import sys

import msgspec
import pytest

from engine import wire
from engine.wire import (
    MAX_HEADER_BYTES,
    MAX_TENSORS,
    PROTOCOL,
    LoadStage,
    Prune,
    Reset,
    Segment,
    Shutdown,
    StageFailed,
    StageReady,
    TensorSpec,
    WireError,
    decode,
    encode,
)


def _int64(*values: int) -> tuple[TensorSpec, bytes]:
    return TensorSpec("int64", (1, len(values))), struct.pack(f"<{len(values)}q", *values)


def _positions(*values: int) -> tuple[TensorSpec, bytes]:
    return TensorSpec("int64", (len(values),)), struct.pack(f"<{len(values)}q", *values)


def _mask(rows: int, cols: int) -> tuple[TensorSpec, bytes]:
    data = bytes(int(col <= row) for row in range(rows) for col in range(cols))
    return TensorSpec("bool", (1, 1, rows, cols)), data


# One example per message kind, with the payloads it needs (test_every_kind_has_an_example).
EXAMPLES: dict[type, tuple[wire.Message, list[tuple[TensorSpec, bytes]]]] = {
    Segment: (
        Segment(request_id=7, seg_id=2, epoch=1, prefix_len=30, start=16, masked=True,
                busy_s=(0.25, 1e-9)),
        [_int64(11, 12, 13), _positions(31, 32, 32), _mask(3, 19)],
    ),
    Prune: (Prune(request_id=7, epoch=2, prefix_len=33, n_accepted=3, keep=(0, 4, 5, 9)), []),
    Reset: (Reset(request_id=7, threads=2), []),
    LoadStage: (
        LoadStage(model="smollm2-135m", start=0, end=15, dtype="bf16", stage_index=0, n_stages=2),
        [],
    ),
    StageReady: (StageReady(stage_index=1, start=15, end=30, n_params=67_000_000, load_s=1.5), []),
    StageFailed: (StageFailed(stage_index=1, reason="out of memory: 2.1 GB free, 3 GB needed"), []),
    Shutdown: (Shutdown(), []),
}
_SHA = "0123456789abcdef" * 4
_KEY = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"
EXAMPLES.update({  # agent control messages
    wire.PairRequest: (wire.PairRequest(client_name="desk"), []),
    wire.PairAccepted: (wire.PairAccepted(agent_id="ag-1", name="jetson", public_key=_KEY), []),
    wire.Hello: (wire.Hello(client_name="desk"), []),
    wire.StatusQuery: (wire.StatusQuery(), []),
    wire.Capabilities: (wire.Capabilities(
        agent_id="ag-1", name="jetson", version="0.1.0", public_key=_KEY, data_port=5556, memory_total=8 << 30,
        memory_free=6 << 30, memory_limit=0, cpu="ARM", cpu_count=6, accelerator="none", torch_device="cpu",
        disk_free=1 << 40, models=("smollm2-135m",), stage="layers 0-14", busy=True), []),
    wire.Profile: (wire.Profile(config_json="{}", dtype="bf16", token_counts=(1, 16)), []),
    wire.ProfileResult: (wire.ProfileResult(token_counts=(1, 16), ms_per_layer=(0.5, 1.5), cached=False), []),
    wire.HostStage: (wire.HostStage(
        model="smollm2-135m", bundle=_SHA, start=0, end=2, dtype="fp32", stage_index=0, n_stages=2,
        next_endpoint="tcp://10.0.0.2:5556", next_key=_KEY, prev_key=_KEY, config_json="{}",
        tensors=(wire.TensorEntry("model.norm.weight", "F32", (64,), 256, _SHA),)), []),
    wire.LoadProgress: (wire.LoadProgress(stage_index=0, phase="weights", done=10, total=20), []),
    wire.WeightsNeeded: (wire.WeightsNeeded(bundle=_SHA, have=(0, 256)), []),
    wire.WeightChunk: (wire.WeightChunk(bundle=_SHA, tensor=1, offset=0, data=b"\x00\x01", sha256=_SHA), []),
    wire.Unload: (wire.Unload(), []),
    wire.Heartbeat: (wire.Heartbeat(), []),
    wire.CommandFailed: (wire.CommandFailed(reason="busy: hosting a stage for another client"), []),
})


def _valid_frames() -> list[bytes]:
    msg, payloads = EXAMPLES[Segment]
    return [bytes(frame) for frame in encode(msg, payloads)]


def _header(msg: dict, tensors: list[dict] | None = None) -> bytes:
    return msgspec.msgpack.encode({"msg": msg, "tensors": tensors or []})


def test_every_kind_has_an_example():
    assert set(EXAMPLES) == set(wire.MESSAGE_TYPES)


@pytest.mark.parametrize("kind", list(EXAMPLES), ids=lambda cls: cls.__name__)
def test_message_round_trips(kind):
    msg, payloads = EXAMPLES[kind]

    frames = encode(msg, payloads)
    decoded, tensors = decode(frames)

    assert decoded == msg and type(decoded) is kind
    assert frames[0] == PROTOCOL
    assert [spec for spec, _ in tensors] == [spec for spec, _ in payloads]
    assert [bytes(view) for _, view in tensors] == [data for _, data in payloads]


def test_unmasked_segment_with_empty_tensors_round_trips():
    msg = Segment(request_id=0, seg_id=0, epoch=0, prefix_len=5, start=0, masked=False)
    payloads = [(TensorSpec("int64", (1, 0)), b""), (TensorSpec("int64", (0,)), b"")]

    decoded, tensors = decode(encode(msg, payloads))

    assert decoded == msg
    assert [(spec, bytes(view)) for spec, view in tensors] == payloads


class _FakeZmqFrame:
    def __init__(self, data: bytes):
        self.buffer = memoryview(data)


@pytest.mark.parametrize("wrap", [bytes, bytearray, memoryview, _FakeZmqFrame])
def test_decode_accepts_every_frame_type(wrap):
    msg, payloads = EXAMPLES[Segment]

    decoded, tensors = decode([wrap(frame) for frame in _valid_frames()])

    assert decoded == msg
    assert bytes(tensors[2][1]) == payloads[2][1]


def test_header_layout_is_tagged_by_kind():
    header = msgspec.msgpack.decode(encode(Reset(request_id=3, threads=2))[1])

    assert header == {"msg": {"kind": "Reset", "request_id": 3, "threads": 2}, "tensors": []}


def test_a_reset_without_threads_keeps_the_stage_thread_count():
    """A Reset from a peer that predates `threads` decodes with threads=0 (keep the stage's count)."""
    decoded, _ = decode([PROTOCOL, _header({"kind": "Reset", "request_id": 4}, [])])

    assert decoded == Reset(request_id=4, threads=0)


def test_messages_are_frozen():
    with pytest.raises(AttributeError):
        Reset(request_id=1).request_id = 2  # type: ignore[misc]


def test_tensor_spec_nbytes():
    assert TensorSpec("bfloat16", (2, 3, 4)).nbytes == 48
    assert TensorSpec("int64", ()).nbytes == 8
    assert TensorSpec("bool", (0, 5)).nbytes == 0


@pytest.mark.parametrize(
    ("dtype", "shape", "match"),
    [
        ("float64", (2,), "not in the allowlist"),
        ("int32", (2, -1), "non-negative"),
        ("int32", (1,) * 9, "dims"),
        ("float32", (1 << 20, 1 << 20), "absurd"),
        ("float32", (0, 1 << 40), "absurd"),
    ],
)
def test_tensor_spec_rejects_bad_specs(dtype, shape, match):
    with pytest.raises(WireError, match=match):
        TensorSpec(dtype, shape)


def test_wire_does_not_import_torch_or_numpy():
    code = "import sys, engine.wire; print(sorted({'torch', 'numpy'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- decode: bad input


@pytest.mark.parametrize(
    ("frame0", "match"),
    [
        (b"FLOWSPEC2", r"Peer speaks protocol FLOWSPEC2 but this side speaks FLOWSPEC1; update th"),
        (b"FLOWSPEC0", r"FLOWSPEC0 .* update the peer"),
        (b"GET / HTTP/1.1", r"not a FlowSpec protocol frame \(expected b'FLOWSPEC1'\)"),
        (b"", "not a FlowSpec protocol frame"),
    ],
)
def test_wrong_protocol(frame0, match):
    with pytest.raises(WireError, match=match):
        decode([frame0, *_valid_frames()[1:]])


def test_no_frames():
    with pytest.raises(WireError, match="no frames"):
        decode([])


def test_header_frame_missing():
    with pytest.raises(WireError, match="header frame is missing"):
        decode([PROTOCOL])


def test_truncated_header():
    frames = _valid_frames()
    with pytest.raises(WireError, match="not valid msgpack: .*truncated"):
        decode([frames[0], frames[1][:-5], *frames[2:]])


def test_truncated_payload():
    frames = _valid_frames()
    with pytest.raises(WireError, match="Tensor 1 payload is 23 bytes but int64\\[3\\] needs 24"):
        decode([*frames[:3], frames[3][:-1], frames[4]])


def test_missing_payload_frame():
    with pytest.raises(WireError, match="Header lists 3 tensors but 2 payload frames came"):
        decode(_valid_frames()[:-1])


def test_extra_payload_frame():
    with pytest.raises(WireError, match="Header lists 3 tensors but 4 payload frames came"):
        decode([*_valid_frames(), b"\x00" * 8])


def test_too_many_frames():
    with pytest.raises(WireError, match=f"at most {2 + MAX_TENSORS}"):
        decode(_valid_frames() + [b""] * MAX_TENSORS)


def test_too_many_tensors_in_header():
    tensors = [{"dtype": "bool", "shape": [0]}] * (MAX_TENSORS + 1)
    with pytest.raises(WireError, match=f"lists {MAX_TENSORS + 1} tensors; at most {MAX_TENSORS}"):
        decode([PROTOCOL, _header({"kind": "Reset", "request_id": 1}, tensors)])


def test_tensor_count_must_match_the_message():
    unmasked = {"kind": "Segment", "request_id": 1, "seg_id": 0, "epoch": 0, "prefix_len": 0,
                "start": 0, "masked": False}
    tensors = [{"dtype": "int64", "shape": [0]}] * 3
    with pytest.raises(WireError, match="Segment carries 3 tensors but needs 2"):
        decode([PROTOCOL, _header(unmasked, tensors), b"", b"", b""])


def test_oversized_header():
    header = _header({"kind": "StageFailed", "stage_index": 0, "reason": "x" * MAX_HEADER_BYTES})
    with pytest.raises(WireError, match=f"Header is {len(header)} bytes, over the"):
        decode([PROTOCOL, header])


def test_oversized_frame(monkeypatch):
    monkeypatch.setattr(wire, "MAX_FRAME_BYTES", 1000)
    frames = _valid_frames()
    with pytest.raises(WireError, match="Frame 4 is 1001 bytes, over the 1000-byte limit"):
        decode([*frames[:4], b"\x00" * 1001])


def test_bad_dtype():
    header = _header({"kind": "Reset", "request_id": 1}, [{"dtype": "complex64", "shape": [2]}])
    with pytest.raises(WireError, match="'complex64' is not in the allowlist"):
        decode([PROTOCOL, header, b"\x00" * 16])


@pytest.mark.parametrize(
    ("shape", "match"),
    [([-1], "non-negative"), ([1 << 62, 4], "absurd"), (["2"], "Expected `int`"), (3, "array")],
)
def test_bad_shape(shape, match):
    header = _header({"kind": "Reset", "request_id": 1}, [{"dtype": "int32", "shape": shape}])
    with pytest.raises(WireError, match=match):
        decode([PROTOCOL, header, b""])


def test_wrong_nbytes():
    msg, payloads = EXAMPLES[Segment]
    frames = encode(msg, payloads)
    match = r"Tensor 2 payload is 58 bytes but bool\[1, 1, 3, 19\] needs 57"
    with pytest.raises(WireError, match=match):
        decode([*frames[:4], bytes(frames[4]) + b"\x01"])


def test_bool_payload_must_be_zero_or_one():
    frames = _valid_frames()
    with pytest.raises(WireError, match="Tensor 2 is bool but its payload holds bytes other"):
        decode([*frames[:4], b"\x02" + frames[4][1:]])


def test_unknown_kind():
    with pytest.raises(WireError, match="Unknown message kind 'Teleport'; this side knows Segment"):
        decode([PROTOCOL, _header({"kind": "Teleport", "request_id": 1})])


def test_missing_kind():
    with pytest.raises(WireError, match="does not match the message schema.*kind"):
        decode([PROTOCOL, _header({"request_id": 1})])


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        ({"kind": "Reset", "request_id": "7"}, r"Expected `int`, got `str` - at `\$.request_id`"),
        ({"kind": "Reset", "request_id": True}, "Expected `int`, got `bool`"),
        ({"kind": "Reset", "request_id": -1}, ">= 0"),
        ({"kind": "Reset"}, "missing required field `request_id`"),
        ({"kind": "StageFailed", "stage_index": 0, "reason": b"bytes"}, "Expected `str`"),
        ({"kind": "LoadStage", "model": "m", "start": 5, "end": 5, "dtype": "bf16",
          "stage_index": 0, "n_stages": 1}, r"layer range \[5, 5\) is empty"),
        ({"kind": "LoadStage", "model": "m", "start": 0, "end": 5, "dtype": "bf16",
          "stage_index": 2, "n_stages": 2}, "stage_index 2 is outside 0..1"),
        ([1, 2], "Expected `object`, got `array`"),
    ],
)
def test_wrong_field_values(msg, match):
    with pytest.raises(WireError, match=match):
        decode([PROTOCOL, _header(msg)])


@pytest.mark.parametrize(
    ("header", "match"),
    [
        (b"", "not valid msgpack"),
        (b"\xc1", "not valid msgpack"),
        (b"\x82\xa3msg", "not valid msgpack: Input data was truncated"),
        (b"\x00", "does not match the message schema: Expected `object`, got `int`"),
        (b"\x82\xa3msg" + b"\x91" * 100_000 + b"\x00", "nested too deeply"),
        (b"\x81\xa3msg\x81\xa4kind\xa2\xff\xfe", "not valid UTF-8"),
    ],
)
def test_garbage_header(header, match):
    with pytest.raises(WireError, match=f"^Header .*{match}"):
        decode([PROTOCOL, header])


# --- encode: refuses what decode would refuse


def test_encode_checks_tensor_count():
    with pytest.raises(WireError, match="Segment carries 2 tensors but needs 3"):
        encode(EXAMPLES[Segment][0], EXAMPLES[Segment][1][:2])


def test_encode_checks_payload_size():
    spec, data = _positions(1, 2)
    with pytest.raises(WireError, match="payload is 15 bytes"):
        encode(Segment(1, 0, 0, 0, 0, False), [_int64(1, 2), (spec, data[:-1])])


def test_encode_checks_field_values():
    with pytest.raises(WireError, match=">= 0"):
        encode(Reset(request_id=-3))
    with pytest.raises(WireError, match="Cannot encode Reset"):
        encode(Reset(request_id=1 << 70))


def test_encode_checks_header_size():
    with pytest.raises(WireError, match="Header is .* bytes, over the"):
        encode(StageFailed(stage_index=0, reason="x" * MAX_HEADER_BYTES))


def test_encode_rejects_non_messages():
    with pytest.raises(TypeError, match="encode takes a wire message, not dict"):
        encode({"kind": "Reset", "request_id": 1})  # type: ignore[arg-type]


def test_load_stage_validates_on_construction():
    with pytest.raises(WireError, match=r"layer range \[3, 2\)"):
        LoadStage(model="m", start=3, end=2, dtype="bf16", stage_index=0, n_stages=1)
