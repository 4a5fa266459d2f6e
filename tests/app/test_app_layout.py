"""Layout editor: drops through the model's MIME data (valid and refused), suggest, files, the canvas."""

from __future__ import annotations

from dataclasses import replace

import pytest
from PySide6.QtCore import QMimeData, QModelIndex, Qt

from app.devices import DeviceInfo, with_state
from app.layout_plan import MIME_TYPE, STAGE_RUNTIME_BYTES, ModelShape, suggest
from app.models.layout_model import LayoutModel, StageRole
from app.widgets.layout_editor import LayoutEditor
from engine.layout import DeviceId, Layout, StageRange, load_layout

GiB = 1024**3
SHAPE = ModelShape("test-model", "Test model", 12, 50 * 1024**2, 100 * 1024**2, 10 * 1024**2, "bf16")


def _device(k: int, free: int = 4 * GiB, state: str = "online", ms: float | None = None) -> DeviceInfo:
    return DeviceInfo(DeviceId(f"dev-{k}"), f"Device {k}", f"10.0.0.{k}:5555", state, free, free, "CPU", ms, "manual")


DEVICES = (_device(1), _device(2), _device(3))
START = Layout(12, (StageRange(DeviceId("dev-1"), 0, 6), StageRange(DeviceId("dev-2"), 6, 12)))


@pytest.fixture
def model(qtbot):
    m = LayoutModel()
    m.set_shape(SHAPE)
    m.set_devices(DEVICES)
    assert m.set_layout(START)
    return m


def _drop(model: LayoutModel, mime: QMimeData, lane: int, column: int) -> bool:
    return model.dropMimeData(mime, Qt.DropAction.MoveAction, -1, -1, model.index(lane, column))


def _refusal(model, qtbot, mime, lane, column) -> str:
    with qtbot.waitSignal(model.sig_drop_refused, timeout=1000) as refused:
        assert not _drop(model, mime, lane, column)
    return refused.args[0]


def test_mime_data_of_selected_cells_is_their_layer_range(model):
    mime = model.mimeData([model.index(0, 2), model.index(0, 4)])
    assert mime.formats() == [MIME_TYPE]
    assert b'"start": 2' in bytes(mime.data(MIME_TYPE).data()) and b'"end": 5' in bytes(mime.data(MIME_TYPE).data())
    assert model.data(model.index(0, 3), StageRole) == 0 and model.data(model.index(1, 3), StageRole) is None


def test_dropping_a_whole_stage_on_another_lane_moves_it(model, qtbot):
    with qtbot.waitSignal(model.sig_layout_changed) as changed:
        assert _drop(model, model.range_mime_data(0, 6), 2, 0)
    assert changed.args[0].stages == (StageRange("dev-3", 0, 6), StageRange("dev-2", 6, 12))
    assert model.data(model.index(2, 0), Qt.ItemDataRole.DisplayRole) == "1"


def test_dropping_part_of_a_stage_splits_it_and_merges_with_a_neighbour(model):
    assert _drop(model, model.range_mime_data(4, 6), 1, 4)  # layers 4-5 join dev-2's stage
    assert model.layout.stages == (StageRange("dev-1", 0, 4), StageRange("dev-2", 4, 12))
    assert _drop(model, model.range_mime_data(1, 2), 2, 1)  # layer 1 alone onto dev-3: three pieces
    assert [(s.device_id, s.start, s.end) for s in model.layout.stages] == [
        ("dev-1", 0, 1), ("dev-3", 1, 2), ("dev-1", 2, 4), ("dev-2", 4, 12)]


def test_dragging_a_boundary_moves_it(model):
    assert _drop(model, model.boundary_mime_data(0), 0, 9)
    assert model.layout.layer_counts == (9, 3)


def test_a_range_dropped_off_its_columns_is_refused_as_a_gap(model, qtbot):
    reason = _refusal(model, qtbot, model.range_mime_data(0, 6), 2, 3)
    assert "not assigned to any stage" in reason and "same columns" in reason
    assert model.layout == START


def test_a_range_dropped_before_its_columns_is_refused_as_an_overlap(model, qtbot):
    reason = _refusal(model, qtbot, model.range_mime_data(8, 12), 2, 4)
    assert "in both stage" in reason
    assert model.layout == START


def test_a_boundary_past_the_next_stage_is_refused(model, qtbot):
    assert "at least one layer" in _refusal(model, qtbot, model.boundary_mime_data(0), 0, 12)
    assert "last stage" in _refusal(model, qtbot, model.boundary_mime_data(1), 0, 4)


def test_a_device_that_lacks_memory_is_refused(model, qtbot):
    small = replace(DEVICES[2], memory_free=STAGE_RUNTIME_BYTES + 2 * (SHAPE.bytes_per_layer + SHAPE.kv_bytes_per_layer))
    model.set_devices((DEVICES[0], DEVICES[1], small))
    reason = _refusal(model, qtbot, model.range_mime_data(6, 12), 2, 6)
    assert "lacks memory" in reason and "Device 3" in reason
    assert _drop(model, model.range_mime_data(10, 12), 2, 10)  # two layers fit


