"""Per-architecture facts the stage loader needs, as a table instead of isinstance chains.

An adapter names the Hugging Face classes that build one decoder layer, the final norm and the
rotary embedding of a family, and the checkpoint key names of the embedding, the layers, the
final norm and the LM head. Everything else in the engine is architecture-agnostic.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from functools import cached_property
from typing import Any


class UnsupportedArchitecture(ValueError):
    """The model's `model_type` has no adapter."""


@dataclass(frozen=True)
class Adapter:
    """How to build and load the pieces of one architecture family."""

    model_type: str
    module: str  # transformers module holding the classes
    prefix: str  # class-name prefix, e.g. "Llama" -> LlamaDecoderLayer
    embed_key: str = "model.embed_tokens.weight"
    layer_key: str = "model.layers.{i}."
    norm_key: str = "model.norm.weight"
    lm_head_key: str = "lm_head.weight"

    def _cls(self, suffix: str) -> Any:
        return getattr(importlib.import_module(self.module), f"{self.prefix}{suffix}")

    @property
    def decoder_layer(self) -> Any:
        return self._cls("DecoderLayer")

    @property
    def norm(self) -> Any:
        return self._cls("RMSNorm")

    @property
    def rotary(self) -> Any:
        return self._cls("RotaryEmbedding")

    @cached_property
    def cache_kwarg(self) -> str:
        """Name of the decoder layer's KV-cache argument (`cache` in newer 5.x, `past_key_values` before)."""
        params = inspect.signature(self.decoder_layer.forward).parameters
        return "cache" if "cache" in params else "past_key_values"


ADAPTERS: dict[str, Adapter] = {
    "llama": Adapter("llama", "transformers.models.llama.modeling_llama", "Llama"),
    "qwen2": Adapter("qwen2", "transformers.models.qwen2.modeling_qwen2", "Qwen2"),
    "mistral": Adapter("mistral", "transformers.models.mistral.modeling_mistral", "Mistral"),
}


def get_adapter(model_type: str) -> Adapter:
    try:
        return ADAPTERS[model_type]
    except KeyError:
        supported = ", ".join(sorted(ADAPTERS))
        raise UnsupportedArchitecture(
            f"Architecture '{model_type}' is not supported (supported: {supported}); "
            "pick a model of one of these families."
        ) from None
