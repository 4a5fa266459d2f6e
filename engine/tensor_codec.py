"""torch.Tensor <-> wire payloads: a `TensorSpec` (allowlisted dtype name, shape) plus raw bytes.

`engine/wire.py` owns the byte layout and stays torch-free; this module is the only bridge
between it and torch (STYLE S4). A payload is the bytes of
`t.contiguous().reshape(-1).view(torch.uint8)`, which also works for bfloat16 (numpy has no
bfloat16). Payloads are in native byte order, which is little-endian on every supported device.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from engine.wire import Message, TensorSpec, WireError, check_payload, decode, encode

logger = logging.getLogger(__name__)

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
_DTYPE_NAMES: dict[torch.dtype, str] = {dtype: name for name, dtype in TORCH_DTYPES.items()}


def to_payload(tensor: torch.Tensor) -> tuple[TensorSpec, memoryview]:
    """The spec and the raw bytes of `tensor` (copied only if not CPU-resident and contiguous).

    The memoryview keeps the bytes alive; do not modify `tensor` until they have been sent.
    """
    name = _DTYPE_NAMES.get(tensor.dtype)
    if name is None:
        raise WireError(
            f"Tensor dtype {tensor.dtype} cannot travel on the wire; "
            f"convert it to one of {sorted(TORCH_DTYPES)}."
        )
    spec = TensorSpec(dtype=name, shape=tuple(tensor.shape))
    flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)  # [nbytes]
    return spec, memoryview(flat.numpy())


def from_payload(spec: TensorSpec, payload: bytes | bytearray | memoryview) -> torch.Tensor:
    """A new, writable CPU tensor of `spec.dtype` and `spec.shape` holding a copy of `payload`."""
    view = memoryview(payload).cast("B")
    check_payload(spec, view)
    dtype = TORCH_DTYPES[spec.dtype]
    if spec.nbytes == 0:  # torch.frombuffer refuses an empty buffer
        return torch.empty(spec.shape, dtype=dtype)
    # A bytearray copy: torch.frombuffer warns on read-only buffers (bytes, zmq frames), and the
    # tensor must not alias a frame that libzmq may reuse.
    return torch.frombuffer(bytearray(view), dtype=dtype).reshape(spec.shape)


def encode_tensors(msg: Message, tensors: Sequence[torch.Tensor] = ()) -> list[bytes | memoryview]:
    """`wire.encode` of `msg` with `tensors` as its payloads, in order."""
    return encode(msg, [to_payload(tensor) for tensor in tensors])


def decode_tensors(frames: Sequence[object]) -> tuple[Message, list[torch.Tensor]]:
    """`wire.decode` of `frames`, with every payload rebuilt as a tensor."""
    msg, payloads = decode(frames)
    return msg, [from_payload(spec, payload) for spec, payload in payloads]
