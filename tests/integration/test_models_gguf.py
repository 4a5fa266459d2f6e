"""GGUF references: converted once into the cache, atomically, and faithful to the GGUF.

Tiny seeded GGUFs written in code (tests/tiny_models.py); subprocesses for the kill and
concurrency tests. A tiny conversion takes ~0.1 s, a child process ~3 s (imports).
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import gguf_convert
from engine.models import ModelError, list_models, model_info, resolve_model
from tests.tiny_models import gguf_reference_state_dict, make_tiny_gguf, make_tiny_model, make_tiny_tokenizer

pytestmark = pytest.mark.integration

PROMPT = "The capital of Germany is Berlin. hello world"

# Runs resolve_model in a child process. With a signal path, the child stops right before the
# `.complete` marker would be written (every other file is written and fsynced by then), touches
# the signal file and sleeps `stall_s`: the parent then kills it, or lets it finish.
_CHILD = textwrap.dedent(
    """
    import logging, sys, time
    from pathlib import Path
    from engine import gguf_convert
    from engine.models import resolve_model

    gguf_path, cache_dir, signal_path, stall_s = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    if signal_path:
        write_marker = gguf_convert._write_marker

        def stalled_write_marker(directory, marker):
            Path(signal_path).touch()
            time.sleep(stall_s)
            write_marker(directory, marker)

        gguf_convert._write_marker = stalled_write_marker
    print(resolve_model(gguf_path, cache_dir=Path(cache_dir), progress=False).path)
    """
)


def _start_child(gguf_path: Path, cache_dir: Path, signal_path: Path | None = None, stall_s: float = 0.0):
    args = [sys.executable, "-c", _CHILD, str(gguf_path), str(cache_dir), str(signal_path or ""), str(stall_s)]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_child_env())


def _child_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _wait_for(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


def _file_identities(directory: Path) -> dict[str, tuple[int, int, int]]:
    return {f.name: (f.stat().st_ino, f.stat().st_mtime_ns, f.stat().st_size) for f in directory.iterdir()}


def _logits(model_or_dir, ids: torch.Tensor, **gguf_kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_or_dir, dtype=torch.float32, **gguf_kwargs).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "conversions"


@pytest.fixture(scope="module")
def q8_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_gguf(tmp_path_factory.mktemp("gguf"), tensor_type="q8_0", name="tiny-q8")


def test_gguf_is_converted_once_then_reused(q8_gguf: Path, cache_dir: Path) -> None:
    first = resolve_model(str(q8_gguf), cache_dir=cache_dir, progress=False)
    assert (first.source, first.name) == ("gguf", "tiny-q8")
    assert first.path.parent == cache_dir and first.path.name.startswith("tiny-q8-")
    marker = gguf_convert.read_marker(first.path)
    assert marker["sha256"] == hashlib.sha256(q8_gguf.read_bytes()).hexdigest()
    assert (marker["dtype"], marker["source"]) == ("float32", str(q8_gguf.resolve()))
    assert not list(cache_dir.glob(".tmp-*"))
    before = _file_identities(first.path)

    second = resolve_model(str(q8_gguf), cache_dir=cache_dir, progress=False)

    assert second == first
    assert _file_identities(second.path) == before  # nothing rewritten: same inodes, mtimes, sizes


def test_reuse_does_not_read_the_gguf(tmp_path: Path, cache_dir: Path) -> None:
    path = make_tiny_gguf(tmp_path, tensor_type="f16")
    converted = resolve_model(str(path), cache_dir=cache_dir, progress=False).path
    stat = path.stat()
    path.write_bytes(b"\0" * stat.st_size)  # same size; contents no longer a GGUF
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # same mtime: the cache key is unchanged
    assert resolve_model(str(path), cache_dir=cache_dir, progress=False).path == converted


@pytest.mark.parametrize("tensor_type", ["f32", "f16", "q8_0"])
def test_converted_tensors_equal_the_dequantized_gguf(tmp_path: Path, cache_dir: Path, tensor_type: str) -> None:
    path = make_tiny_gguf(tmp_path, tensor_type=tensor_type)
    converted = load_file(resolve_model(str(path), cache_dir=cache_dir, progress=False).path / "model.safetensors")
    reference = gguf_reference_state_dict(path)
    assert converted.keys() == reference.keys()
    for name, tensor in reference.items():
        torch.testing.assert_close(converted[name], tensor, rtol=0, atol=0, msg=name)
    if tensor_type == "f32":  # lossless storage: the very weights the GGUF was written from
        original = make_tiny_model("llama", n_layers=2).state_dict()
        for name, tensor in converted.items():
            assert torch.equal(tensor, original[name]), name


@pytest.mark.parametrize("tie_embeddings", [False, True], ids=["untied", "tied"])
def test_converted_logits_equal_the_gguf_models(tmp_path: Path, cache_dir: Path, tie_embeddings: bool) -> None:
    path = make_tiny_gguf(tmp_path, tensor_type="q8_0", tie_embeddings=tie_embeddings)
    resolved = resolve_model(str(path), cache_dir=cache_dir, progress=False)
    ids = torch.tensor([make_tiny_tokenizer()(PROMPT).input_ids])

    from_dir = _logits(resolved.path, ids)
    from_gguf = _logits(path.parent, ids, gguf_file=path.name)

    assert torch.equal(from_dir, from_gguf)
    assert ("lm_head.weight" in load_file(resolved.path / "model.safetensors")) is not tie_embeddings


def test_converted_tokenizer_matches_the_gguf_and_keeps_the_chat_template(q8_gguf: Path, cache_dir: Path) -> None:
    from transformers import AutoTokenizer

    resolved = resolve_model(str(q8_gguf), cache_dir=cache_dir, progress=False)
    converted = AutoTokenizer.from_pretrained(resolved.path)
    from_gguf = AutoTokenizer.from_pretrained(q8_gguf.parent, gguf_file=q8_gguf.name)
    text = PROMPT + " <|im_end|> 123"
    assert converted(text).input_ids == from_gguf(text).input_ids == make_tiny_tokenizer()(text).input_ids
    chat = [{"role": "user", "content": "hi"}]
    assert converted.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_model_info_and_list_models_after_conversion(q8_gguf: Path, cache_dir: Path, tmp_path: Path) -> None:
    resolved = resolve_model(str(q8_gguf), cache_dir=cache_dir, progress=False)
    info = model_info(resolved)
    assert (info.arch, info.n_layers, info.hidden_size, info.dtype) == ("llama", 2, 64, "float32")
    assert info.n_params == sum(p.numel() for p in make_tiny_model("llama", n_layers=2).parameters())

    listed = [i for i in list_models(cache_dir, hf_cache_dir=tmp_path / "empty-hub") if i.source == "gguf"]

    assert listed == [info]  # ref: the .gguf path, which resolves back to the same directory


def test_incomplete_directory_is_removed_and_rebuilt(q8_gguf: Path, cache_dir: Path) -> None:
    final = gguf_convert.conversion_dir(q8_gguf, cache_dir)
    final.mkdir(parents=True)
    (final / "config.json").write_text("{half written")

    resolved = resolve_model(str(q8_gguf), cache_dir=cache_dir, progress=False)

    assert resolved.path == final and gguf_convert.is_complete(final)
    assert (final / "model.safetensors").is_file()


def test_progress_goes_to_stderr_only_when_asked(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = make_tiny_gguf(tmp_path)
    resolve_model(str(path), cache_dir=tmp_path / "quiet", progress=False)
    quiet = capfd.readouterr()
    resolve_model(str(path), cache_dir=tmp_path / "loud", progress=True)
    loud = capfd.readouterr()
    assert "Converting" not in quiet.err and "it/s" not in quiet.err and quiet.out == ""
    assert "Converting tiny-llama.gguf" in loud.err and "writing" in loud.err and loud.out == ""


def test_gguf_transformers_cannot_read_gives_model_error(tmp_path: Path, cache_dir: Path) -> None:
    import gguf
    import numpy as np

    path = tmp_path / "no-tokenizer.gguf"  # a valid GGUF container, but no tokenizer metadata
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("llama.block_count", 1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match=r"transformers cannot load GGUF file .*no-tokenizer\.gguf"):
        resolve_model(str(path), cache_dir=cache_dir, progress=False)
    assert not [p for p in cache_dir.iterdir() if p.is_dir()]  # the staging directory was cleaned up


@pytest.mark.parametrize("kill_at", ["staging-created", "before-marker"])
def test_killed_conversion_never_leaves_a_usable_half_directory(
    q8_gguf: Path, cache_dir: Path, tmp_path: Path, kill_at: str
) -> None:
    final = gguf_convert.conversion_dir(q8_gguf, cache_dir)
    signal_path = tmp_path / "stalled"
    child = _start_child(q8_gguf, cache_dir, signal_path, stall_s=600)
    try:
        if kill_at == "staging-created":
            _wait_for(lambda: cache_dir.is_dir() and any(cache_dir.glob(".tmp-*")))
        else:
            _wait_for(signal_path.exists)
            staging = next(cache_dir.glob(".tmp-*"))
            assert (staging / "model.safetensors").is_file() and not gguf_convert.is_complete(staging)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.communicate()
    assert child.returncode == -signal.SIGKILL
    assert not final.exists()  # nothing is ever at the final path before it is complete

    resolved = resolve_model(str(q8_gguf), cache_dir=cache_dir, progress=False)

    assert resolved.path == final and gguf_convert.is_complete(final)
    assert not list(cache_dir.glob(".tmp-*"))  # the killed child's staging directory was removed
    ids = torch.tensor([make_tiny_tokenizer()(PROMPT).input_ids])
    assert torch.equal(_logits(final, ids), _logits(q8_gguf.parent, ids, gguf_file=q8_gguf.name))


def test_concurrent_conversions_of_one_file_convert_it_once(q8_gguf: Path, cache_dir: Path, tmp_path: Path) -> None:
    signal_path = tmp_path / "first-converting"
    first = _start_child(q8_gguf, cache_dir, signal_path, stall_s=2.0)  # holds the lock for 2 s more
    _wait_for(signal_path.exists)
    second = _start_child(q8_gguf, cache_dir)
    out_first, err_first = first.communicate(timeout=120)
    out_second, err_second = second.communicate(timeout=120)

    assert (first.returncode, second.returncode) == (0, 0), err_first + err_second
    assert out_first.strip() == out_second.strip() == str(gguf_convert.conversion_dir(q8_gguf, cache_dir))
    assert (err_first + err_second).count("Converting ") == 1
    assert "another process just finished" in err_second
    assert gguf_convert.is_complete(Path(out_first.strip()))
    assert not list(cache_dir.glob(".tmp-*"))
