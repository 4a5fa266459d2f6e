"""Pure rules of the layout editor: what a drop does, what each device must hold, what to suggest.

Qt-free and torch-free. Terms follow engine/layout.py: a *stage* is a half-open layer range on one
device. Layers keep their place in the model; a drop can only change which device runs them, or
where one stage ends and the next begins. Every function returns a new valid value or raises
:class:`engine.layout.LayoutError` with a message for the user.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from app.devices import DeviceInfo, find, format_bytes
from engine.layout import DeviceId, Layout, LayoutError, StageRange, allocate_by_memory, allocate_by_speed

MIME_TYPE = "application/x-flowspec-layout-drag"
"""Custom MIME type of everything dragged in the layout editor: one small JSON object."""

STAGE_RUNTIME_BYTES = 384 * 1024**2
"""Memory a stage process needs besides its weights and KV cache (interpreter, torch, buffers)."""
KV_CONTEXT_TOKENS = 2048
"""Context length the memory estimate reserves KV cache for."""


@dataclass(frozen=True)
class ModelShape:
    """What the layout editor needs to know about a model, read from its config and weight headers."""

    ref: str
    name: str
    n_layers: int
    bytes_per_layer: int  # weights of one decoder layer at the run dtype
    embed_bytes: int  # token embedding (stage 1 holds it)
    kv_bytes_per_layer: int  # KV cache of one layer for KV_CONTEXT_TOKENS tokens
    dtype: str = "bf16"


def shape_from_config(ref: str, name: str, config: dict, n_params: int, dtype: str) -> ModelShape:
    """A ModelShape from a Hugging Face config.json dict and the model's parameter count."""
    text = config.get("text_config", config)
    n_layers = int(text["num_hidden_layers"])
    hidden, vocab = int(text["hidden_size"]), int(text["vocab_size"])
    n_heads = int(text.get("num_attention_heads", 1))
    n_kv_heads = int(text.get("num_key_value_heads", n_heads))
    head_dim = int(text.get("head_dim") or hidden // n_heads)
    element = 4 if dtype == "fp32" else 2
    embed = vocab * hidden
    outside_layers = embed * (1 if text.get("tie_word_embeddings", False) else 2) + hidden
    per_layer = max(1, (n_params - outside_layers) // n_layers)
    kv = 2 * n_kv_heads * head_dim * KV_CONTEXT_TOKENS * element
    return ModelShape(ref, name, n_layers, per_layer * element, embed * element, kv, dtype)


def stage_bytes(shape: ModelShape, stage: StageRange) -> int:
    """Estimated memory of one stage: its layers, their KV cache, the runtime, and the embedding on stage 1."""
    n = stage.end - stage.start
    embed = shape.embed_bytes if stage.start == 0 else 0
    return n * (shape.bytes_per_layer + shape.kv_bytes_per_layer) + embed + STAGE_RUNTIME_BYTES


def device_needs(layout: Layout, shape: ModelShape) -> dict[str, int]:
    """Estimated bytes each device of ``layout`` must hold (all its stages together)."""
    needs: dict[str, int] = {}
    for stage in layout.stages:
        needs[stage.device_id] = needs.get(stage.device_id, 0) + stage_bytes(shape, stage)
    return needs


def check_devices(layout: Layout, shape: ModelShape, devices: Sequence[DeviceInfo]) -> None:
    """Raise LayoutError if a stage is on an unknown, lost or unpaired device, or one that lacks memory."""
    for device_id, need in device_needs(layout, shape).items():
        device = find(devices, device_id)
        if device is None:
            raise LayoutError(f"Device {device_id} is not in the device list: add it or choose another device.")
        if device.state == "unpaired":
            raise LayoutError(f"{device.name} is not paired: pair it with its code before giving it layers.")
        if not device.usable:
            raise LayoutError(f"{device.name} is offline ({device.state}): choose a device that is online.")
        if need > device.memory_free:
            raise LayoutError(
                f"{device.name} lacks memory: these layers need about {format_bytes(need)} but it has "
                f"{format_bytes(device.memory_free)} free. Give it fewer layers or free memory on it."
            )


def place_range(layout: Layout, start: int, end: int, device_id: DeviceId, at: int) -> Layout:
    """Layers ``[start, end)`` dropped on ``device_id`` with their first layer at column ``at``.

    Layers keep their place in the model, so only ``at == start`` can succeed: any other column
    would leave a gap where the layers were and an overlap where they land, and the resulting
    LayoutError says so. Neighbouring stages on the same device are merged into one.
    """
    if not 0 <= start < end <= layout.n_layers:
        raise LayoutError(f"Layers [{start}, {end}) are not layers of this model (0 to {layout.n_layers - 1}).")
    n = end - start
    pieces: list[StageRange] = []
    for stage in layout.stages:  # what the other stages keep after giving up [start, end)
        if stage.start < start:
            pieces.append(StageRange(stage.device_id, stage.start, min(stage.end, start)))
        if stage.end > end:
            pieces.append(StageRange(stage.device_id, max(stage.start, end), stage.end))
    pieces.append(StageRange(device_id, at, at + n))
    pieces.sort(key=lambda s: (s.start, s.end))
    try:
        candidate = Layout(layout.n_layers, tuple(_merge_neighbours(pieces)), layout.model)
    except LayoutError as error:
        raise LayoutError(f"{error} Layers keep their place in the model: drop them in the same columns.") from None
    return candidate


def _merge_neighbours(stages: list[StageRange]) -> list[StageRange]:
    merged: list[StageRange] = []
    for stage in stages:
        last = merged[-1] if merged else None
        if last is not None and last.device_id == stage.device_id and last.end == stage.start:
            merged[-1] = StageRange(last.device_id, last.start, stage.end)
        else:
            merged.append(stage)
    return merged


def encode_drag(payload: dict) -> bytes:
    """A drag payload (``{"kind": "range", ...}`` or ``{"kind": "boundary", ...}``) as MIME bytes."""
    return json.dumps(payload, sort_keys=True).encode("utf-8")


def decode_drag(data: bytes) -> dict:
    """Parse MIME bytes from :func:`encode_drag`; anything else is a LayoutError."""
    try:
        payload = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise LayoutError("That drop is not a layer range or a stage boundary.") from None
    kind = payload.get("kind") if isinstance(payload, dict) else None
    fields = {"range": ("start", "end"), "boundary": ("stage",)}.get(kind)
    if fields is None or not all(isinstance(payload.get(f), int) for f in fields):
        raise LayoutError("That drop is not a layer range or a stage boundary.")
    return payload


def apply_drop(layout: Layout, payload: dict, device_id: DeviceId | None, column: int,
               shape: ModelShape, devices: Sequence[DeviceInfo]) -> Layout:
    """The layout after dropping ``payload`` on lane ``device_id`` at layer ``column``, checked against devices."""
    if payload["kind"] == "boundary":
        new = layout.move_boundary(payload["stage"], column)
    else:
        if device_id is None:
            raise LayoutError("Drop the layers on a device's lane.")
        new = place_range(layout, payload["start"], payload["end"], device_id, column)
    check_devices(new, shape, devices)
    return new


@dataclass(frozen=True)
class Suggestion:
    layout: Layout
    reason: str  # for people: how it was split, which device limits, expected stage times


def suggest(shape: ModelShape, devices: Sequence[DeviceInfo]) -> Suggestion:
    """A layout over the usable devices, by measured speed when every one was measured, else by memory."""
    usable = [d for d in devices if d.usable]
    if not usable:
        raise LayoutError("No device is online: start an agent or add one by host:port.")
    usable = usable[: shape.n_layers]
    per_layer = shape.bytes_per_layer + shape.kv_bytes_per_layer
    capacity = [max(0, (d.memory_free - STAGE_RUNTIME_BYTES - shape.embed_bytes) // per_layer) for d in usable]
    if all(d.ms_per_layer for d in usable):
        layout = allocate_by_speed(
            shape.n_layers, [(d.device_id, float(d.ms_per_layer), int(c)) for d, c in zip(usable, capacity)], shape.ref)
        times = [(d, n * d.ms_per_layer) for d, n in zip(usable, layout.layer_counts)]
        slowest = max(times, key=lambda item: item[1])
        detail = ", ".join(f"{d.name} {n} layers ≈ {t:.1f} ms" for (d, t), n in zip(times, layout.layer_counts))
        reason = (f"Balanced by measured speed: each stage's time per segment is close to the others "
                  f"({detail}). {slowest[0].name} limits the pipeline at about {slowest[1]:.1f} ms per segment.")
    else:
        layout = allocate_by_memory(
            shape.n_layers, [(d.device_id, d.memory_free) for d in usable], per_layer, STAGE_RUNTIME_BYTES, shape.ref)
        fullest = max(zip(usable, layout.layer_counts), key=lambda item: item[1] * per_layer / max(1, item[0].memory_free))
        detail = ", ".join(f"{d.name} {n} layers" for d, n in zip(usable, layout.layer_counts))
        reason = (f"Split by free memory because not every device has a measured speed yet ({detail}). "
                  f"{fullest[0].name} is the fullest. Run a prompt, then Suggest again to balance by speed.")
    check_devices(layout, shape, devices)
    return Suggestion(layout, reason)
