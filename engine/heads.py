"""Draft heads on disk: which target a head was trained for, and where the engine finds heads.

Terms:
- *head directory*: `config.json` (the head's LlamaConfig) and `*.safetensors` (EAGLE-1 keys:
  `fc.*`, `layers.0.*`; an official checkpoint may also hold `embed_tokens.weight`).
- *flowspec metadata*: the `"flowspec"` object that `flowspec distill` adds to config.json. Its
  `target` names the model the head was trained for: name, ref, hidden size, vocabulary size and
  the *target fingerprint*. Official EAGLE-1 checkpoints have none.
- *target fingerprint*: sha256 over a fixed subset of the target's tensors, each cast to bfloat16
  (so fp32, bf16 and fp16 copies of the same weights agree): the token embedding, the final norm,
  the LM head when it is not tied, and every tensor of the last decoder layer, in name order,
  each preceded by its name and shape. It reads about a tenth of a small model and is
  computed only when a head might match (see `pick_head`).
- *head roots*: where heads are looked for, in order: the user's distilled heads
  (`platformdirs.user_data_dir("flowspec-studio")/draft-heads/<name>/`) and the shipped ones
  (`resources/draft-heads/<name>/` in the repository or a frozen build).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from engine.model_adapters import get_adapter
from engine.stage import _tensor_files, model_config, read_tensors

logger = logging.getLogger(__name__)

FINGERPRINT_SCOPE = "sha256 over bf16 bytes of: embedding, final norm, untied LM head, last decoder layer (name order)"


@dataclass(frozen=True)
class HeadEntry:
    path: Path
    source: str  # "user" or "shipped"
    hidden_size: int
    flowspec: dict | None  # None for a head without flowspec metadata (an official EAGLE-1 checkpoint)

    @property
    def target(self) -> dict:
        return (self.flowspec or {}).get("target", {})


def head_config_dict(target_config) -> dict:
    """The head's LlamaConfig as config.json holds it: the target's layer shape, one layer, fc bias."""
    from transformers import LlamaConfig

    head_dim = getattr(target_config, "head_dim", None) or target_config.hidden_size // target_config.num_attention_heads
    config = LlamaConfig(
        hidden_size=target_config.hidden_size, intermediate_size=target_config.intermediate_size,
        num_attention_heads=target_config.num_attention_heads, num_key_value_heads=target_config.num_key_value_heads,
        head_dim=head_dim, num_hidden_layers=1, vocab_size=target_config.vocab_size,
        rms_norm_eps=target_config.rms_norm_eps, rope_parameters=dict(target_config.rope_parameters),
        max_position_embeddings=target_config.max_position_embeddings, hidden_act=target_config.hidden_act,
        tie_word_embeddings=False)
    full = config.to_dict()
    keys = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
            "rope_parameters", "vocab_size", "attention_bias", "mlp_bias", "tie_word_embeddings")
    return {"architectures": ["LlamaForCausalLM"], **{k: full[k] for k in keys}, "bias": True, "dtype": "bfloat16"}


def user_heads_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_data_dir("flowspec-studio")) / "draft-heads"


def shipped_heads_dir() -> Path:
    """`resources/draft-heads` next to the engine package, or inside a PyInstaller bundle."""
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle is not None and (Path(bundle) / "resources" / "draft-heads").is_dir():
        return Path(bundle) / "resources" / "draft-heads"
    return Path(__file__).resolve().parent.parent / "resources" / "draft-heads"


def head_roots() -> list[tuple[str, Path]]:
    return [("user", user_heads_dir()), ("shipped", shipped_heads_dir())]


def read_head_config(path: Path) -> dict:
    """config.json of a head directory (ValueError if missing or not JSON)."""
    cfg_file = Path(path) / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{path} is not a draft head: config.json is missing")
    try:
        return json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{cfg_file} is not valid JSON ({error})") from error


def _fingerprint_names(model_dir: Path) -> list[str]:
    config = model_config(model_dir)
    adapter = get_adapter(config.model_type)
    files = _tensor_files(model_dir)
    names = [adapter.embed_key, adapter.norm_key]
    if adapter.lm_head_key in files and not getattr(config, "tie_word_embeddings", False):
        names.append(adapter.lm_head_key)
    last = adapter.layer_key.format(i=config.num_hidden_layers - 1)
    names.extend(k for k in files if k.startswith(last))
    return sorted(names)


@lru_cache(maxsize=8)
def _fingerprint(model_dir: Path, stamp: tuple) -> str:
    digest = hashlib.sha256(b"flowspec-target-fingerprint-v1\n")
    for name in _fingerprint_names(model_dir):
        tensor = read_tensors(model_dir, [name], torch.bfloat16)[name].contiguous()
        digest.update(f"{name} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def target_fingerprint(model_dir: Path) -> str:
    """The target fingerprint of a Hugging Face model directory (cached per file size and mtime)."""
    model_dir = Path(model_dir).resolve()
    stamp = tuple(sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in model_dir.glob("*.safetensors")))
    return _fingerprint(model_dir, stamp)


def mismatch(head_config: dict, head_path: Path, model_dir: Path) -> str | None:
    """Why the head cannot draft for the target in model_dir, or None when it can.

    Heads without flowspec metadata are checked on hidden size only.
    """
    config = model_config(model_dir)
    target_name = Path(model_dir).name
    hidden = head_config.get("hidden_size")
    if hidden != config.hidden_size:
        return (f"draft head {head_path} has hidden size {hidden} but the target {target_name} has "
                f"{config.hidden_size}: use a head trained for this target (`flowspec distill --model ...`) or --draft lookup")
    meta = head_config.get("flowspec")
    if meta is None:
        return None
    target = meta.get("target", {})
    trained_for = f"{target.get('name', '?')} ({target.get('ref', '?')})"
    if target.get("vocab_size") != config.vocab_size:
        return (f"draft head {head_path} was distilled for {trained_for} with a vocabulary of {target.get('vocab_size')} "
                f"tokens, but the target {target_name} has {config.vocab_size}: distill a head for this model with "
                "`flowspec distill --model REF` or use --draft lookup")
    if target.get("hidden_size") != config.hidden_size:
        return (f"draft head {head_path} was distilled for {trained_for} (hidden size {target.get('hidden_size')}), "
                f"not for {target_name} (hidden size {config.hidden_size}): distill one with `flowspec distill --model REF`")
    if target.get("weights_sha256") != target_fingerprint(model_dir):
        return (f"draft head {head_path} was distilled for {trained_for}, whose weights differ from the target "
                f"{target_name} (weight fingerprint mismatch): distill a head for this model with "
                "`flowspec distill --model REF` or use --draft lookup")
    return None


def find_heads(roots: list[tuple[str, Path]] | None = None) -> list[HeadEntry]:
    """Head directories under the roots (user first, newest first within a root); unreadable ones skipped."""
    entries: list[HeadEntry] = []
    for source, root in roots if roots is not None else head_roots():
        if not root.is_dir():
            continue
        dirs = [d for d in root.iterdir() if (d / "config.json").is_file()]
        for d in sorted(dirs, key=lambda d: ((d / "config.json").stat().st_mtime_ns, d.name), reverse=True):
            try:
                raw = read_head_config(d)
                entries.append(HeadEntry(d, source, int(raw.get("hidden_size", 0)), raw.get("flowspec")))
            except ValueError as error:
                logger.warning("draft head %s skipped: %s", d, error)
    return entries


def pick_head(model_dir: Path, roots: list[tuple[str, Path]] | None = None) -> Path | None:
    """The first head (user heads first) whose flowspec metadata matches the target, else None.

    Heads without metadata are never picked automatically: nothing says which target they are for.
    """
    config = model_config(model_dir)
    for entry in find_heads(roots):
        target = entry.target
        if not target or target.get("hidden_size") != config.hidden_size or target.get("vocab_size") != config.vocab_size:
            continue
        if target.get("weights_sha256") == target_fingerprint(model_dir):
            return entry.path
        logger.debug("draft head %s: same shape as %s but other weights", entry.path, model_dir)
    return None
