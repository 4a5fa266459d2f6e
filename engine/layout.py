"""Which device runs which decoder layers: the pipeline layout, validated in one place.

Terms used in this module:

- *layer*: one decoder layer of the target model, numbered from 0 as in the model's weight file.
  A model has ``n_layers`` of them.
- *stage*: a contiguous, half-open range ``[start, end)`` of layers run by one device. Stage
  ``i + 1`` starts exactly where stage ``i`` ends. Code indexes stages from 0; messages meant for
  people number them from 1 ("stage 1" is ``stages[0]``), as the layout editor does.
- *device id*: the agent id or ``host:port`` of the device that runs a stage (``"local"`` for the
  coordinator's own machine). One device may host several stages.
- *capacity*: how many whole layers fit in a device's memory.
- *layout file*: the TOML form of a :class:`Layout` (see :meth:`Layout.to_text`).

Pure and stdlib-only: importing this module never loads torch (the app imports it on the GUI
thread). Every way to build or change a :class:`Layout` returns a new valid value or raises
:class:`LayoutError` with a message that says what is wrong and what to do.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NewType

DeviceId = NewType("DeviceId", str)

DEFAULT_RESERVE_BYTES = 512 * 1024**2
"""Memory :func:`allocate_by_memory` keeps free on each device for KV cache, activations and runtime."""


class LayoutError(ValueError):
    """A layout is invalid or cannot be built; the message is written for the user."""


@dataclass(frozen=True, slots=True)
class StageRange:
    """Layers ``[start, end)`` of the model, run by ``device_id``; ``end`` is exclusive."""

    device_id: DeviceId
    start: int
    end: int

    @property
    def n_layers(self) -> int:
        """How many layers this stage runs."""
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class Layout:
    """A model of ``n_layers`` layers cut into stages that cover ``[0, n_layers)`` exactly once.

    ``stages`` are in pipeline order: stage 1 also holds the embedding, the last stage the final
    norm. ``model`` optionally names the model reference the layout was made for.
    """

    n_layers: int
    stages: tuple[StageRange, ...]
    model: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.stages, Sequence):
            raise LayoutError(f"stages must be a sequence of StageRange, not {type(self.stages).__name__}.")
        object.__setattr__(self, "stages", tuple(self.stages))
        if self.model is not None and not isinstance(self.model, str):
            raise LayoutError(f"model must be a model reference string or None, not {self.model!r}.")
        _check_stage_count(self.n_layers, len(self.stages))
        for number, stage in enumerate(self.stages, start=1):
            _check_stage(number, stage)
        _check_tiling(self.n_layers, self.stages)

    @property
    def layer_counts(self) -> tuple[int, ...]:
        """Layers per stage, in stage order."""
        return tuple(stage.n_layers for stage in self.stages)

    def move_boundary(self, i: int, new_end: int) -> Layout:
        """Make stage ``i`` (0-based) end, and stage ``i + 1`` start, at layer ``new_end``.

        Both stages must keep at least one layer; the last stage always ends at ``n_layers``.
        """
        self._check_index(i)
        if len(self.stages) == 1:
            raise LayoutError("There is only one stage, so there is no boundary to move: add a device first.")
        if i == len(self.stages) - 1:
            raise LayoutError(
                f"Stage {i + 1} is the last stage: it always ends with the model's last layer "
                f"({self.n_layers - 1}). Move the boundary between stage {i} and stage {i + 1} instead."
            )
        left, right = self.stages[i], self.stages[i + 1]
        if not _is_int(new_end) or not left.start < new_end < right.end:
            raise LayoutError(
                f"Cannot move the boundary between stage {i + 1} and stage {i + 2} to layer {new_end!r}: "
                f"each stage needs at least one layer. Choose a layer from {left.start + 1} to {right.end - 1}."
            )
        stages = list(self.stages)
        stages[i] = replace(left, end=new_end)
        stages[i + 1] = replace(right, start=new_end)
        return replace(self, stages=tuple(stages))

    def assign(self, i: int, device_id: DeviceId) -> Layout:
        """Run stage ``i`` (0-based) on ``device_id``; its layers stay the same."""
        self._check_index(i)
        stages = list(self.stages)
        stages[i] = replace(stages[i], device_id=device_id)
        return replace(self, stages=tuple(stages))

    def _check_index(self, i: int) -> None:
        if not _is_int(i) or not 0 <= i < len(self.stages):
            shown = i + 1 if _is_int(i) else repr(i)
            raise LayoutError(f"There is no stage {shown}: this layout has stages 1 to {len(self.stages)}.")

    @classmethod
    def split_even(cls, n_layers: int, device_ids: Sequence[DeviceId], model: str | None = None) -> Layout:
        """One stage per device, in order, with sizes that differ by at most one layer.

        When the layers do not divide evenly the *earlier* stages get one extra layer (as
        ``numpy.array_split`` does): 10 layers on 3 devices gives 4, 3, 3.
        """
        _check_stage_count(n_layers, len(device_ids))
        base, extra = divmod(n_layers, len(device_ids))
        counts = [base + (k < extra) for k in range(len(device_ids))]
        return _from_counts(n_layers, device_ids, counts, model)

    @classmethod
    def from_text(cls, text: str, source: str = "<layout text>") -> Layout:
        """Parse a layout file's text; ``source`` names the file in error messages."""
        return _parse(text, source)

    def to_text(self) -> str:
        """The layout as a layout file: TOML that people can read and edit."""
        lines = [
            "# FlowSpec Studio layout",
            "# Each [[stage]] runs layers = [start, end) on one device: start included, end excluded.",
            '# device is an agent id, host:port, or "local".',
        ]
        if self.model is not None:
            lines.append(f"model = {_toml_string(self.model)}")
        lines.append(f"n_layers = {self.n_layers}")
        for number, stage in enumerate(self.stages, start=1):
            lines += [
                "",
                f"[[stage]]  # stage {number}",
                f"device = {_toml_string(stage.device_id)}",
                f"layers = [{stage.start}, {stage.end}]  # {_layers(stage.start, stage.end)}",
            ]
        return "\n".join(lines) + "\n"


