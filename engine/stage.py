"""One pipeline stage: decoder layers [start, end) of a target model with a tree-aware KV cache.

Terms (shared with engine/tree.py and engine/coordinator.py):
- *prefix*: the committed tokens of the request; their K/V sit at cache slots [0, prefix_len).
- *draft region*: cache slots [prefix_len, length) hold draft tree nodes in the coordinator's index
  order; slot prefix_len + i holds draft index i.
- *segment*: a contiguous run of draft indices [start, start + T) sent through the ring; its tree
  mask row i says which draft indices [0, start + T) node start + i may attend to. The prefix is
  always visible.
- *prune*: keep a list of draft indices; the first `n_accepted` of them join the prefix, the rest
  become the new draft region, compacted in order.

Only the tensors of the stage's own layer range are read from disk (plus the embedding on the
first stage and the final norm on the last).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors import safe_open
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface, AutoConfig

from engine.model_adapters import Adapter, get_adapter
from engine.packed_linear import PackedLinear, Projection, pack_linears

logger = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
_GROW = 256  # cache slots added when the cache is full


class StageError(ValueError):
    """A stage was asked for something impossible (bad range, inconsistent cache)."""


ATTENTION = "flowspec_sdpa"


def _gqa_sdpa(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, **kwargs):
    """Hugging Face's "sdpa" attention, except that grouped-query K/V are not copied out per query
    head for every layer (torch's `enable_gqa`): bit-identical results, 5-10% less time for a
    32-node segment after a 300-600-token prefix on CPU. Returns ([B, T, heads, D], None)."""
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
                                         is_causal=attention_mask is None and query.shape[2] > 1, enable_gqa=True)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, _gqa_sdpa)


class KVCache:
    """Preallocated K/V for the layers of one stage; all layers share one length.

    Implements the single method the Hugging Face attention modules call, `update`.
    """

    def __init__(self, layer_ids: Sequence[int], n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
        self._slot = {layer: i for i, layer in enumerate(layer_ids)}
        self._shape = (len(layer_ids), 1, n_kv_heads, 0, head_dim)
        self._dtype = dtype
        self.keys = torch.empty(self._shape, dtype=dtype)  # [L, 1, H, cap, D]
        self.values = torch.empty(self._shape, dtype=dtype)
        self.length = 0  # committed + draft slots in use
        self._pending = 0  # tokens being written by the forward in progress

    @property
    def capacity(self) -> int:
        return self.keys.shape[3]

    def reserve(self, n_new: int) -> None:
        need = self.length + n_new
        if need <= self.capacity:
            return
        cap = max(need, self.capacity * 2, _GROW)
        shape = list(self._shape)
        shape[3] = cap
        keys, values = torch.empty(shape, dtype=self._dtype), torch.empty(shape, dtype=self._dtype)
        keys[:, :, :, : self.length] = self.keys[:, :, :, : self.length]
        values[:, :, :, : self.length] = self.values[:, :, :, : self.length]
        self.keys, self.values = keys, values

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write [1, H, T, D] new keys/values after the current length; return all of them."""
        i, t = self._slot[layer_idx], key.shape[2]
        end = self.length + t
        self._pending = t
        self.keys[i, :, :, self.length : end] = key
        self.values[i, :, :, self.length : end] = value
        return self.keys[i, :, :, :end], self.values[i, :, :, :end]

    def commit_write(self) -> None:
        self.length += self._pending
        self._pending = 0

    @torch.inference_mode()
    def keep(self, start: int, indices: Sequence[int]) -> None:
        """Compact: slots start + indices[j] move to start + j; the length becomes start + len(indices)."""
        idx = torch.as_tensor(list(indices), dtype=torch.long) + start
        if len(idx) and int(idx.max()) >= self.length:
            raise StageError(f"prune index {int(idx.max()) - start} is past the cache ({self.length - start} draft slots)")
        m = len(idx)
        if m:
            self.keys[:, :, :, start : start + m] = self.keys[:, :, :, idx]
            self.values[:, :, :, start : start + m] = self.values[:, :, :, idx]
        self.length = start + m

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)


