"""engine.packed_linear: bf16 weights packed once compute what nn.Linear computes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine import stage as stage_mod
from engine.packed_linear import PackedLinear, Projection, pack_linears, packing_works
from engine.stage import load_stage
from tests.tiny_models import make_tiny_llama_dir

needs_packing = pytest.mark.skipif(not packing_works(), reason="this CPU or torch build cannot pack bf16 weights")


def _bf16_linear(n_in: int, n_out: int, bias: bool) -> nn.Linear:
    torch.manual_seed(n_in + n_out)
    return nn.Linear(n_in, n_out, bias=bias).to(torch.bfloat16)


@needs_packing
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (2, 5, 64)])
def test_packed_linear_matches_linear(bias, shape):
    linear = _bf16_linear(64, 96, bias)
    x = torch.randn(shape).to(torch.bfloat16)

    got = PackedLinear(linear)(x)

    assert got.shape == (*shape[:-1], 96)
    torch.testing.assert_close(got, linear(x), rtol=1e-2, atol=1e-2)


@needs_packing
def test_pack_linears_swaps_bf16_linears_only():
    model = nn.Sequential(_bf16_linear(16, 32, True), nn.ReLU(), nn.Sequential(_bf16_linear(32, 8, False)),
                          nn.Linear(8, 4))  # the last stays fp32
    x = torch.randn(3, 16).to(torch.bfloat16)
    before = model[2](model[1](model[0](x)))

    assert pack_linears(model) == 2

    assert isinstance(model[0], PackedLinear) and isinstance(model[2][0], PackedLinear)
    assert type(model[3]) is nn.Linear
    assert model[0].n_params == 16 * 32 + 32
    torch.testing.assert_close(model[2](model[1](model[0](x))), before, rtol=1e-2, atol=1e-2)


def test_projection_of_a_float32_weight_is_plain_linear():
    weight = torch.randn(10, 6)
    x = torch.randn(4, 6)

    assert torch.equal(Projection(weight)(x), nn.functional.linear(x, weight))


@needs_packing
def test_a_bf16_stage_packs_its_layers_and_computes_as_an_unpacked_one(tmp_path, monkeypatch):
    path = make_tiny_llama_dir(tmp_path / "tiny", n_layers=2)
    packed = load_stage(path, 0, 2, "bf16")
    monkeypatch.setattr(stage_mod, "pack_linears", lambda module: 0)
    plain = load_stage(path, 0, 2, "bf16")
    ids = torch.randint(0, 300, (9,), generator=torch.Generator().manual_seed(1))

    out_packed, out_plain = packed(ids, torch.arange(9)), plain(ids, torch.arange(9))

    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    assert not any(isinstance(m, PackedLinear) for m in plain.modules())
    assert packed.n_params() == plain.n_params()
    torch.testing.assert_close(out_packed, out_plain, rtol=2e-2, atol=2e-2)


@needs_packing
def test_a_packed_projection_matches_linear_and_holds_no_plain_copy():
    weight = torch.randn(96, 64).to(torch.bfloat16)
    x = torch.randn(5, 64)  # cast to the weight's dtype by the projection

    projection = Projection(weight)

    assert projection._weight is None and projection.out_features == 96
    torch.testing.assert_close(projection(x), nn.functional.linear(x.to(torch.bfloat16), weight), rtol=1e-2, atol=1e-2)