def _layers(start: int, end: int) -> str:
    """Layers ``[start, end)`` as people count them: "layer 4" or "layers 4-7" (inclusive)."""
    return f"layer {start}" if end - start == 1 else f"layers {start}-{end - 1}"


def _layers_are(start: int, end: int) -> str:
    """Sentence start for ``[start, end)``: "Layer 4 is" or "Layers 4-7 are"."""
    return _layers(start, end).capitalize() + (" is" if end - start == 1 else " are")


def _size(n_bytes: int) -> str:
    """A byte count for people: "1.50 GiB (1610612736 bytes)"."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.2f} {unit} ({n_bytes} bytes)"
    return f"{n_bytes} bytes"


def _is_int(value: object) -> bool:
    """A whole number; ``True`` and ``15.0`` are not."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_stage_count(n_layers: int, n_stages: int) -> None:
    """Raise unless ``n_stages`` stages of at least one layer each can share ``n_layers``."""
    if not _is_int(n_layers) or n_layers < 1:
        raise LayoutError(f"n_layers must be a whole number of at least 1, not {n_layers!r}.")
    if n_stages < 1:
        raise LayoutError("A layout needs at least one stage: add a device.")
    if n_stages > n_layers:
        raise LayoutError(
            f"{n_stages} stages cannot share {n_layers} layers: every stage needs at least one layer. "
            f"Use at most {n_layers} devices."
        )


