"""Tiny, seeded, real models built in code, for tests that must never touch a model hub.

Everything here is deterministic: the same arguments give byte-identical files in any process.

- `make_tiny_tokenizer()`: a real byte-level BPE tokenizer (GPT-2 style, 320 tokens, trained on a
  fixed corpus) with `<|endoftext|>` (bos/eos/pad), `<|im_start|>`, `<|im_end|>` and a ChatML template.
- `make_tiny_llama_dir(tmp_path, ...)`, `make_tiny_qwen2_dir(tmp_path, ...)`: a Hugging Face model
  directory (config.json, model.safetensors, tokenizer files) holding a random model.
- `make_tiny_gguf(tmp_path, ...)`: a valid llama-architecture GGUF (llama.cpp tensor names, q/k
  permuted as llama.cpp does, tokenizer metadata) that transformers can load.
- `gguf_reference_state_dict(path)`: a GGUF's tensors dequantized with `gguf` alone and renamed to
  Hugging Face names: an independent reference for converters.
- `write_fake_hf_cache(cache_root, repo_id, model_dir)`: copy a model directory into the Hugging
  Face hub cache layout, so `snapshot_download(repo_id, local_files_only=True)` finds it.

Import it as `from tests.tiny_models import make_tiny_llama_dir` (tests run with
`python -m pytest` from the repository root, which puts the root on sys.path).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Literal

import numpy as np
import torch

TINY_VOCAB_SIZE = 320
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_CORPUS = (
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.",
    "Speculative decoding drafts several tokens and verifies them with one forward pass of the target.",
    "Pipeline parallelism splits the layers of a model across the devices a person already owns.",
    "hello world, hello there; the quick brown fox jumps over the lazy dog. 0123456789 + - * / = ( )",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
)
GgufTensorType = Literal["f32", "f16", "q8_0"]


def make_tiny_tokenizer():
    """A `PreTrainedTokenizerFast` over a 320-token byte-level BPE; deterministic across processes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(_CORPUS) * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=SPECIAL_TOKENS[0],
        eos_token=SPECIAL_TOKENS[0],
        pad_token=SPECIAL_TOKENS[0],
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(
    model_type: Literal["llama", "qwen2"] = "llama",
    *,
    n_layers: int = 4,
    hidden: int = 64,
    vocab: int = TINY_VOCAB_SIZE,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    intermediate: int | None = None,
    tie_embeddings: bool = False,
):
    """A tiny `LlamaConfig` / `Qwen2Config` (head_dim = hidden // n_heads), special ids 0."""
    from transformers import LlamaConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[model_type]
    return config_class(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=512,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )


def make_tiny_model(model_type: Literal["llama", "qwen2"] = "llama", *, seed: int = 0, **config_kwargs):
    """A random `LlamaForCausalLM` / `Qwen2ForCausalLM` (float32, eval mode) from `tiny_config`."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **config_kwargs), dtype=torch.float32)
    with torch.no_grad():  # the default init leaves norms at 1 and biases at 0: randomize everything
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model.eval()


def make_tiny_llama_dir(
    tmp_path: Path,
    *,
    n_layers: int = 4,
    hidden: int = 64,
    vocab: int = TINY_VOCAB_SIZE,
    seed: int = 0,
    name: str = "tiny-llama",
    dtype: torch.dtype = torch.float32,
    **config_kwargs,
) -> Path:
    """Save a seeded random Llama and the tiny tokenizer into `tmp_path / name`; return that directory.

    `vocab` must be at least `TINY_VOCAB_SIZE`. Extra keyword arguments go to `tiny_config`.
    """
    return _save_model_dir(tmp_path / name, "llama", n_layers, hidden, vocab, seed, dtype, config_kwargs)


def make_tiny_qwen2_dir(
    tmp_path: Path,
    *,
    n_layers: int = 4,
    hidden: int = 64,
    vocab: int = TINY_VOCAB_SIZE,
    seed: int = 0,
    name: str = "tiny-qwen2",
    dtype: torch.dtype = torch.float32,
    **config_kwargs,
) -> Path:
    """Like `make_tiny_llama_dir`, for a Qwen2 (attention q/k/v biases included)."""
    return _save_model_dir(tmp_path / name, "qwen2", n_layers, hidden, vocab, seed, dtype, config_kwargs)


def _save_model_dir(out, model_type, n_layers, hidden, vocab, seed, dtype, config_kwargs) -> Path:
    if vocab < TINY_VOCAB_SIZE:
        raise ValueError(f"vocab must be at least the tokenizer's {TINY_VOCAB_SIZE} tokens, got {vocab}")
    model = make_tiny_model(model_type, seed=seed, n_layers=n_layers, hidden=hidden, vocab=vocab, **config_kwargs)
    model.to(dtype).save_pretrained(out)
    make_tiny_tokenizer().save_pretrained(out)
    return out


# --- GGUF


def make_tiny_gguf(
    tmp_path: Path,
    *,
    n_layers: int = 2,
    hidden: int = 64,
    n_heads: int = 4,
    n_kv_heads: int = 2,
    tensor_type: GgufTensorType = "f32",
    tie_embeddings: bool = False,
    seed: int = 0,
    name: str = "tiny-llama",
    architecture: str = "llama",
) -> Path:
    """Write `tmp_path / f"{name}.gguf"`: the `make_tiny_model("llama", seed=seed)` weights as llama.cpp would.

    2-D weights are stored as `tensor_type` (norms stay f32); "q8_0" needs `hidden` to be a
    multiple of 32. `architecture` only changes `general.architecture` and the key prefix, to
    build files of an architecture a loader must reject.
    """
    import gguf

    model = make_tiny_model(
        "llama", seed=seed, n_layers=n_layers, hidden=hidden, n_heads=n_heads, n_kv_heads=n_kv_heads,
        tie_embeddings=tie_embeddings,
    )
    config = model.config
    path = tmp_path / f"{name}.gguf"
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_name(name)
    writer.add_uint32(f"{architecture}.context_length", config.max_position_embeddings)
    writer.add_uint32(f"{architecture}.embedding_length", hidden)
    writer.add_uint32(f"{architecture}.block_count", n_layers)
    writer.add_uint32(f"{architecture}.feed_forward_length", config.intermediate_size)
    writer.add_uint32(f"{architecture}.attention.head_count", n_heads)
    writer.add_uint32(f"{architecture}.attention.head_count_kv", n_kv_heads)
    writer.add_float32(f"{architecture}.rope.freq_base", float(config.rope_parameters["rope_theta"]))
    writer.add_float32(f"{architecture}.attention.layer_norm_rms_epsilon", config.rms_norm_eps)
    writer.add_uint32(f"{architecture}.vocab_size", config.vocab_size)
    writer.add_uint32(f"{architecture}.rope.dimension_count", hidden // n_heads)
    writer.add_file_type({"f32": 0, "f16": 1, "q8_0": 7}[tensor_type])
    _add_tokenizer_metadata(writer)
    for gguf_name, array in _llama_cpp_tensors(model).items():
        _add_tensor(writer, gguf_name, array, tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer_metadata(writer) -> None:
    """The tiny tokenizer as `tokenizer.ggml.*` keys ("gpt2" = byte-level BPE, as in SmolLM2's GGUF)."""
    import json

    tokenizer = make_tiny_tokenizer()
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = [token for token, _ in sorted(model["vocab"].items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIAL_TOKENS else 1 for token in tokens])  # 3 = control
    writer.add_token_merges([" ".join(merge) for merge in model["merges"]])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)


