"""MainWindow: devices, generation settings, layout editor, chat and charts; wires their signals.

It owns the bridge (the engine on its worker thread), the two item models and the settings, and
holds no engine logic: layout rules live in app/layout_plan.py, the engine behind app/bridge.py.
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import replace

from PySide6.QtCore import QByteArray, Qt
from PySide6.QtWidgets import QLabel, QMainWindow, QSplitter, QVBoxLayout, QWidget

from app.bridge import EngineBridge
from app.devices import DeviceInfo, find, with_speeds, with_state
from app.layout_plan import ModelShape, suggest
from app.messages import EnginePlan, EngineReady, EngineState, StageLostReport
from app.models.device_list_model import DeviceListModel
from app.models.layout_model import LayoutModel
from app.settings import AppSettings, ChatPreferences
from app.widgets.charts_panel import ChartsPanel
from app.widgets.chat_panel import ChatPanel
from app.widgets.device_panel import DevicePanel
from app.widgets.fault_banner import FaultBanner
from app.widgets.generation_panel import GenerationPanel
from app.widgets.layout_editor import LayoutEditor
from engine.config import SamplingConfig, SessionConfig, SpeculationConfig
from engine.events import RequestFailed
from engine.layout import Layout, LayoutError

logger = logging.getLogger(__name__)


class MainWindow(QMainWindow):
    def __init__(self, bridge: EngineBridge, settings: AppSettings, model_ref: str, dtype: str = "bf16",
                 devices: tuple[DeviceInfo, ...] = (), auto_apply: bool = False) -> None:
        super().__init__()
        self.setWindowTitle("FlowSpec Studio")
        self.bridge = bridge
        self.settings = settings
        self.model_ref = model_ref
        self.dtype = dtype
        self.auto_apply = auto_apply
        self.plan: EnginePlan | None = None
        self.device_model = DeviceListModel(self)
        self.layout_model = LayoutModel(self)
        self.devices_panel = DevicePanel(self.device_model)
        self.generation = GenerationPanel()
        self.editor = LayoutEditor(self.layout_model)
        self.chat = ChatPanel()
        self.banner = FaultBanner()
        self.charts = ChartsPanel()
        self.state_label = QLabel("Starting …")
        self.statusBar().addWidget(self.state_label, 1)
        self._build()
        self._restore(settings)
        self._wire()
        self.set_devices(devices)

    # --- construction

    def _build(self) -> None:
        left = QSplitter(Qt.Orientation.Vertical)
        left.addWidget(self.devices_panel)
        left.addWidget(self.generation)
        left.setStretchFactor(0, 1)
        chat_box = QWidget()
        box = QVBoxLayout(chat_box)
        box.setContentsMargins(8, 0, 8, 0)
        box.addWidget(self.banner)
        box.addWidget(self.chat, 1)
        centre = QSplitter(Qt.Orientation.Vertical)
        centre.addWidget(self.editor)
        centre.addWidget(chat_box)
        centre.setStretchFactor(1, 1)
        self.main_splitter = QSplitter(Qt.Orientation.Horizontal)
        self.main_splitter.addWidget(left)
        self.main_splitter.addWidget(centre)
        self.main_splitter.addWidget(self.charts)
        self.main_splitter.setStretchFactor(1, 2)
        self.main_splitter.setStretchFactor(2, 1)
        self.main_splitter.setSizes([360, 760, 480])
        self.splitters = (self.main_splitter, left, centre)
        self.setCentralWidget(self.main_splitter)
        self.resize(1600, 960)

    def _wire(self) -> None:
        b = self.bridge
        b.sig_model_inspected.connect(self._on_model_inspected)
        b.sig_load_progress.connect(self.editor.on_load_progress)
        b.sig_engine_ready.connect(self._on_engine_ready)
        b.sig_engine_state.connect(self._on_engine_state)
        b.sig_text_accepted.connect(self.chat.on_text_accepted)
        b.sig_step_stats.connect(self.charts.on_step_stats)
        b.sig_request_finished.connect(self.chat.on_request_finished)
        b.sig_request_failed.connect(self._on_request_failed)
        b.sig_stage_lost.connect(self._on_stage_lost)
        b.sig_speeds_measured.connect(self._on_speeds_measured)
        b.sig_engine_error.connect(self._on_engine_error)
        self.editor.sig_apply_requested.connect(self.apply_layout)
        self.editor.sig_cancel_requested.connect(b.cancel_load)
        self.editor.sig_layout_file_changed.connect(self._on_layout_file_changed)
        self.chat.sig_prompt_submitted.connect(self._on_prompt_submitted)
        self.chat.sig_stop_requested.connect(b.stop)
        self.chat.clear_button.clicked.connect(self._on_new_chat)
        self.banner.sig_replan_requested.connect(self.replan_and_continue)
        self.banner.sig_retry_requested.connect(self.retry_and_continue)

    def start(self) -> None:
        """Start the engine thread and read the model (call after show(): torch loads there, not here)."""
        self.bridge.start()
        self.state_label.setText(f"Reading {self.model_ref} …")
        self.bridge.inspect_model(self.model_ref, self.dtype)

    # --- devices

    def set_devices(self, devices: tuple[DeviceInfo, ...]) -> None:
        self.device_model.set_devices(devices)
        self.layout_model.set_devices(devices)

    @property
    def devices(self) -> tuple[DeviceInfo, ...]:
        return self.device_model.devices

    def _on_speeds_measured(self, speeds) -> None:
        self.set_devices(with_speeds(self.devices, dict(speeds)))

    # --- layout and loading

    def _on_model_inspected(self, shape: ModelShape) -> None:
        self.layout_model.set_shape(shape)
        self.state_label.setText(f"{shape.name}: {shape.n_layers} layers")
        restored = False
        if self.settings.last_layout:
            try:
                restored = self.layout_model.set_layout(Layout.from_text(self.settings.last_layout, "last layout"))
            except LayoutError as error:
                logger.info("last layout not usable: %s", error)
        if not restored:
            self.editor.suggest()
        if self.auto_apply and self.layout_model.layout is not None:
            self.apply_layout(self.layout_model.layout)

    def apply_layout(self, layout: Layout) -> None:
        self.plan = EnginePlan(self.model_ref, replace(layout, model=self.model_ref), self.dtype)
        self.editor.begin_loading(layout)
        self.chat.set_ready(False, "Loading the stages …")
        self.bridge.load(self.plan)

    def _on_engine_ready(self, ready: EngineReady) -> None:
        self.settings = replace(self.settings, last_layout=ready.plan.layout.to_text())
        used = {s.device_id for s in ready.plan.layout.stages}
        devices = self.devices
        for device in devices:
            if device.device_id in used and device.state == "online":
                devices = with_state(devices, device.device_id, "busy")
        self.set_devices(devices)
        self.editor.end_loading(True, f"Stages loaded in {ready.seconds:.1f} s. Type a prompt in the chat.")
        self.chat.set_ready(True, f"Ready: {len(ready.plan.bounds)} stages.")
        self.banner.hide()

    def _on_engine_state(self, state: EngineState) -> None:
        text = {"loading": "Loading", "ready": "Ready", "generating": "Generating", "lost": "Stage lost",
                "error": "Error", "idle": "Idle", "closed": "Closed"}[state.state]
        self.state_label.setText(f"{text}{': ' + state.message if state.message else ''}")
        if state.state in ("idle", "error"):
            self.editor.end_loading(False, state.message or text)
            self.chat.set_ready(False, state.message)
        if state.state == "ready":
            self.chat.set_generating(False)

    def _on_layout_file_changed(self, path: str) -> None:
        self.settings = replace(self.settings, last_layout_path=path)

    # --- chat

    def session_config(self) -> SessionConfig:
        return self.generation.config()

    def _on_prompt_submitted(self, text: str) -> None:
        self.bridge.submit(text, self.session_config())

    def _on_new_chat(self) -> None:
        self.chat.clear()
        self.bridge.reset_conversation()

    def _on_request_failed(self, event: RequestFailed) -> None:
        self.chat.show_error(f"The answer failed: {event.reason}")

    def _on_engine_error(self, text: str) -> None:
        self.state_label.setText(f"Error: {text}")
        self.editor.show_message(text, "error")
        self.chat.show_error(text)

    # --- faults

    def _on_stage_lost(self, report: StageLostReport) -> None:
        device = find(self.devices, report.device_id) if report.device_id else None
        if report.device_id:
            self.set_devices(with_state(self.devices, report.device_id, "lost"))
        for d in self.devices:  # the ring is down: the others are idle again
            if d.state == "busy":
                self.set_devices(with_state(self.devices, d.device_id, "online"))
        name = device.name if device else (report.device_id or "a device")
        self.chat.mark_cut(f"cut short: {name} was lost")
        self.chat.set_ready(False, f"{name} was lost.")
        try:
            plan = suggest(self.layout_model.shape, self.devices)
            offer = f"Re-plan: {len(plan.layout.stages)} stages on the remaining devices."
            self.banner.replan_button.setEnabled(True)
        except (LayoutError, AttributeError) as error:
            offer = f"The remaining devices cannot hold the model ({error})."
            self.banner.replan_button.setEnabled(False)
        self.banner.show_report(report, name, offer)

    def replan_and_continue(self) -> None:
        """Lay the model out on the devices still online and continue the cut answer there."""
        try:
            suggestion = suggest(self.layout_model.shape, self.devices)
        except LayoutError as error:
            self.editor.show_message(f"Cannot re-plan: {error}", "error")
            return
        self.layout_model.set_layout(suggestion.layout)
        self._continue_on(suggestion.layout)

    def retry_and_continue(self) -> None:
        """The lost device is back: mark it online and load the same layout again."""
        if self.plan is None or self.banner.report is None:
            return
        if self.banner.report.device_id:
            self.set_devices(with_state(self.devices, self.banner.report.device_id, "online"))
        self._continue_on(self.plan.layout)

    def _continue_on(self, layout: Layout) -> None:
        self.banner.hide()
        self.plan = EnginePlan(self.model_ref, replace(layout, model=self.model_ref), self.dtype)
        self.editor.begin_loading(layout)
        self.chat.continue_answer()
        self.bridge.resume(self.plan, self.session_config())

    # --- settings

    def _restore(self, settings: AppSettings) -> None:
        if settings.geometry:
            self.restoreGeometry(QByteArray(base64.b64decode(settings.geometry)))
        if settings.window_state:
            try:
                states = json.loads(settings.window_state)
                for splitter, state in zip(self.splitters, states):
                    splitter.restoreState(QByteArray(base64.b64decode(state)))
            except (ValueError, TypeError):
                logger.info("window state not restored")
        c = settings.chat
        self.generation.set_config(SessionConfig(
            strategy=c.strategy, max_new_tokens=c.max_new_tokens,
            speculation=SpeculationConfig(topk=c.topk, depth=c.depth, budget=c.budget, segment_max=c.segment_max,
                                          expand=c.expand),
            sampling=SamplingConfig(temperature=c.temperature, seed=c.seed)))
        self.chat.highlight.setChecked(c.highlight_drafts)

    def current_settings(self) -> AppSettings:
        config = self.session_config()
        chat = ChatPreferences(config.strategy, config.sampling.temperature, config.max_new_tokens,
                               config.sampling.seed, config.speculation.topk, config.speculation.depth,
                               config.speculation.budget, config.speculation.segment_max, config.speculation.expand,
                               self.chat.highlight.isChecked())
        states = [base64.b64encode(bytes(s.saveState().data())).decode("ascii") for s in self.splitters]
        return replace(self.settings, geometry=base64.b64encode(bytes(self.saveGeometry().data())).decode("ascii"),
                       window_state=json.dumps(states), model=self.model_ref, chat=chat)

    def closeEvent(self, event) -> None:
        from app.settings import save_settings

        try:
            save_settings(self.current_settings())
        except OSError as error:
            logger.error("cannot save settings: %s", error)
        self.bridge.close()
        super().closeEvent(event)
