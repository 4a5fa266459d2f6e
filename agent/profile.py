"""Profile: milliseconds per decoder layer of a model at several token counts, measured here.

The layer is built from the model's config.json with random weights (timing does not depend on
the values), in the requested dtype, and run as a one-layer engine stage with its KV cache, the
way a hosted stage runs. Results are cached in the state directory by (config, dtype, token
counts), so asking again is free; the cache is dropped when the agent's version changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from pathlib import Path

from agent.capabilities import product_version
from engine import wire
from engine.curve_auth import write_private

logger = logging.getLogger(__name__)

MAX_TOKEN_COUNT = 4096
MAX_TOKEN_COUNTS = 8
REPEATS = 3


def profile(msg: wire.Profile, state_dir: Path) -> wire.ProfileResult | wire.CommandFailed:
    try:
        config_dict = json.loads(msg.config_json)
        model_type = config_dict["model_type"]
    except (ValueError, KeyError, TypeError):
        return wire.CommandFailed("Profile needs the model's config.json text (with model_type) in config_json")
    if msg.dtype not in ("bf16", "fp16", "fp32"):
        return wire.CommandFailed(f"Profile dtype {msg.dtype!r} is not one of bf16, fp16, fp32")
    if not msg.token_counts or len(msg.token_counts) > MAX_TOKEN_COUNTS or max(msg.token_counts) > MAX_TOKEN_COUNT:
        return wire.CommandFailed(f"Profile takes 1 to {MAX_TOKEN_COUNTS} token counts of at most {MAX_TOKEN_COUNT}")
    key = hashlib.sha256(json.dumps([product_version(), msg.config_json, msg.dtype, msg.token_counts]).encode()).hexdigest()
    cache_file = state_dir / "profile.json"
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), list):
        return wire.ProfileResult(msg.token_counts, tuple(float(v) for v in cache[key]), cached=True)
    try:
        ms = _measure(model_type, config_dict, msg.dtype, msg.token_counts)
    except (ValueError, TypeError, KeyError) as exc:
        return wire.CommandFailed(f"cannot build a layer from this config: {exc}")
    cache[key] = ms
    write_private(cache_file, json.dumps(cache))
    logger.info("profiled a %s layer in %s: %s ms at %s tokens", model_type, msg.dtype,
                ", ".join(f"{v:.2f}" for v in ms), ", ".join(map(str, msg.token_counts)))
    return wire.ProfileResult(msg.token_counts, tuple(ms), cached=False)


def _measure(model_type: str, config_dict: dict, dtype: str, token_counts: tuple[int, ...]) -> list[float]:
    import torch
    from torch import nn
    from transformers import AutoConfig

    from engine.model_adapters import get_adapter
    from engine.stage import DTYPES, StageModule, StageSpec

    settings = {k: v for k, v in config_dict.items() if k != "model_type"}
    config = AutoConfig.for_model(model_type, **settings)
    config._attn_implementation = "sdpa"
    adapter = get_adapter(model_type)
    torch.manual_seed(0)
    layer = adapter.decoder_layer(config, 0).to(DTYPES[dtype]).eval()
    n_layers = int(config.num_hidden_layers)
    module = StageModule(config, adapter, StageSpec(0, 1, n_layers, first=False, last=False),
                         nn.ModuleList([layer]), None, None)
    results = []
    for count in token_counts:
        x = torch.randn(count, config.hidden_size, dtype=DTYPES[dtype])  # [T, hidden]
        positions = torch.arange(count)  # [T]
        module(x, positions)  # warm-up
        times = []
        for _ in range(REPEATS):
            module.reset()
            t0 = time.perf_counter()
            module(x, positions)
            times.append((time.perf_counter() - t0) * 1000)
        module.reset()
        results.append(statistics.median(times))
    return results