@pytest.mark.parametrize("state, words", [("lost", "offline"), ("unpaired", "not paired")])
def test_an_offline_or_unpaired_device_is_refused(model, qtbot, state, words):
    model.set_devices(with_state(DEVICES, "dev-3", state))
    assert words in _refusal(model, qtbot, model.range_mime_data(0, 6), 2, 0)


def test_foreign_mime_data_is_refused(model, qtbot):
    mime = QMimeData()
    mime.setData(MIME_TYPE, b"not json")
    assert "not a layer range" in _refusal(model, qtbot, mime, 1, 0)
    plain = QMimeData()
    plain.setText("hello")
    assert not _drop(model, plain, 1, 0)


def test_suggest_by_memory_then_by_measured_speed_says_why():
    by_memory = suggest(SHAPE, (_device(1, 8 * GiB), _device(2, 4 * GiB)))
    assert sum(by_memory.layout.layer_counts) == 12 and by_memory.layout.layer_counts[0] > by_memory.layout.layer_counts[1]
    assert "free memory" in by_memory.reason
    by_speed = suggest(SHAPE, (_device(1, ms=1.0), _device(2, ms=3.0), _device(3, state="lost", ms=0.1)))
    assert by_speed.layout.layer_counts == (9, 3)
    assert [s.device_id for s in by_speed.layout.stages] == ["dev-1", "dev-2"]
    assert "measured speed" in by_speed.reason and "limits" in by_speed.reason


def test_editor_suggest_save_open_round_trip(qtbot, tmp_path, model):
    editor = LayoutEditor(model)
    qtbot.addWidget(editor)
    assert editor.suggest()
    assert "Suggested" in editor.message.text()
    path = tmp_path / "layout.toml"
    assert editor.save_layout_file(str(path))
    assert load_layout(path).stages == model.layout.stages
    assert load_layout(path).model == "test-model"
    model.set_layout(START)
    assert editor.open_layout_file(str(path)) and model.layout.stages == load_layout(path).stages
    path.write_text("n_layers = 12\n[stage]\ndevice = 'x'\n")
    assert not editor.open_layout_file(str(path))
    assert "[[stage]]" in editor.message.text()
    wrong = tmp_path / "wrong.toml"
    wrong.write_text(Layout.split_even(4, ["dev-1"]).to_text())
    assert not editor.open_layout_file(str(wrong)) and "4 layers" in editor.message.text()


def test_canvas_drop_at_widget_points(qtbot, model):
    editor = LayoutEditor(model)
    qtbot.addWidget(editor)
    editor.resize(1000, 400)
    editor.show()
    qtbot.waitExposed(editor)
    canvas = editor.canvas
    point = canvas.cell_center(2, 7)  # dev-2's layers 6-11 grabbed at layer 7, dropped on dev-3 at layer 7
    mime = model.range_mime_data(6, 12)
    mime.setData(MIME_TYPE, b'{"end": 12, "kind": "range", "offset": 1, "start": 6}')
    assert canvas.drop_at(mime, point.x(), point.y())
    assert model.layout.stages[1] == StageRange("dev-3", 6, 12)
    boundary = canvas.boundary_point(3)
    assert canvas.drop_at(model.boundary_mime_data(0), boundary.x(), boundary.y())
    assert model.layout.layer_counts == (3, 9)
    assert not canvas.drop_at(model.range_mime_data(0, 3), point.x(), point.y())  # wrong columns
    assert editor.message.text().startswith("Refused:")
    assert canvas.grab().width() > 0  # paints without error


def test_drop_without_a_lane_is_refused(model, qtbot):
    reason = _refusal_raw(model, qtbot)
    assert "lane" in reason


def _refusal_raw(model, qtbot) -> str:
    with qtbot.waitSignal(model.sig_drop_refused, timeout=1000) as refused:
        assert not model.dropMimeData(model.range_mime_data(0, 6), Qt.DropAction.MoveAction, -1, 0, QModelIndex())
    return refused.args[0]


def test_clicks_select_a_stage_and_shift_click_picks_layers(qtbot, model):
    from PySide6.QtTest import QTest

    editor = LayoutEditor(model)
    qtbot.addWidget(editor)
    editor.resize(1000, 400)
    editor.show()
    qtbot.waitExposed(editor)
    canvas = editor.canvas
    selections = []
    canvas.sig_selection_changed.connect(selections.append)
    QTest.mouseClick(canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, canvas.cell_center(0, 2))
    assert selections[-1] == (0, 6)  # the whole stage
    QTest.mouseClick(canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, canvas.cell_center(1, 8))
    assert selections[-1] == (6, 12)
    canvas._set_selection((1, 8, 9))  # one layer picked
    QTest.mouseClick(canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.ShiftModifier, canvas.cell_center(1, 10))
    assert selections[-1] == (8, 11)
    QTest.mouseClick(canvas, Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier, canvas.cell_center(2, 3))
    assert selections[-1] is None  # an empty cell clears the selection