def attention_mask(t: int, past: int, prefix_len: int | None, tree_mask: torch.Tensor | None) -> torch.Tensor:
    """Boolean attention mask [1, 1, T, past + T] for T new tokens after `past` cached ones.

    Without a tree mask the new tokens are causal over everything. With one ([T, E] over the draft
    region), the prefix [0, prefix_len) is fully visible and the draft region follows the tree.
    """
    if tree_mask is None:
        cols = torch.arange(past + t)
        rows = torch.arange(t).unsqueeze(1) + past
        return (cols <= rows)[None, None]
    e = tree_mask.shape[1]
    if prefix_len is None or prefix_len + e != past + t:
        raise StageError(
            f"segment does not fit the cache: prefix {prefix_len} + mask width {e} != cache {past} + {t} new"
        )
    mask = torch.ones(t, past + t, dtype=torch.bool)
    mask[:, prefix_len:] = tree_mask
    return mask[None, None]


@dataclass(frozen=True)
class StageSpec:
    start: int
    end: int
    n_layers: int
    first: bool
    last: bool


class StageModule(nn.Module):
    """Layers [start, end) of a target, optionally with its embedding (first) and final norm (last)."""

    def __init__(self, config, adapter: Adapter, spec: StageSpec, layers: nn.ModuleList,
                 embed: nn.Embedding | None, norm: nn.Module | None) -> None:
        super().__init__()
        self.config, self.adapter, self.spec = config, adapter, spec
        self.layers, self.embed, self.norm = layers, embed, norm
        self.rotary = adapter.rotary(config=config)
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        dtype = next(layers.parameters()).dtype
        self.cache = KVCache(range(spec.start, spec.end), config.num_key_value_heads, head_dim, dtype)
        self.dtype = dtype

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, positions: torch.Tensor, prefix_len: int | None = None,
                tree_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the stage on T new tokens and append their K/V to the cache.

        x: [T] token ids (first stage) or [T, hidden] hidden states.
        positions: [T] absolute RoPE positions.
        tree_mask: [T, E] bool over draft indices [0, E); None means causal over the whole cache.
        Returns [T, hidden] (post final norm on the last stage).
        """
        t = positions.shape[0]
        past = self.cache.length
        mask = attention_mask(t, past, prefix_len, tree_mask)  # [1, 1, T, past + T]
        hidden = self.embed(x) if self.spec.first else x.to(self.dtype)
        hidden = hidden.unsqueeze(0)  # [1, T, hidden]
        cos_sin = self.rotary(hidden, positions.unsqueeze(0))
        self.cache.reserve(t)
        kwargs = {self.adapter.cache_kwarg: self.cache, "position_embeddings": cos_sin, "attention_mask": mask}
        for layer in self.layers:
            hidden = layer(hidden, **kwargs)
        self.cache.commit_write()
        if self.spec.last:
            hidden = self.norm(hidden)
        return hidden[0]

    def reset(self) -> None:
        self.cache.length = 0

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters()) + sum(
            m.n_params for m in self.modules() if isinstance(m, PackedLinear))


def _read_config(path: Path):
    config = AutoConfig.from_pretrained(path)
    config._attn_implementation = ATTENTION
    return config


def _tensor_files(path: Path) -> dict[str, Path]:
    """Map each checkpoint key to the safetensors file holding it (single file or sharded index)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: path / f for k, f in weight_map.items()}
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise StageError(f"{path} has no .safetensors weights")
    mapping: dict[str, Path] = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            mapping.update({k: f for k in sf.keys()})
    return mapping


