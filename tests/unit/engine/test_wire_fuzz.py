"""engine.wire.decode under mutated and random frames: a valid message or a WireError, nothing else.

Every mutation starts from a valid encoded message and is seeded, so a failure names its case
and replays exactly.
"""

from __future__ import annotations

import random
from collections.abc import Callable

import msgspec
import pytest

from engine import wire
from engine.tensor_codec import from_payload
from engine.wire import PROTOCOL, Segment, TensorSpec, WireError, decode, encode

CASES_PER_STRATEGY = 10_000

Frames = list[bytes]


def _seed_messages() -> list[Frames]:
    segment = Segment(request_id=3, seg_id=1, epoch=2, prefix_len=9, start=4, masked=True,
                      busy_s=(0.5,))
    payloads = [
        (TensorSpec("float32", (1, 3, 2)), bytes(range(24))),
        (TensorSpec("int64", (3,)), bytes(24)),
        (TensorSpec("bool", (1, 1, 3, 7)), bytes([0, 1, 1]) * 7),
    ]
    messages = [
        encode(segment, payloads),
        encode(wire.Prune(request_id=1, epoch=2, prefix_len=3, n_accepted=1, keep=(0, 2, 5))),
        encode(wire.LoadStage("m", start=0, end=4, dtype="bf16", stage_index=0, n_stages=2)),
        encode(wire.StageReady(stage_index=0, start=0, end=4, n_params=10, load_s=0.1)),
        encode(wire.StageFailed(stage_index=1, reason="no")),
        encode(wire.Shutdown()),
    ]
    return [[bytes(frame) for frame in frames] for frames in messages]


SEEDS = _seed_messages()


def _flip_bits(rng: random.Random, frames: Frames) -> Frames:
    index = rng.randrange(len(frames))
    data = bytearray(frames[index])
    for _ in range(rng.randint(1, 4)):
        if data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    return [*frames[:index], bytes(data), *frames[index + 1:]]


def _truncate(rng: random.Random, frames: Frames) -> Frames:
    index = rng.randrange(len(frames))
    data = frames[index]
    return [*frames[:index], data[: rng.randrange(len(data) + 1)], *frames[index + 1:]]


def _insert(rng: random.Random, frames: Frames) -> Frames:
    index = rng.randrange(len(frames))
    data = frames[index]
    at = rng.randrange(len(data) + 1)
    extra = rng.randbytes(rng.randint(1, 8))
    return [*frames[:index], data[:at] + extra + data[at:], *frames[index + 1:]]


def _drop_or_duplicate(rng: random.Random, frames: Frames) -> Frames:
    mutated = list(frames)
    for _ in range(rng.randint(1, 3)):
        index = rng.randrange(len(mutated)) if mutated else 0
        if rng.random() < 0.5 and mutated:
            del mutated[index]
        else:
            mutated.insert(rng.randrange(len(mutated) + 1), mutated[index] if mutated else b"")
    return mutated


_ODD_VALUES = [-1, 0, 1, 2**63, 2**64 - 1, -(2**63), 1.5, float("nan"), "", "Segment", "x" * 300,
               b"\x00", True, None, [], [1, [2, [3]]], {}, {"kind": "Reset"}]


def _mutate_value(rng: random.Random, value: object) -> object:
    if isinstance(value, dict) and value and rng.random() < 0.7:
        key = rng.choice(list(value))
        if rng.random() < 0.15:
            return {k: v for k, v in value.items() if k != key}
        return {**value, key: _mutate_value(rng, value[key])}
    if isinstance(value, list) and value and rng.random() < 0.7:
        index = rng.randrange(len(value))
        return [*value[:index], _mutate_value(rng, value[index]), *value[index + 1:]]
    return rng.choice(_ODD_VALUES)


def _mutate_header_values(rng: random.Random, frames: Frames) -> Frames:
    header = msgspec.msgpack.decode(frames[1])
    return [frames[0], msgspec.msgpack.encode(_mutate_value(rng, header)), *frames[2:]]


def _random_bytes(rng: random.Random, frames: Frames) -> Frames:
    count = rng.randint(0, 5)
    random_frames = [rng.randbytes(rng.randint(0, 64)) for _ in range(count)]
    if random_frames and rng.random() < 0.5:
        random_frames[0] = PROTOCOL
    return random_frames


STRATEGIES: dict[str, Callable[[random.Random, Frames], Frames]] = {
    "flip_bits": _flip_bits,
    "truncate": _truncate,
    "insert": _insert,
    "drop_or_duplicate": _drop_or_duplicate,
    "mutate_header_values": _mutate_header_values,
    "random_bytes": _random_bytes,
}


def _check_accepted(msg: wire.Message, tensors: list[tuple[TensorSpec, memoryview]]) -> None:
    """What decode returns is a well-formed message that re-encodes and rebuilds as tensors."""
    assert isinstance(msg, wire.MESSAGE_TYPES)
    assert len(tensors) == msg.tensor_count()
    for spec, payload in tensors:
        assert payload.nbytes == spec.nbytes
        assert tuple(from_payload(spec, payload).shape) == spec.shape
    header = bytes(encode(msg, tensors)[1])
    again, _ = decode([PROTOCOL, header, *(payload for _, payload in tensors)])
    assert bytes(encode(again, tensors)[1]) == header  # bytes, since NaN != NaN in a field


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_decode_returns_a_message_or_raises_wire_error(strategy):
    mutate = STRATEGIES[strategy]
    outcomes = {"accepted": 0, "rejected": 0}
    for case in range(CASES_PER_STRATEGY):
        rng = random.Random(f"{strategy}-{case}")
        frames = mutate(rng, list(rng.choice(SEEDS)))
        try:
            msg, tensors = decode(frames)
        except WireError as exc:
            assert str(exc), f"empty WireError for {strategy} case {case}"
            outcomes["rejected"] += 1
            continue
        except Exception as exc:  # noqa: BLE001 - the point of the test is to report these
            pytest.fail(f"{strategy} case {case}: decode raised {exc!r} for frames {frames!r}")
        _check_accepted(msg, tensors)
        outcomes["accepted"] += 1
    assert outcomes["rejected"] > 0, outcomes
    if strategy not in ("random_bytes", "drop_or_duplicate"):
        assert outcomes["accepted"] > 0, outcomes  # the mutations are not all trivially fatal


def test_seeds_are_valid():
    for frames in SEEDS:
        _check_accepted(*decode(frames))


def test_random_payload_bytes_are_rejected_only_for_bool():
    rng = random.Random(0)
    for _ in range(200):
        frames = list(SEEDS[0])
        frames[2] = rng.randbytes(len(frames[2]))  # float32: any bytes are a valid tensor
        frames[4] = bytes(rng.choice((0, 1)) for _ in frames[4])
        decode(frames)
        frames[4] = bytes([2]) + frames[4][1:]
        with pytest.raises(WireError, match="bool"):
            decode(frames)