def _check_stage(number: int, stage: object) -> None:
    """Stage ``number`` (1-based) is a StageRange with a device and whole numbers ``start < end``."""
    if not isinstance(stage, StageRange):
        raise LayoutError(f"Stage {number} is a {type(stage).__name__}, not a StageRange.")
    if not isinstance(stage.device_id, str):
        raise LayoutError(f'Stage {number} has device {stage.device_id!r}: use a string such as "local" or "host:port".')
    if not stage.device_id.strip():
        raise LayoutError(f"Stage {number} has no device: assign it to a device.")
    for name in ("start", "end"):
        if not _is_int(getattr(stage, name)):
            raise LayoutError(
                f"Stage {number} has {name} = {getattr(stage, name)!r}: layer numbers are whole numbers."
            )
    if stage.start >= stage.end:
        raise LayoutError(
            f"Stage {number} is empty (layers = [{stage.start}, {stage.end}]): every stage needs at "
            f"least one layer, so its end must be greater than its start."
        )


def _check_tiling(n_layers: int, stages: tuple[StageRange, ...]) -> None:
    """Stages are in layer order, each starting where the previous one ends, from 0 to n_layers."""
    pairs = list(enumerate(zip(stages, stages[1:]), start=1))
    for number, (left, right) in pairs:
        if right.start < left.start:
            raise LayoutError(
                f"Stage {number + 1} ({_layers(right.start, right.end)}) comes before stage {number} "
                f"({_layers(left.start, left.end)}) in the model: list the stages in layer order."
            )
    first, last = stages[0], stages[-1]
    if first.start < 0:
        raise LayoutError(f"Stage 1 starts at layer {first.start}: layers are numbered from 0.")
    if first.start > 0:
        raise LayoutError(
            f"{_layers_are(0, first.start)} not assigned to any stage: make stage 1 start at layer 0 "
            f"(layers = [0, {first.end}])."
        )
    for number, (left, right) in pairs:
        if right.start > left.end:
            raise LayoutError(
                f"{_layers_are(left.end, right.start)} not assigned to any stage: extend stage {number} "
                f"through layer {right.start - 1} (layers = [{left.start}, {right.start}]) or make stage "
                f"{number + 1} start at layer {left.end} (layers = [{left.end}, {right.end}])."
            )
        if right.start < left.end:
            raise LayoutError(
                f"{_layers_are(right.start, min(left.end, right.end))} in both stage {number} and stage "
                f"{number + 1}, but each layer belongs to one stage: make stage {number + 1} start at "
                f"layer {left.end} or stage {number} end before layer {right.start} "
                f"(layers = [{left.start}, {right.start}])."
            )
    if last.end < n_layers:
        raise LayoutError(
            f"{_layers_are(last.end, n_layers)} not assigned to any stage: extend stage {len(stages)} "
            f"through layer {n_layers - 1}, the model's last (layers = [{last.start}, {n_layers}])."
        )
    if last.end > n_layers:
        raise LayoutError(
            f"Stage {len(stages)} reaches past the model's last layer, {n_layers - 1}: make it end "
            f"there (layers = [{last.start}, {n_layers}])."
        )


def _from_counts(n_layers: int, device_ids: Sequence[DeviceId], counts: Sequence[int], model: str | None) -> Layout:
    """Consecutive stages of ``counts[k]`` layers on ``device_ids[k]``."""
    stages, start = [], 0
    for device_id, count in zip(device_ids, counts, strict=True):
        stages.append(StageRange(device_id, start, start + count))
        start += count
    return Layout(n_layers, tuple(stages), model)


