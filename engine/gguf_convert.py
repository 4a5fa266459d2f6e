"""GGUF files: a fast header reader, and a one-time conversion to a cached safetensors directory.

A *GGUF* is llama.cpp's single-file model format: metadata (architecture, hyper-parameters, the
tokenizer) followed by tensors, usually quantized in blocks. FlowSpec Studio never runs GGUF
weights directly: the first time a GGUF is used, it is *converted*, i.e. dequantized by
transformers and saved as a Hugging Face directory (config.json, *.safetensors, tokenizer files)
in the *conversion cache*. Every later load reads that directory, which takes seconds instead of
the tens of seconds a GGUF load costs.

Cache layout, under `cache_dir` (default `platformdirs.user_cache_dir("flowspec-studio")/models`):

    <stem>-<key>/            a finished conversion; holds `.complete` (JSON, written last)
    <stem>-<key>.lock        flock'ed while a process converts that file
    .tmp-<stem>-<key>-XXXX/  a conversion in progress (or left behind by a killed process)

`<key>` is the first 16 hex digits of the sha256 of `"<resolved path>\\n<size>\\n<mtime_ns>"`.
It is keyed on the file's identity rather than its content because hashing a 1.1 GB GGUF takes
over a second on every load; the content sha256 is computed once, during the conversion, and
recorded in `.complete`. Replacing or touching the file therefore triggers a new conversion.

Atomicity: a conversion writes into a temporary directory next to the final one (same file
system), fsyncs every file, writes `.complete` last, then renames the directory into place. A
directory without `.complete` is never returned; it is removed and rebuilt. Concurrent
conversions of one file serialize on the lock file, and the second process reuses the first
one's result.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import mmap
import os
import re
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
MARKER_FORMAT = 1
# Models smaller than this are stored in float32, so fp32 equivalence tests see exactly the GGUF's
# dequantized values; larger ones in bfloat16, which halves the disk and load cost (the engine
# casts to the run dtype at load time anyway).
FLOAT32_MAX_PARAMS = 200_000_000

_GGUF_MAGIC = b"GGUF"
_GGUF_VERSIONS = (2, 3)
_DEFAULT_ALIGNMENT = 32
# Fixed-width metadata value types: type id -> struct format.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GgufError(ValueError):
    """A GGUF file that cannot be read or converted; the message names the file and the problem."""


@dataclass(frozen=True)
class GgufSummary:
    """What a GGUF header says about its model, read without touching the tensor data."""

    path: Path
    architecture: str  # llama.cpp's name: "llama", "qwen2", ...
    name: str  # general.name, or the file stem
    n_layers: int
    hidden_size: int
    vocab_size: int
    n_params: int  # sum of the tensor element counts
    file_type: str  # "Q4_1", "F16", ... (general.file_type), or "unknown"
    size_bytes: int


def read_gguf_summary(path: Path) -> GgufSummary:
    """Parse the header and tensor table of `path`, and check that every tensor lies inside the file.

    Raises GgufError for a file that is not a GGUF, is truncated, or is otherwise corrupt.
    """
    size = path.stat().st_size
    if size < 24:
        raise GgufError(f"GGUF file {path} is truncated ({size} bytes): download or copy it again")
    with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        if blob[:4] != _GGUF_MAGIC:
            raise GgufError(f"{path} is not a GGUF file (bad magic bytes): pass a .gguf model file")
        try:
            metadata, tensors, data_start = _parse_header(blob, size)
        except (struct.error, UnicodeDecodeError, IndexError, KeyError, OverflowError, ValueError) as error:
            # The parser reads lengths and counts from the file itself: any of these means they lie.
            raise GgufError(f"GGUF file {path} is truncated or corrupt ({error}): download or copy it again") from error
    data_end = max((data_start + offset + nbytes for _, _, offset, nbytes in tensors), default=data_start)
    if data_end > size:
        raise GgufError(
            f"GGUF file {path} is truncated: its tensors need {data_end} bytes, the file has {size}; "
            "download or copy it again"
        )
    return _summarize(path, metadata, tensors, size)


def _parse_header(blob: mmap.mmap, size: int) -> tuple[dict[str, Any], list[tuple[str, int, int, int]], int]:
    """`(metadata, [(name, n_elements, offset, nbytes)], data_start)`; arrays are kept as their length."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    version, tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
    if version not in _GGUF_VERSIONS:
        raise ValueError(f"unsupported GGUF version {version}")
    if tensor_count > size or kv_count > size:
        raise ValueError("tensor or metadata count larger than the file")
    pos, metadata = 24, {}
    for _ in range(kv_count):
        key, pos = _read_string(blob, pos, size)
        (value_type,) = struct.unpack_from("<I", blob, pos)
        metadata[key], pos = _read_value(blob, pos + 4, value_type, size)
    tensors = []
    for _ in range(tensor_count):
        name, pos = _read_string(blob, pos, size)
        (n_dims,) = struct.unpack_from("<I", blob, pos)
        if n_dims > 8:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
        dims = struct.unpack_from(f"<{n_dims}Q", blob, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        n_elements = 1
        for dim in dims:
            n_elements *= dim
        block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
        tensors.append((name, n_elements, offset, n_elements // block_size * type_size))
    alignment = int(metadata.get("general.alignment", _DEFAULT_ALIGNMENT))
    return metadata, tensors, (pos + alignment - 1) // alignment * alignment


def _read_string(blob: mmap.mmap, pos: int, size: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    if pos + 8 + length > size:
        raise ValueError("a string runs past the end of the file")
    return blob[pos + 8 : pos + 8 + length].decode("utf-8"), pos + 8 + length


def _read_value(blob: mmap.mmap, pos: int, value_type: int, size: int) -> tuple[Any, int]:
    """One metadata value and the offset after it. Arrays (vocabularies: 100k+ strings) become their length."""
    if value_type in _SCALAR_FORMATS:
        fmt = _SCALAR_FORMATS[value_type]
        return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
    if value_type == _STRING:
        return _read_string(blob, pos, size)
    if value_type == _ARRAY:
        element_type, count = struct.unpack_from("<IQ", blob, pos)
        pos += 12
        if element_type in _SCALAR_FORMATS:
            return count, pos + count * struct.calcsize(_SCALAR_FORMATS[element_type])
        if element_type != _STRING:
            raise ValueError(f"array of unsupported type {element_type}")
        for _ in range(count):
            (length,) = struct.unpack_from("<Q", blob, pos)
            pos += 8 + length
        if pos > size:
            raise ValueError("a string array runs past the end of the file")
        return count, pos
    raise ValueError(f"metadata value of unknown type {value_type}")


def _summarize(
    path: Path, metadata: dict[str, Any], tensors: list[tuple[str, int, int, int]], size: int
) -> GgufSummary:
    from gguf.constants import LlamaFileType

    arch = str(metadata.get("general.architecture", ""))
    if not arch:
        raise GgufError(f"GGUF file {path} has no general.architecture: it is not a model file")
    vocab_size = metadata.get(f"{arch}.vocab_size") or metadata.get("tokenizer.ggml.tokens") or 0
    file_type = "unknown"
    if "general.file_type" in metadata:
        with contextlib.suppress(ValueError):  # a file type newer than the installed gguf package
            file_type = LlamaFileType(metadata["general.file_type"]).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    return GgufSummary(
        path=path,
        architecture=arch,
        name=str(metadata.get("general.name") or path.stem),
        n_layers=int(metadata.get(f"{arch}.block_count", 0)),
        hidden_size=int(metadata.get(f"{arch}.embedding_length", 0)),
        vocab_size=int(vocab_size),
        n_params=sum(n_elements for _, n_elements, _, _ in tensors),
        file_type=file_type,
        size_bytes=size,
    )


# --- The conversion cache


def conversion_dir(gguf_path: Path, cache_dir: Path) -> Path:
    """Where the conversion of `gguf_path` lives (or will live) in `cache_dir`; pure apart from one stat."""
    resolved = gguf_path.resolve()
    stat = resolved.stat()
    key = hashlib.sha256(f"{resolved}\n{stat.st_size}\n{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", resolved.stem)[:64]
    return cache_dir / f"{stem}-{key}"


def is_complete(directory: Path) -> bool:
    """Whether `directory` is a finished conversion (its `.complete` marker exists)."""
    return (directory / COMPLETE_MARKER).is_file()


def read_marker(directory: Path) -> dict[str, Any]:
    """The `.complete` record of a finished conversion: source, size, mtime_ns, sha256, dtype, name."""
    return json.loads((directory / COMPLETE_MARKER).read_text(encoding="utf-8"))


def cached_conversion(gguf_path: Path, cache_dir: Path, *, progress: bool = True) -> Path:
    """The converted directory for `gguf_path`, converting it first if no finished conversion exists.

    Safe against concurrent callers (they serialize on a lock file) and against a process killed
    mid-way (its temporary directory is removed by the next caller, and nothing half-written is
    ever at the final path).
    """
    final = conversion_dir(gguf_path, cache_dir)
    if is_complete(final):
        logger.debug("Reusing the conversion of %s in %s", gguf_path, final)
        return final
    summary = read_gguf_summary(gguf_path)  # fail fast, before taking the lock or loading transformers
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(final.with_name(final.name + ".lock")):
        if is_complete(final):  # another process finished it while we waited for the lock
            logger.info("Reusing the conversion of %s that another process just finished", gguf_path)
            return final
        if final.exists():
            logger.warning("Removing %s: it has no %s marker, so it is incomplete", final, COMPLETE_MARKER)
            shutil.rmtree(final)
        for stale in cache_dir.glob(f".tmp-{final.name}-*"):  # left by a killed process; we hold the lock
            logger.info("Removing %s, left behind by an interrupted conversion", stale)
            shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=cache_dir))
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the cache from a service running as another user
        try:
            _convert_into(summary, staging, progress=progress)
            os.replace(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        _fsync_path(cache_dir)
    logger.info("Converted %s into %s", gguf_path, final)
    return final


def _convert_into(summary: GgufSummary, staging: Path, *, progress: bool) -> None:
    """Convert into `staging`, fsync everything, and write the marker last."""
    import torch

    dtype = torch.float32 if summary.n_params < FLOAT32_MAX_PARAMS else torch.bfloat16
    dtype_name = str(dtype).removeprefix("torch.")
    logger.info(
        "Converting %s (%s, %.0fM parameters) to %s safetensors; this happens once",
        summary.path, summary.file_type, summary.n_params / 1e6, dtype_name,
    )
    stat = summary.path.stat()  # before converting: the identity the cache key was computed from
    convert_gguf(summary.path, staging, dtype=dtype, progress=progress)
    marker = {
        "format": MARKER_FORMAT,
        "name": summary.path.stem,
        "source": str(summary.path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "sha256": _sha256(summary.path),
        "dtype": dtype_name,
    }
    for file in staging.iterdir():
        _fsync_path(file)
    _write_marker(staging, marker)
    _fsync_path(staging)


def _write_marker(directory: Path, marker: dict[str, Any]) -> None:
    """Write `.complete` durably. Called last: its presence is what makes a directory usable."""
    path = directory / COMPLETE_MARKER
    with open(path, "w", encoding="utf-8") as file:
        json.dump(marker, file, indent=2)
        file.flush()
        os.fsync(file.fileno())


# --- The conversion itself (transformers)


def convert_gguf(gguf_path: Path, out_dir: Path, *, dtype: Any, progress: bool = True) -> None:
    """Dequantize `gguf_path` with transformers and save it as a Hugging Face directory in `out_dir`.

    Not atomic on its own: `cached_conversion` provides that. `dtype` is the torch dtype stored.
    Raises GgufError (naming the file) when transformers cannot read the file.
    """
    import transformers  # before any stderr redirection, so its log handler keeps the real stderr
    from tqdm import tqdm

    parent, filename = str(gguf_path.parent), gguf_path.name
    with tqdm(total=3, desc=f"Converting {filename}", unit="stage", file=sys.stderr, disable=not progress) as bar:
        bar.set_postfix_str("reading GGUF")
        with _quiet_unless(progress), _as_gguf_error(gguf_path):
            tokenizer = transformers.AutoTokenizer.from_pretrained(parent, gguf_file=filename)
        bar.update(1)
        bar.set_postfix_str("dequantizing")
        with _quiet_unless(progress), _as_gguf_error(gguf_path):
            model = transformers.AutoModelForCausalLM.from_pretrained(
                parent,
                gguf_file=filename,
                dtype=dtype,
                quantization_config=transformers.GgufConfig(dequantize=True),
            )
            model = _plain_model(model, dtype)
        bar.update(1)
        bar.set_postfix_str("writing")
        with _quiet_unless(progress):
            model.save_pretrained(out_dir)
            tokenizer.save_pretrained(out_dir)
        bar.update(1)


def _plain_model(model: Any, dtype: Any) -> Any:
    """A serializable copy of a model loaded from GGUF.

    transformers 5.24 loads llama/qwen2/mistral GGUFs through its legacy path, which leaves no
    quantizer attached, so `save_pretrained` works directly. Architectures on its newer GGUF path
    keep `hf_quantizer`, whose `is_serializable()` is False; for those, rebuild the model from its
    config without `quantization_config` and copy the (already dequantized) weights over.
    """
    if getattr(model, "hf_quantizer", None) is None:
        return model
    import transformers

    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict())
    return plain


@contextlib.contextmanager
def _as_gguf_error(gguf_path: Path) -> Iterator[None]:
    """Turn transformers' and gguf's errors on a bad file into a GgufError that names the file.

    Boundary: the header reader already rejected truncated and non-GGUF files, so what reaches
    here is a file whose contents transformers cannot map (an unknown tokenizer, missing keys,
    inconsistent shapes). Those surface as the exception types below; anything else propagates.
    """
    try:
        yield
    except (ValueError, KeyError, IndexError, TypeError, RuntimeError, OSError, struct.error) as error:
        raise GgufError(
            f"transformers cannot load GGUF file {gguf_path} ({type(error).__name__}: {error}); "
            "the file is corrupt or uses a layout this version does not support"
        ) from error


@contextlib.contextmanager
def _quiet_unless(progress: bool) -> Iterator[None]:
    """Silence transformers' own progress bars when `progress` is False.

    transformers' legacy GGUF loader creates `tqdm.auto.tqdm` bars with no switch to disable
    them, and tqdm writes to whatever `sys.stderr` is when a bar is created, so the only way to
    silence them is to point `sys.stderr` elsewhere for the duration. Side effect: anything else
    written to `sys.stderr` by this process meanwhile (warnings) is dropped.
    """
    if progress:
        yield
        return
    import transformers

    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        if was_enabled:
            transformers.utils.logging.enable_progress_bar()


# --- Files


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on `path` (created if needed). POSIX `flock`: the kernel
    releases it when the holder dies, so a killed conversion never leaves a stale lock."""
    import fcntl

    with open(path, "a+b") as file:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(file.fileno(), fcntl.LOCK_UN)


def _fsync_path(path: Path) -> None:
    """fsync a file, or a directory's entries (a rename is durable once its directory is synced)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