def _llama_cpp_tensors(model) -> dict[str, np.ndarray]:
    """HF Llama weights under llama.cpp's names, q/k rows permuted as llama.cpp's converter does."""
    config = model.config
    state = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    out = {"token_embd.weight": state["model.embed_tokens.weight"]}
    for i in range(config.num_hidden_layers):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        out[blk + "attn_norm.weight"] = state[hf + "input_layernorm.weight"]
        out[blk + "attn_q.weight"] = _permute(state[hf + "self_attn.q_proj.weight"], config.num_attention_heads)
        out[blk + "attn_k.weight"] = _permute(state[hf + "self_attn.k_proj.weight"], config.num_key_value_heads)
        out[blk + "attn_v.weight"] = state[hf + "self_attn.v_proj.weight"]
        out[blk + "attn_output.weight"] = state[hf + "self_attn.o_proj.weight"]
        out[blk + "ffn_norm.weight"] = state[hf + "post_attention_layernorm.weight"]
        out[blk + "ffn_gate.weight"] = state[hf + "mlp.gate_proj.weight"]
        out[blk + "ffn_up.weight"] = state[hf + "mlp.up_proj.weight"]
        out[blk + "ffn_down.weight"] = state[hf + "mlp.down_proj.weight"]
    out["output_norm.weight"] = state["model.norm.weight"]
    if not config.tie_word_embeddings:
        out["output.weight"] = state["lm_head.weight"]
    return out


def _permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's `permute` (HF rotary layout -> GGUF interleaved layout) of a q or k projection."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _unpermute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _add_tensor(writer, name: str, array: np.ndarray, tensor_type: GgufTensorType) -> None:
    import gguf

    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.ndim == 1 or tensor_type == "f32":
        writer.add_tensor(name, array)
    elif tensor_type == "f16":
        writer.add_tensor(name, array.astype(np.float16))
    else:
        qtype = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)  # uint8 blocks


def gguf_reference_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A llama GGUF's tensors, dequantized by `gguf` alone, under Hugging Face names (float32).

    Independent of transformers, so it checks a converter's names, q/k un-permutation and values.
    """
    import gguf

    reader = gguf.GGUFReader(path)
    arch = reader.fields["general.architecture"].contents()
    n_heads = int(reader.fields[f"{arch}.attention.head_count"].contents())
    n_kv_heads = int(reader.fields[f"{arch}.attention.head_count_kv"].contents())
    renames = {
        "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }
    out = {}
    for tensor in reader.tensors:
        shape = tuple(int(dim) for dim in reversed(tensor.shape))  # ggml order -> torch order
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(shape).astype(np.float32)
        parts = tensor.name.split(".")
        if parts[0] == "blk":
            layer, kind = parts[1], parts[2]
            if kind == "attn_q":
                values = _unpermute(values, n_heads)
            elif kind == "attn_k":
                values = _unpermute(values, n_kv_heads)
            hf_name = f"model.layers.{layer}.{renames[kind]}.weight"
        else:
            hf_name = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}[parts[0]]
            hf_name += ".weight"
        out[hf_name] = torch.from_numpy(values.copy())
    return out


# --- Hugging Face hub cache


def write_fake_hf_cache(cache_root: Path, repo_id: str, model_dir: Path, *, commit: str = "0" * 40) -> Path:
    """Lay `model_dir`'s files out as huggingface_hub caches a download of `repo_id`; return the snapshot.

    `cache_root/models--org--name/{blobs/<file>, snapshots/<commit>/<file> -> ../../blobs/<file>,
    refs/main}`. Blobs are named after the file rather than its hash: the hub only follows links.
    """
    repo_dir = cache_root / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    for file in model_dir.iterdir():
        if file.is_file():
            blob = repo_dir / "blobs" / f"blob-{file.name}"
            shutil.copyfile(file, blob)
            (snapshot / file.name).symlink_to(Path("..", "..", "blobs", blob.name))
    return snapshot
