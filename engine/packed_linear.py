"""bf16 linear layers with their weights packed once for oneDNN, for inference on CPU.

`nn.Linear` in bf16 on CPU hands its weight to oneDNN in plain layout, and oneDNN reorders it into
its blocked layout on every call. Packing once at load time skips that work. On SmolLM2-135M with
2 threads on this project's build machine, a whole-model stage forward after a 300-token prefix
took 36.7 ms instead of 42.4 ms for 1 token and 50.8 ms instead of 54.3 ms for a 32-node tree
segment, with bit-identical outputs (on a busier machine later, only 1-2 ms less).

Packing is inference-only: a packed weight has no gradient and no plain layout. It happens only
where the op exists and a probe at first use matches `linear`; anywhere else layers stay as they are.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

PACK_BATCH = 32  # rows oneDNN tunes the packed layout for: a tree segment; any row count works


@functools.cache
def packing_works() -> bool:
    """Whether this torch build packs bf16 weights and gets `linear`'s results with them."""
    try:
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        gen = torch.Generator().manual_seed(0)
        weight = torch.randn(48, 40, generator=gen).to(torch.bfloat16)
        x = torch.randn(3, 40, generator=gen).to(torch.bfloat16)
        got = packed_linear(x, pack_weight(weight))
        ok = torch.allclose(got.float(), nn.functional.linear(x, weight).float(), rtol=1e-2, atol=1e-2)
    except (RuntimeError, AttributeError) as exc:  # op missing or unsupported on this CPU
        logger.info("bf16 weight packing unavailable (%s); using plain linear", exc)
        return False
    if not ok:
        logger.warning("bf16 weight packing gave results unlike linear on this machine; using plain linear")
    return ok


def can_pack(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu" and weight.dim() == 2 and packing_works()


def pack_weight(weight: torch.Tensor) -> torch.Tensor:
    """[out, in] bf16 weight -> the same weight in oneDNN's blocked layout (an opaque tensor)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), PACK_BATCH)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`linear(x, weight, bias)` with a weight from `pack_weight`; x is [..., in] bf16."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class PackedLinear(nn.Module):
    """An inference-only stand-in for a bf16 `nn.Linear`, computing the same function."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.n_params = linear.weight.numel() + (0 if linear.bias is None else linear.bias.numel())
        self.packed = pack_weight(linear.weight)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return packed_linear(x, self.packed, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed bf16"


def pack_linears(module: nn.Module) -> int:
    """Swap every bf16 CPU `nn.Linear` inside `module` for a PackedLinear; return how many.

    The plain weights are dropped (no second copy in memory), so only inference may follow.
    """
    swapped = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear) and can_pack(child.weight):
                setattr(parent, name, PackedLinear(child))
                swapped += 1
    return swapped


class Projection:
    """x -> linear(x, weight) for a fixed [out, in] weight (an LM head), packed where packing works.

    A packed projection keeps no reference to the plain weight: the caller decides whether that
    stays in memory (the target's LM head does, for drafters and distillation).
    """

    def __init__(self, weight: torch.Tensor) -> None:
        self.out_features = weight.shape[0]
        self.dtype = weight.dtype
        self._packed = pack_weight(weight) if can_pack(weight) else None
        self._weight = weight.detach() if self._packed is None else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        return nn.functional.linear(x, self._weight) if self._packed is None else packed_linear(x, self._packed)
