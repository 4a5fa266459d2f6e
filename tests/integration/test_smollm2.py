"""The shipped model: `smollm2-135m` resolves to a converted directory that generates what the GGUF does.

Uses the real user cache (the first run converts, ~15 s; later runs reuse it) and loads the
GGUF directly once for the reference (~15 s).
"""

from __future__ import annotations

import logging
import time

import pytest
import torch

from engine.models import BUILTIN_MODELS, model_info, resolve_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]
logger = logging.getLogger(__name__)

PROMPT = "The capital of France is Paris. The capital of Germany is"
NEW_TOKENS = 12


def _greedy(model, tokenizer) -> str:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :])


def test_smollm2_converted_directory_generates_like_the_gguf() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.perf_counter()
    resolved = resolve_model("smollm2-135m", progress=False)
    resolve_s = time.perf_counter() - started
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(resolved.path)
    model = AutoModelForCausalLM.from_pretrained(resolved.path, dtype=torch.float32).eval()
    load_s = time.perf_counter() - started
    logger.info("smollm2-135m: resolve %.1f s, load from the converted directory %.1f s", resolve_s, load_s)

    info = model_info(resolved)
    assert (resolved.source, resolved.name) == ("builtin", "SmolLM2-135M-Instruct")
    assert (info.arch, info.n_layers, info.hidden_size, info.vocab_size) == ("llama", 30, 576, 49152)
    assert (info.n_params, info.dtype) == (134_515_008, "float32")  # LM head tied to the embedding

    gguf_path = BUILTIN_MODELS["smollm2-135m"].locate()
    gguf_tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()

    text = _greedy(model, tokenizer)
    assert text == _greedy(gguf_model, gguf_tokenizer)
    assert text.startswith(" Berlin.")