def read_tensors(path: Path, wanted: Sequence[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read exactly the named tensors, file by file, cast to dtype."""
    files = _tensor_files(path)
    missing = [k for k in wanted if k not in files]
    if missing:
        raise StageError(f"{path} lacks tensors {missing[:3]}{'...' if len(missing) > 3 else ''}")
    by_file: dict[Path, list[str]] = {}
    for k in wanted:
        by_file.setdefault(files[k], []).append(k)
    out = {}
    for f, keys in by_file.items():
        with safe_open(f, framework="pt") as sf:
            for k in keys:
                out[k] = sf.get_tensor(k).to(dtype)
    return out


def _model_dir(ref: str | Path) -> Path:
    path = Path(ref)
    if path.is_dir() and (path / "config.json").exists():
        return path
    from engine.models import resolve_model

    return Path(resolve_model(str(ref)).path)


def load_stage(ref: str | Path, start: int, end: int, dtype: str = "bf16") -> StageModule:
    """Build layers [start, end) of `ref` reading only their tensors (plus embedding / final norm)."""
    t0 = time.perf_counter()
    path = _model_dir(ref)
    config = _read_config(path)
    adapter = get_adapter(config.model_type)
    n = config.num_hidden_layers
    if not (0 <= start < end <= n):
        raise StageError(
            f"layer range [{start}, {end}) is empty or outside [0, {n}): this model has {n} layers"
        )
    spec = StageSpec(start, end, n, first=start == 0, last=end == n)
    torch_dtype = DTYPES[dtype]
    with torch.device("meta"):
        layers = nn.ModuleList(adapter.decoder_layer(config, i) for i in range(start, end))
        embed = nn.Embedding(config.vocab_size, config.hidden_size) if spec.first else None
        norm = adapter.norm(config.hidden_size, eps=config.rms_norm_eps) if spec.last else None
    state: dict[str, torch.Tensor] = {}
    for j, i in enumerate(range(start, end)):
        prefix = adapter.layer_key.format(i=i)
        names = [prefix + k for k in layers[j].state_dict()]
        for k, v in read_tensors(path, names, torch_dtype).items():
            state[f"layers.{j}.{k[len(prefix):]}"] = v
    if embed is not None:
        state["embed.weight"] = read_tensors(path, [adapter.embed_key], torch_dtype)[adapter.embed_key]
    if norm is not None:
        state["norm.weight"] = read_tensors(path, [adapter.norm_key], torch_dtype)[adapter.norm_key]
    holder = nn.Module()
    holder.layers, holder.embed, holder.norm = layers, embed, norm
    holder.load_state_dict(state, strict=True, assign=True)
    module = StageModule(config, adapter, spec, layers, embed, norm).eval()
    del state, holder
    pack_linears(module.layers)  # bf16 on CPU: weights in oneDNN's layout once, not per call
    logger.info("loaded layers [%d, %d) of %s in %.2f s", start, end, path, time.perf_counter() - t0)
    return module


class Head(nn.Module):
    """What the coordinator holds of the target: the LM head and the token embedding (for drafters)."""

    def __init__(self, lm_head: torch.Tensor, embed: torch.Tensor, config) -> None:
        super().__init__()
        self.config = config
        self.lm_head = nn.Parameter(lm_head, requires_grad=False)  # [V, hidden]
        self.embed = nn.Parameter(embed, requires_grad=False)  # [V, hidden]
        self._projection: Projection | None = None

    @property
    def projection(self) -> Projection:
        """The LM head as a Projection (packed in bf16 on CPU: 32 rows of SmolLM2's 49,152 took
        2.4 ms, not 3.5), made at first use: training never needs it."""
        if self._projection is None:
            self._projection = Projection(self.lm_head)
        return self._projection

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, hidden] post-norm features -> [T, V] float32 logits (`linear`, as the target's own
        nn.Linear head computes them; also 17% faster on CPU than a matmul with the transpose)."""
        return self.projection(hidden).float()


def load_head(ref: str | Path, dtype: str = "bf16") -> Head:
    path = _model_dir(ref)
    config = _read_config(path)
    adapter = get_adapter(config.model_type)
    torch_dtype = DTYPES[dtype]
    embed = read_tensors(path, [adapter.embed_key], torch_dtype)[adapter.embed_key]
    files = _tensor_files(path)
    if adapter.lm_head_key in files and not getattr(config, "tie_word_embeddings", False):
        lm_head = read_tensors(path, [adapter.lm_head_key], torch_dtype)[adapter.lm_head_key]
    else:
        lm_head = embed
    return Head(lm_head, embed, config).eval()


def model_config(ref: str | Path):
    """The target's Hugging Face config (reads config.json only)."""
    return _read_config(_model_dir(ref))
