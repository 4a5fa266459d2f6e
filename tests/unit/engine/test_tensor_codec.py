"""engine.tensor_codec: every allowlisted dtype and shape round-trips bit for bit."""

from __future__ import annotations

import warnings

import pytest
import torch

from engine import wire
from engine.tensor_codec import (
    TORCH_DTYPES,
    decode_tensors,
    encode_tensors,
    from_payload,
    to_payload,
)
from engine.wire import Segment, TensorSpec, WireError

SHAPES = [(2, 3, 4), (1,), (), (0, 5)]


def _sample(dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        values = torch.randn(shape, generator=generator) * 1e3
        if values.numel() >= 4:  # special values must survive bit for bit too
            values.view(-1)[:4] = torch.tensor([float("nan"), float("inf"), -0.0, -float("inf")])
        return values.to(dtype)
    info = torch.iinfo(dtype)
    return torch.randint(info.min, info.max, shape, generator=generator, dtype=dtype)


def _bits(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_allowlists_agree():
    assert set(TORCH_DTYPES) == set(wire.DTYPE_ITEMSIZE)
    for name, dtype in TORCH_DTYPES.items():
        assert torch.empty((), dtype=dtype).element_size() == wire.DTYPE_ITEMSIZE[name]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(TORCH_DTYPES))
def test_round_trip_is_bit_exact(name, shape):
    original = _sample(TORCH_DTYPES[name], shape)

    spec, payload = to_payload(original)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch.frombuffer warns on read-only buffers
        restored = from_payload(spec, bytes(payload))

    assert spec == TensorSpec(name, shape)
    assert payload.nbytes == spec.nbytes
    assert restored.dtype == original.dtype and restored.shape == original.shape
    assert _bits(restored) == _bits(original)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(TORCH_DTYPES))
def test_round_trip_through_frames(name, shape):
    tensors = [_sample(TORCH_DTYPES[name], shape), torch.arange(3), torch.ones(1, 1, 3, 3) > 0]
    msg = Segment(request_id=1, seg_id=0, epoch=0, prefix_len=0, start=0, masked=True)

    frames = [bytes(frame) for frame in encode_tensors(msg, tensors)]
    decoded, restored = decode_tensors(frames)

    assert decoded == msg
    assert [(t.dtype, t.shape) for t in restored] == [(t.dtype, t.shape) for t in tensors]
    assert [_bits(t) for t in restored] == [_bits(t) for t in tensors]


def test_non_contiguous_and_grad_tensors():
    transposed = torch.arange(12, dtype=torch.float32).reshape(3, 4).t()
    with_grad = torch.randn(2, 3, requires_grad=True)

    for original in (transposed, with_grad, transposed[::2]):
        spec, payload = to_payload(original)
        assert torch.equal(from_payload(spec, payload), original.detach())


def test_result_is_writable_and_does_not_alias_the_frame():
    frame = bytearray(to_payload(torch.arange(4, dtype=torch.int32))[1])
    restored = from_payload(TensorSpec("int32", (4,)), frame)

    frame[:] = bytes(len(frame))
    restored += 1

    assert restored.tolist() == [1, 2, 3, 4]


def test_payload_views_the_tensor_without_copying():
    original = torch.zeros(4, dtype=torch.int32)
    _, payload = to_payload(original)

    original[0] = 7

    assert payload.tobytes()[:4] == (7).to_bytes(4, "little")


@pytest.mark.parametrize("dtype", [torch.float64, torch.uint8, torch.int8, torch.complex64])
def test_unsupported_dtype_is_refused(dtype):
    with pytest.raises(WireError, match=f"Tensor dtype {dtype} cannot travel on the wire"):
        to_payload(torch.zeros(2, dtype=dtype))


def test_from_payload_checks_size_and_bool_values():
    with pytest.raises(WireError, match="payload is 7 bytes but float32\\[2\\] needs 8"):
        from_payload(TensorSpec("float32", (2,)), b"\x00" * 7)
    with pytest.raises(WireError, match="bool but its payload holds bytes other than 0 and 1"):
        from_payload(TensorSpec("bool", (2,)), b"\x01\xff")
