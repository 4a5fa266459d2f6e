"""A stage holds exactly its layers (read from the safetensors index) and chained stages equal the full model."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.model_adapters import UnsupportedArchitecture
from engine.stage import StageError, load_head, load_stage
from tests.tiny_models import make_tiny_llama_dir, make_tiny_qwen2_dir

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def model_dir(request, tmp_path_factory):
    make = make_tiny_llama_dir if request.param == "llama" else make_tiny_qwen2_dir
    return make(tmp_path_factory.mktemp(request.param), n_layers=6)


def test_stage_holds_exactly_its_layers(model_dir):
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    stage = load_stage(model_dir, 2, 4, "fp32")
    names = {n for n, _ in stage.named_parameters()}
    assert stage.embed is None and stage.norm is None
    assert names == {f"layers.{j}.{k}" for j in range(2) for k, _ in full.model.layers[0].named_parameters()}
    for j, i in enumerate(range(2, 4)):
        for k, p in full.model.layers[i].named_parameters():
            assert torch.equal(stage.layers[j].get_parameter(k), p), k
    first, last = load_stage(model_dir, 0, 1, "fp32"), load_stage(model_dir, 5, 6, "fp32")
    assert first.embed is not None and first.norm is None
    assert last.norm is not None and last.embed is None


@pytest.mark.parametrize("bounds", [[(0, 6)], [(0, 3), (3, 6)], [(0, 1), (1, 5), (5, 6)]])
def test_chained_stages_equal_full_model(model_dir, bounds):
    full = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    stages = [load_stage(model_dir, a, b, "fp32") for a, b in bounds]
    head = load_head(model_dir, "fp32")
    ids = torch.randint(0, full.config.vocab_size, (1, 23), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = full.model(ids).last_hidden_state[0]
        ref_logits = full(ids).logits[0]
    x, pos = ids[0], torch.arange(23)
    for stage in stages:
        x = stage(x, pos)
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(head.logits(x), ref_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("start,end", [(0, 0), (3, 2), (-1, 2), (0, 7), (6, 7)])
def test_bad_layer_range_is_refused(model_dir, start, end):
    with pytest.raises(StageError, match=r"layer range .* this model has 6 layers"):
        load_stage(model_dir, start, end, "fp32")


def test_unsupported_architecture_is_refused(tmp_path):
    d = make_tiny_llama_dir(tmp_path, n_layers=2)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt_neox"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises((UnsupportedArchitecture, ValueError)):
        load_stage(d, 0, 1, "fp32")


_RSS = """
import sys, psutil, torch
import transformers.models.llama.modeling_llama  # imports are not what is measured
from transformers import AutoConfig
from engine.stage import load_stage
path, start, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
AutoConfig.from_pretrained(path)
base = psutil.Process().memory_info().rss
stage = load_stage(path, start, end, "fp32")
x = torch.zeros(4, dtype=torch.long) if start == 0 else torch.zeros(4, stage.config.hidden_size)
stage(x, torch.arange(4))  # touch every weight: mapped pages count once they are resident
print(psutil.Process().memory_info().rss - base)
"""


def test_quarter_stage_uses_far_less_memory_than_whole_model(tmp_path):
    d = make_tiny_llama_dir(tmp_path, n_layers=8, hidden=512)

    def rss(start, end):
        out = subprocess.run([sys.executable, "-c", _RSS, str(d), str(start), str(end)],
                             capture_output=True, text=True, check=True)
        return int(out.stdout.strip().splitlines()[-1])

    quarter, whole = rss(2, 4), rss(0, 8)
    assert quarter < 0.5 * whole, (quarter, whole)