def allocate_by_memory(
    n_layers: int,
    devices: Sequence[tuple[DeviceId, int]],
    bytes_per_layer: int,
    reserve_bytes: int = DEFAULT_RESERVE_BYTES,
    model: str | None = None,
) -> Layout:
    """One stage per ``(device_id, bytes_free)``, in the given order, sized by usable memory.

    A device's *usable* memory is ``bytes_free - reserve_bytes``; its capacity is
    ``usable // bytes_per_layer``. Layers are shared in proportion to usable memory by the
    largest-remainder method (:func:`largest_remainder`). Raises :class:`LayoutError` when a
    device cannot hold even one layer or the devices together cannot hold the model; the message
    says how many bytes are missing.
    """
    _check_stage_count(n_layers, len(devices))
    for name, value, least in (("bytes_per_layer", bytes_per_layer, 1), ("reserve_bytes", reserve_bytes, 0)):
        if not _is_int(value) or value < least:
            raise LayoutError(f"{name} must be a whole number of at least {least}, not {value!r}.")
    for device_id, free in devices:
        if not _is_int(free) or free < 0:
            raise LayoutError(f"Device {device_id} reports {free!r} bytes free: expected a whole number >= 0.")
        if free - reserve_bytes < bytes_per_layer:
            raise LayoutError(
                f"Device {device_id} has {_size(free)} free, but one layer needs {_size(bytes_per_layer)} "
                f"on top of the {_size(reserve_bytes)} kept in reserve: free "
                f"{_size(reserve_bytes + bytes_per_layer - free)} more on it or leave it out."
            )
    usable = [free - reserve_bytes for _, free in devices]
    capacity = [u // bytes_per_layer for u in usable]
    if sum(capacity) < n_layers:
        raise LayoutError(
            f"The model does not fit: its {n_layers} layers need {_size(n_layers * bytes_per_layer)}, but "
            f"these devices hold only {sum(capacity)} whole layers after keeping {_size(reserve_bytes)} "
            f"free on each. {_size((n_layers - sum(capacity)) * bytes_per_layer)} are missing: add a "
            f"device or free memory."
        )
    counts = largest_remainder(n_layers, usable, capacity)
    return _from_counts(n_layers, [device_id for device_id, _ in devices], counts, model)


def largest_remainder(n_layers: int, weights: Sequence[int], capacity: Sequence[int]) -> list[int]:
    """Split ``n_layers`` in proportion to ``weights``: at least 1 and at most ``capacity[k]`` each.

    Each stage first gets the floor of its exact share ``n_layers * weights[k] / sum(weights)``,
    computed in integers so no float rounding creeps in. The leftover layers go one each to the
    largest fractional parts (ties to the earlier stage), skipping stages at capacity; any still
    left go to the stages with the most spare capacity. Last, a stage with no layers takes one
    from the largest stage. Requires ``capacity[k] >= 1``, ``sum(capacity) >= n_layers >=
    len(weights)`` and floors within capacity, which holds when weights are usable bytes.
    """
    total = sum(weights)
    counts = [n_layers * w // total for w in weights]
    remainders = [n_layers * w % total for w in weights]  # fractional parts, scaled by total
    leftover = n_layers - sum(counts)
    for k in sorted(range(len(weights)), key=lambda k: -remainders[k]):
        if leftover and counts[k] < capacity[k]:
            counts[k] += 1
            leftover -= 1
    for k in sorted(range(len(weights)), key=lambda k: counts[k] - capacity[k]):
        take = min(leftover, capacity[k] - counts[k])
        counts[k] += take
        leftover -= take
    for k, count in enumerate(counts):
        if count == 0:
            largest = max(range(len(counts)), key=lambda j: counts[j])
            counts[largest] -= 1
            counts[k] = 1
    return counts


def allocate_by_speed(
    n_layers: int, devices: Sequence[tuple[DeviceId, float, int]], model: str | None = None
) -> Layout:
    """One stage per ``(device_id, ms_per_layer, max_layers)``, in the given order, balancing time.

    A pipeline runs as fast as its slowest stage, and a stage takes ``layers * ms_per_layer``.
    Rule: every stage starts with one layer; each further layer goes to the stage whose time
    *after* taking it is smallest (ties to the earlier stage), never past its ``max_layers`` (its
    capacity). This picks the smallest possible time for the slowest stage.
    """
    _check_stage_count(n_layers, len(devices))
    for device_id, ms, cap in devices:
        if isinstance(ms, bool) or not isinstance(ms, int | float) or not math.isfinite(ms) or ms <= 0:
            raise LayoutError(f"Device {device_id} has ms_per_layer = {ms!r}: profile it again.")
        if not _is_int(cap) or cap < 1:
            raise LayoutError(f"Device {device_id} can hold {cap!r} layers: a stage needs room for at least one.")
    room = sum(cap for _, _, cap in devices)
    if room < n_layers:
        raise LayoutError(
            f"The model does not fit: it has {n_layers} layers but these devices hold at most {room}. "
            f"{n_layers - room} layers are missing: add a device or free memory."
        )
    counts = [1] * len(devices)
    for _ in range(n_layers - len(devices)):
        open_stages = [k for k, (_, _, cap) in enumerate(devices) if counts[k] < cap]
        best = min(open_stages, key=lambda k: ((counts[k] + 1) * devices[k][1], k))
        counts[best] += 1
    return _from_counts(n_layers, [device_id for device_id, _, _ in devices], counts, model)


def load_layout(path: str | os.PathLike[str]) -> Layout:
    """Read a layout file; any problem (missing, unreadable, malformed) is a :class:`LayoutError`."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LayoutError(f"Layout file {path} does not exist: check the path.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise LayoutError(f"Cannot read layout file {path}: {error}") from error
    return Layout.from_text(text, source=str(path))


def save_layout(layout: Layout, path: str | os.PathLike[str]) -> None:
    """Write ``layout`` to ``path`` atomically: a crash never leaves half a file. OSError propagates."""
    target = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as file:
            file.write(layout.to_text())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; a layout is not a secret
        os.replace(tmp, target)
    except BaseException:
        os.unlink(tmp)
        raise


def _parse(text: str, source: str) -> Layout:
    """Build a Layout from layout-file text; every error message starts with ``source``."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise LayoutError(f"{source}: not valid TOML ({error}).") from error
    unknown = sorted(set(data) - {"model", "n_layers", "stage"})
    if unknown:
        raise LayoutError(f"{source}: unknown key {unknown[0]!r}; a layout file has model, n_layers and [[stage]].")
    model = data.get("model")
    if model is not None and not isinstance(model, str):
        raise LayoutError(f'{source}: model must be a quoted string, e.g. model = "smollm2-135m".')
    n_layers = data.get("n_layers")
    if not _is_int(n_layers):
        raise LayoutError(f"{source}: n_layers must be the model's number of layers, e.g. n_layers = 30.")
    tables = data.get("stage", [])
    if isinstance(tables, dict):
        raise LayoutError(f"{source}: write each stage as [[stage]] (double brackets), not [stage].")
    if not isinstance(tables, list) or not tables:
        raise LayoutError(f"{source}: no stages; add a [[stage]] table with device and layers.")
    stages = [_parse_stage(table, number, source) for number, table in enumerate(tables, start=1)]
    try:
        return Layout(n_layers, tuple(stages), model)
    except LayoutError as error:
        raise LayoutError(f"{source}: {error}") from error


def _parse_stage(table: object, number: int, source: str) -> StageRange:
    """One ``[[stage]]`` table: ``device`` (a string) and ``layers = [start, end]``."""
    where = f"{source}: stage {number}"
    if not isinstance(table, dict):
        raise LayoutError(f"{where} must be a [[stage]] table.")
    unknown = sorted(set(table) - {"device", "layers"})
    if unknown:
        raise LayoutError(f"{where}: unknown key {unknown[0]!r}; a stage has device and layers.")
    device = table.get("device")
    if not isinstance(device, str) or not device.strip():
        raise LayoutError(f'{where}: device must be a quoted agent id or host:port, e.g. device = "local".')
    layers = table.get("layers")
    if not isinstance(layers, list) or len(layers) != 2 or not all(map(_is_int, layers)):
        raise LayoutError(
            f"{where}: layers must be two whole numbers [start, end], end excluded, e.g. layers = [0, 15]; "
            f"got {layers!r}."
        )
    return StageRange(DeviceId(device), layers[0], layers[1])


def _toml_string(value: str) -> str:
    """``value`` as a TOML basic string. JSON's escapes are a subset of TOML's; TOML also forbids a
    raw DEL character, which JSON leaves alone."""
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007F")
