"""engine.layout: validation, editing, allocation and the layout file.

The tables at the top (VALID_LAYOUTS, INVALID_LAYOUTS, MOVE_BOUNDARY_CASES, BAD_MOVES) are plain
data so the Qt layout-model tests can reuse them.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import subprocess
import sys
from pathlib import Path

import pytest

from engine.layout import (
    DEFAULT_RESERVE_BYTES,
    DeviceId,
    Layout,
    LayoutError,
    StageRange,
    allocate_by_memory,
    allocate_by_speed,
    largest_remainder,
    load_layout,
    save_layout,
)

MIB = 1024**2


def make(n_layers: int, *ranges: tuple[int, int], model: str | None = None) -> Layout:
    """A layout whose stage k runs ``ranges[k]`` on device ``d{k + 1}``."""
    return Layout(n_layers, tuple(StageRange(DeviceId(f"d{k + 1}"), s, e) for k, (s, e) in enumerate(ranges)), model)


# (n_layers, stage ranges)
VALID_LAYOUTS = [
    (1, [(0, 1)]),
    (30, [(0, 30)]),
    (30, [(0, 15), (15, 30)]),
    (30, [(0, 1), (1, 29), (29, 30)]),
    (4, [(0, 1), (1, 2), (2, 3), (3, 4)]),
    (10, [(0, 3), (3, 7), (7, 10)]),
]

# (case id, n_layers, stage ranges, fragments the message must contain)
INVALID_LAYOUTS = [
    ("no stages", 30, [], ["at least one stage"]),
    ("gap", 30, [(0, 10), (12, 30)], ["Layers 10-11 are not assigned", "stage 1", "stage 2", "[0, 12]"]),
    ("one-layer gap", 30, [(0, 10), (11, 30)], ["Layer 10 is not assigned"]),
    ("overlap", 30, [(0, 12), (10, 30)], ["Layers 10-11 are in both stage 1 and stage 2"]),
    ("nested overlap", 30, [(0, 20), (5, 10), (10, 30)], ["Layers 5-9 are in both stage 1 and stage 2"]),
    ("empty stage", 30, [(0, 10), (10, 10), (10, 30)], ["Stage 2 is empty"]),
    ("reversed stage", 30, [(0, 10), (12, 11), (11, 30)], ["Stage 2 is empty"]),
    ("does not start at 0", 30, [(2, 15), (15, 30)], ["Layers 0-1 are not assigned", "stage 1 start at layer 0"]),
    ("negative start", 30, [(-1, 15), (15, 30)], ["Stage 1 starts at layer -1"]),
    ("stops short", 30, [(0, 15), (15, 29)], ["Layer 29 is not assigned", "extend stage 2"]),
    ("past the end", 30, [(0, 15), (15, 31)], ["Stage 2 reaches past the model's last layer, 29"]),
    ("out of order", 30, [(15, 30), (0, 15)], ["Stage 2 (layers 0-14) comes before stage 1"]),
    ("float end", 30, [(0, 15.0), (15, 30)], ["Stage 1 has end = 15.0", "whole numbers"]),
    ("float start", 30, [(0, 15), (15.5, 30)], ["Stage 2 has start = 15.5"]),
    ("bool bound", 2, [(0, True), (1, 2)], ["Stage 1 has end = True"]),
    ("more stages than layers", 2, [(0, 1), (1, 2), (2, 3)], ["3 stages cannot share 2 layers"]),
    ("zero layers", 0, [(0, 1)], ["n_layers must be a whole number of at least 1"]),
    ("float n_layers", 30.0, [(0, 30)], ["n_layers must be a whole number"]),
]

# (stage ranges of a 30-layer layout, stage index i, new_end, expected layer counts)
MOVE_BOUNDARY_CASES = [
    ([(0, 15), (15, 30)], 0, 10, (10, 20)),
    ([(0, 15), (15, 30)], 0, 20, (20, 10)),
    ([(0, 15), (15, 30)], 0, 1, (1, 29)),
    ([(0, 15), (15, 30)], 0, 29, (29, 1)),
    ([(0, 10), (10, 20), (20, 30)], 1, 25, (10, 15, 5)),
    ([(0, 10), (10, 20), (20, 30)], 1, 11, (10, 1, 19)),
    ([(0, 10), (10, 20), (20, 30)], 0, 10, (10, 10, 10)),  # a no-op move is allowed
]

# (stage ranges of a 30-layer layout, i, new_end, message fragment)
BAD_MOVES = [
    ([(0, 15), (15, 30)], 0, 0, "Choose a layer from 1 to 29"),
    ([(0, 15), (15, 30)], 0, 30, "Choose a layer from 1 to 29"),
    ([(0, 10), (10, 20), (20, 30)], 1, 10, "Choose a layer from 11 to 29"),
    ([(0, 10), (10, 20), (20, 30)], 0, 20, "between stage 1 and stage 2"),
    ([(0, 15), (15, 30)], 0, 15.5, "each stage needs at least one layer"),
    ([(0, 15), (15, 30)], 1, 20, "Stage 2 is the last stage"),
    ([(0, 15), (15, 30)], 2, 20, "There is no stage 3"),
    ([(0, 15), (15, 30)], -1, 10, "There is no stage 0"),
    ([(0, 30)], 0, 10, "only one stage"),
]


@pytest.mark.parametrize(("n_layers", "ranges"), VALID_LAYOUTS)
def test_valid_layouts(n_layers, ranges):
    layout = make(n_layers, *ranges)
    assert layout.layer_counts == tuple(e - s for s, e in ranges)
    assert sum(layout.layer_counts) == n_layers


@pytest.mark.parametrize(
    ("case", "n_layers", "ranges", "fragments"), INVALID_LAYOUTS, ids=[c[0] for c in INVALID_LAYOUTS]
)
def test_invalid_layouts_say_what_is_wrong(case, n_layers, ranges, fragments):
    with pytest.raises(LayoutError) as info:
        make(n_layers, *ranges)
    for fragment in fragments:
        assert fragment in str(info.value), (case, str(info.value))


def test_layout_error_is_a_value_error():
    assert issubclass(LayoutError, ValueError)


@pytest.mark.parametrize("bad_stage", ["not a stage", (0, 30)])
def test_stages_must_be_stage_ranges(bad_stage):
    with pytest.raises(LayoutError, match="not a StageRange"):
        Layout(30, (bad_stage,))


@pytest.mark.parametrize(
    ("device", "fragment"),
    [("", "Stage 1 has no device"), ("   ", "Stage 1 has no device"), (None, "Stage 1 has device None"), (5, "device 5")],
)
def test_every_stage_needs_a_device(device, fragment):
    with pytest.raises(LayoutError, match=fragment):
        Layout(30, (StageRange(device, 0, 30),))


def test_layout_is_frozen_hashable_and_stores_a_tuple():
    layout = Layout(30, [StageRange(DeviceId("a"), 0, 15), StageRange(DeviceId("b"), 15, 30)])
    assert isinstance(layout.stages, tuple)
    assert hash(layout) == hash(make(30, (0, 15), (15, 30)).assign(0, DeviceId("a")).assign(1, DeviceId("b")))
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.n_layers = 31  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        layout.stages[0].end = 10  # type: ignore[misc]


def test_model_must_be_a_string():
    with pytest.raises(LayoutError, match="model must be"):
        Layout(1, (StageRange(DeviceId("a"), 0, 1),), model=135)  # type: ignore[arg-type]


@pytest.mark.parametrize(("ranges", "i", "new_end", "counts"), MOVE_BOUNDARY_CASES)
def test_move_boundary(ranges, i, new_end, counts):
    before = make(30, *ranges)
    after = before.move_boundary(i, new_end)
    assert after.layer_counts == counts
    assert after.stages[i].end == after.stages[i + 1].start == new_end
    assert [s.device_id for s in after.stages] == [s.device_id for s in before.stages]
    assert before == make(30, *ranges)  # the original value is untouched


@pytest.mark.parametrize(("ranges", "i", "new_end", "fragment"), BAD_MOVES)
def test_bad_moves_raise_layout_error(ranges, i, new_end, fragment):
    with pytest.raises(LayoutError) as info:
        make(30, *ranges).move_boundary(i, new_end)
    assert fragment in str(info.value)


def test_move_boundary_keeps_model():
    assert make(30, (0, 15), (15, 30), model="smollm2-135m").move_boundary(0, 5).model == "smollm2-135m"


def test_assign_changes_only_the_device():
    before = make(30, (0, 10), (10, 20), (20, 30))
    after = before.assign(1, DeviceId("127.0.0.1:5701"))
    assert [s.device_id for s in after.stages] == ["d1", "127.0.0.1:5701", "d3"]
    assert after.layer_counts == before.layer_counts
    assert before.stages[1].device_id == "d2"


def test_one_device_may_host_several_stages():
    layout = make(30, (0, 10), (10, 30)).assign(1, DeviceId("d1"))
    assert [s.device_id for s in layout.stages] == ["d1", "d1"]


@pytest.mark.parametrize(("i", "device", "fragment"), [(3, "x", "There is no stage 4"), (0, "", "no device")])
def test_bad_assign_raises_layout_error(i, device, fragment):
    with pytest.raises(LayoutError, match=fragment):
        make(30, (0, 10), (10, 20), (20, 30)).assign(i, DeviceId(device))


@pytest.mark.parametrize(
    ("n_layers", "n_devices", "counts"),
    [(30, 1, (30,)), (30, 2, (15, 15)), (10, 3, (4, 3, 3)), (30, 4, (8, 8, 7, 7)), (5, 5, (1,) * 5), (7, 2, (4, 3))],
)
def test_split_even_gives_earlier_stages_the_extra_layers(n_layers, n_devices, counts):
    devices = [DeviceId(f"d{k}") for k in range(n_devices)]
    layout = Layout.split_even(n_layers, devices, model="m")
    assert layout.layer_counts == counts
    assert [s.device_id for s in layout.stages] == devices
    assert layout.model == "m"


@pytest.mark.parametrize(
    ("n_layers", "n_devices", "fragment"), [(2, 3, "3 stages cannot share 2 layers"), (30, 0, "at least one stage")]
)
def test_split_even_rejects_impossible_splits(n_layers, n_devices, fragment):
    with pytest.raises(LayoutError, match=fragment):
        Layout.split_even(n_layers, [DeviceId(f"d{k}") for k in range(n_devices)])


# Largest remainder, in the style of exo's TestAllocateLayersProportionally:
# (n_layers, weights, capacity, expected)
LARGEST_REMAINDER_CASES = [
    (30, [1, 1, 1], [30] * 3, [10, 10, 10]),  # equal weights
    (30, [2, 1], [30] * 2, [20, 10]),  # exact proportion
    (10, [1, 1, 1], [10] * 3, [4, 3, 3]),  # tie on remainders: the earlier stage wins
    (10, [5, 3, 2], [10] * 3, [5, 3, 2]),
    (10, [6, 3, 1], [10] * 3, [6, 3, 1]),
    (5, [7, 2, 1], [5] * 3, [3, 1, 1]),  # shares 3.5, 1.0, 0.5: biggest remainder first, then the min-1 rule
    (10, [1000, 1], [10] * 2, [9, 1]),  # a tiny share still gets one layer, taken from the largest
    (3, [100, 1, 1], [3] * 3, [1, 1, 1]),  # as many stages as layers
    (4, [10, 10, 10], [1, 4, 4], [1, 2, 1]),  # the remainder skips a stage at capacity
    (4, [18, 30], [1, 3], [1, 3]),  # plain largest remainder would give 2, 2 and overflow stage 1
    (1, [5], [1], [1]),
]


@pytest.mark.parametrize(("n_layers", "weights", "capacity", "expected"), LARGEST_REMAINDER_CASES)
def test_largest_remainder(n_layers, weights, capacity, expected):
    assert largest_remainder(n_layers, weights, capacity) == expected


@pytest.mark.parametrize(
    ("n_layers", "free_mib", "layer_mib", "counts"),
    [
        # usable 8, 4, 1 GiB: shares 18.46, 9.23, 2.31 -> floors 18, 9, 2; the leftover layer goes to 0.46
        (30, [8704, 4608, 1536], 100, (19, 9, 2)),
        (30, [2560, 2560], 100, (15, 15)),
        (24, [1536, 2560, 3584], 100, (4, 8, 12)),  # usable 1, 2, 3 GiB: exact shares
        (4, [530, 542], 10, (1, 3)),  # usable 18 and 30 MiB: capacity 1 and 3, so not 2, 2
        (10, [1512, 522], 10, (9, 1)),  # usable 1000 and 10 MiB: the small device still gets one layer
    ],
)
def test_allocate_by_memory(n_layers, free_mib, layer_mib, counts):
    devices = [(DeviceId(f"d{k}"), mib * MIB) for k, mib in enumerate(free_mib)]
    layout = allocate_by_memory(n_layers, devices, layer_mib * MIB, reserve_bytes=512 * MIB, model="m")
    assert layout.layer_counts == counts
    assert [s.device_id for s in layout.stages] == [d for d, _ in devices]
    assert layout.model == "m"


def test_allocate_by_memory_uses_the_default_reserve():
    free = DEFAULT_RESERVE_BYTES + 10 * MIB
    assert allocate_by_memory(2, [(DeviceId("a"), free), (DeviceId("b"), free)], 10 * MIB).layer_counts == (1, 1)
    with pytest.raises(LayoutError, match="Device a"):
        allocate_by_memory(2, [(DeviceId("a"), free - 1), (DeviceId("b"), free)], 10 * MIB)


def test_allocate_by_memory_says_how_many_bytes_are_missing():
    devices = [(DeviceId("a"), 2048 * MIB), (DeviceId("b"), 1024 * MIB)]
    with pytest.raises(LayoutError) as info:
        allocate_by_memory(30, devices, 100 * MIB, reserve_bytes=512 * MIB)
    message = str(info.value)
    # Usable 1536 + 512 MiB hold 15 + 5 = 20 layers; 10 layers of 100 MiB are missing.
    assert "does not fit" in message
    assert f"{1000 * MIB} bytes" in message and "20 whole layers" in message


def test_allocate_by_memory_names_a_device_too_small_for_one_layer():
    with pytest.raises(LayoutError) as info:
        allocate_by_memory(30, [(DeviceId("big"), 10**12), (DeviceId("pi-zero"), 600 * MIB)], 100 * MIB, 512 * MIB)
    assert "pi-zero" in str(info.value) and f"{12 * MIB} bytes" in str(info.value)


@pytest.mark.parametrize(
    ("n_layers", "devices", "kwargs", "fragment"),
    [
        (2, [("a", 10**9), ("b", 10**9), ("c", 10**9)], {}, "3 stages cannot share 2 layers"),
        (2, [], {}, "at least one stage"),
        (2, [("a", 10**9)], {"bytes_per_layer": 0}, "bytes_per_layer"),
        (2, [("a", 10**9)], {"reserve_bytes": -1}, "reserve_bytes"),
        (2, [("a", 1.5e9)], {}, "reports 1500000000.0 bytes free"),
    ],
)
def test_allocate_by_memory_rejects_bad_input(n_layers, devices, kwargs, fragment):
    args = {"bytes_per_layer": 1000, "reserve_bytes": 0} | kwargs
    with pytest.raises(LayoutError, match=fragment):
        allocate_by_memory(n_layers, devices, **args)


def test_allocate_by_memory_invariants_on_random_clusters():
    rng = random.Random(0)
    for _ in range(500):
        n_devices = rng.randint(1, 6)
        n_layers = rng.randint(n_devices, 80)
        bytes_per_layer = rng.randint(1, 50)
        most = 2 * n_layers * bytes_per_layer // n_devices + bytes_per_layer
        free = [rng.randint(bytes_per_layer, most) for _ in range(n_devices)]
        capacity = [f // bytes_per_layer for f in free]
        devices = [(DeviceId(str(k)), f) for k, f in enumerate(free)]
        if sum(capacity) < n_layers:
            with pytest.raises(LayoutError, match="does not fit"):
                allocate_by_memory(n_layers, devices, bytes_per_layer, reserve_bytes=0)
            continue
        counts = allocate_by_memory(n_layers, devices, bytes_per_layer, reserve_bytes=0).layer_counts
        assert sum(counts) == n_layers
        assert all(1 <= c <= cap for c, cap in zip(counts, capacity)), (free, bytes_per_layer, counts)


@pytest.mark.parametrize(
    ("n_layers", "devices", "counts"),
    [
        (30, [("a", 1.0, 30), ("b", 1.0, 30)], (15, 15)),
        (30, [("a", 1.0, 30), ("b", 2.0, 30)], (20, 10)),
        (30, [("a", 1.0, 30), ("b", 2.0, 30), ("c", 4.0, 5)], (18, 8, 4)),
        (30, [("a", 1.0, 10), ("b", 5.0, 30)], (10, 20)),  # the fast device is full
        (3, [("a", 1.0, 3), ("b", 100.0, 3), ("c", 100.0, 3)], (1, 1, 1)),  # one layer each at least
        (5, [("a", 2, 5), ("b", 2, 5)], (3, 2)),  # a tie goes to the earlier stage; ints are accepted
    ],
)
def test_allocate_by_speed(n_layers, devices, counts):
    layout = allocate_by_speed(n_layers, [(DeviceId(d), ms, cap) for d, ms, cap in devices], model="m")
    assert layout.layer_counts == counts
    assert layout.model == "m"


def test_allocate_by_speed_minimises_the_slowest_stage():
    rng = random.Random(1)
    for _ in range(150):
        n_devices = rng.randint(1, 3)
        n_layers = rng.randint(n_devices, 12)
        devices = [
            (DeviceId(str(k)), rng.choice([0.5, 1.0, 1.5, 2.0, 3.7]), rng.randint(1, 12)) for k in range(n_devices)
        ]
        if sum(cap for _, _, cap in devices) < n_layers:
            continue
        got = allocate_by_speed(n_layers, devices).layer_counts
        best = min(
            max(c * ms for c, (_, ms, _) in zip(counts, devices))
            for counts in itertools.product(*(range(1, cap + 1) for _, _, cap in devices))
            if sum(counts) == n_layers
        )
        assert max(c * ms for c, (_, ms, _) in zip(got, devices)) == best, (devices, n_layers, got)


@pytest.mark.parametrize(
    ("devices", "fragment"),
    [
        ([("a", 1.0, 10), ("b", 1.0, 10)], "25 layers but these devices hold at most 20. 5 layers are missing"),
        ([("a", 0.0, 30)], "ms_per_layer = 0.0"),
        ([("a", -1.0, 30)], "ms_per_layer = -1.0"),
        ([("a", float("nan"), 30)], "ms_per_layer = nan"),
        ([("a", True, 30)], "ms_per_layer = True"),
        ([("a", 1.0, 0)], "can hold 0 layers"),
        ([("a", 1.0, 12.5)], "can hold 12.5 layers"),
    ],
)
def test_allocate_by_speed_rejects_bad_input(devices, fragment):
    with pytest.raises(LayoutError) as info:
        allocate_by_speed(25, devices)
    assert fragment in str(info.value)


BRIEF_EXAMPLE = """\
# FlowSpec Studio layout
model = "smollm2-135m"
n_layers = 30
[[stage]]
device = "127.0.0.1:5701"   # agent id or host:port
layers = [0, 15]            # half-open: layers 0..14
[[stage]]
device = "local"
layers = [15, 30]
"""


def test_parse_the_documented_example():
    layout = Layout.from_text(BRIEF_EXAMPLE)
    assert layout == Layout(
        30, (StageRange(DeviceId("127.0.0.1:5701"), 0, 15), StageRange(DeviceId("local"), 15, 30)), "smollm2-135m"
    )


def test_to_text_is_readable_toml():
    text = make(30, (0, 15), (15, 30), model="smollm2-135m").to_text()
    assert text.startswith("# FlowSpec Studio layout\n")
    assert 'model = "smollm2-135m"\nn_layers = 30\n' in text
    assert '[[stage]]  # stage 2\ndevice = "d2"\nlayers = [15, 30]  # layers 15-29\n' in text


@pytest.mark.parametrize(
    "layout",
    [
        make(30, (0, 15), (15, 30), model="smollm2-135m"),
        make(1, (0, 1)),
        make(30, (0, 1), (1, 29), (29, 30), model='C:\\models\\my "best" model'),
        Layout(4, (StageRange(DeviceId('ünï "cödé"\\\t\x7f'), 0, 2), StageRange(DeviceId("[::1]:5701"), 2, 4))),
    ],
)
def test_text_and_file_round_trip(layout, tmp_path):
    assert Layout.from_text(layout.to_text()) == layout
    path = tmp_path / "cluster.layout.toml"
    save_layout(layout, path)
    assert load_layout(path) == layout
    assert load_layout(str(path)) == layout
    assert path.read_text(encoding="utf-8") == layout.to_text()


def test_save_layout_replaces_an_existing_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.toml"
    save_layout(make(30, (0, 30)), path)
    save_layout(make(30, (0, 10), (10, 30)), path)
    assert load_layout(path).layer_counts == (10, 20)
    assert [p.name for p in tmp_path.iterdir()] == ["a.toml"]


STAGE = '[[stage]]\ndevice = "a"\nlayers = [0, 30]\n'

# (case id, file text, fragment the message must contain)
MALFORMED_FILES = [
    ("not toml", "n_layers = = 30\n", "not valid TOML"),
    ("missing n_layers", STAGE, "n_layers must be the model's number of layers"),
    ("float n_layers", "n_layers = 30.0\n" + STAGE, "n_layers must be"),
    ("string n_layers", 'n_layers = "30"\n' + STAGE, "n_layers must be"),
    ("model not a string", "model = 135\nn_layers = 30\n" + STAGE, "model must be a quoted string"),
    ("no stages", "n_layers = 30\n", "no stages"),
    ("single brackets", 'n_layers = 30\n[stage]\ndevice = "a"\nlayers = [0, 30]\n', "double brackets"),
    ("unknown top key", "n_layers = 30\nstages = 2\n" + STAGE, "unknown key 'stages'"),
    ("unknown stage key", 'n_layers = 30\n[[stage]]\ndevice = "a"\nlayer = [0, 30]\n', "stage 1: unknown key 'layer'"),
    ("missing device", "n_layers = 30\n[[stage]]\nlayers = [0, 30]\n", "stage 1: device must be"),
    ("empty device", 'n_layers = 30\n[[stage]]\ndevice = ""\nlayers = [0, 30]\n', "device must be"),
    ("numeric device", "n_layers = 30\n[[stage]]\ndevice = 5701\nlayers = [0, 30]\n", "device must be"),
    ("missing layers", 'n_layers = 30\n[[stage]]\ndevice = "a"\n', "stage 1: layers must be two whole numbers"),
    ("three numbers", 'n_layers = 30\n[[stage]]\ndevice = "a"\nlayers = [0, 15, 30]\n', "two whole numbers"),
    ("float layers", 'n_layers = 30\n[[stage]]\ndevice = "a"\nlayers = [0, 30.0]\n', "two whole numbers"),
    ("range as string", 'n_layers = 30\n[[stage]]\ndevice = "a"\nlayers = "0-29"\n', "two whole numbers"),
    ("gap", "n_layers = 30\n" + STAGE.replace("[0, 30]", "[0, 10]") + STAGE.replace("[0, 30]", "[12, 30]"),
     "Layers 10-11 are not assigned to any stage"),
    ("too short", "n_layers = 32\n" + STAGE, "Layers 30-31 are not assigned"),
]


@pytest.mark.parametrize(("case", "text", "fragment"), MALFORMED_FILES, ids=[c[0] for c in MALFORMED_FILES])
def test_malformed_files_name_the_file_and_the_problem(case, text, fragment, tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(LayoutError) as info:
        load_layout(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert fragment in message, message


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(LayoutError, match="does not exist") as info:
        load_layout(tmp_path / "nope.toml")
    assert "nope.toml" in str(info.value)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00n_layers")
    with pytest.raises(LayoutError, match="Cannot read layout file .*binary.toml"):
        load_layout(binary)


def test_importing_layout_loads_no_torch():
    code = "import sys, engine.layout; bad = {'torch', 'numpy', 'PySide6'} & set(sys.modules); assert not bad, bad"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[3])
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")
def test_saved_layout_is_readable_by_others(tmp_path):
    path = tmp_path / "shared.toml"
    save_layout(make(30, (0, 30)), path)
    assert path.stat().st_mode & 0o777 == 0o644
