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

from app.agents import AgentDevices
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
                 devices: tuple[DeviceInfo, ...] = (), auto_apply: bool = False, agents: AgentDevices | None = None,
                 local_agents: int = 0) -> None:
        super().__init__()
        self.setWindowTitle("FlowSpec Studio")
        self.bridge = bridge
        self.settings = settings
        self.model_ref = model_ref
        self.dtype = dtype
        self.auto_apply = auto_apply
        self.agents = agents
        self.local_agents = local_agents
        self.plan: EnginePlan | None = None
        self._local_devices: tuple[DeviceInfo, ...] = tuple(devices)
        self._agent_devices: tuple[DeviceInfo, ...] = ()
        self.local_agent_pids: tuple[int, ...] = ()
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
        self._show_devices()

    # --- construction

    def _build(self) -> None:
        """Top: devices beside the layout editor. Bottom: generation settings, chat, live charts."""
        chat_box = QWidget()
        box = QVBoxLayout(chat_box)
        box.setContentsMargins(8, 0, 8, 0)
        box.addWidget(self.banner)
        box.addWidget(self.chat, 1)
        top = QSplitter(Qt.Orientation.Horizontal)
        top.addWidget(self.devices_panel)
        top.addWidget(self.editor)
        top.setStretchFactor(1, 1)
        top.setSizes([560, 1040])
        bottom = QSplitter(Qt.Orientation.Horizontal)
        bottom.addWidget(self.generation)
        bottom.addWidget(chat_box)
        bottom.addWidget(self.charts)
        bottom.setStretchFactor(1, 1)
        bottom.setSizes([300, 700, 600])
        self.main_splitter = QSplitter(Qt.Orientation.Vertical)
        self.main_splitter.addWidget(top)
        self.main_splitter.addWidget(bottom)
        self.main_splitter.setStretchFactor(1, 1)
        self.main_splitter.setSizes([300, 700])
        self.splitters = (self.main_splitter, top, bottom)
        self.setCentralWidget(self.main_splitter)
        self.resize(1600, 1000)

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
        self.devices_panel.sig_add_requested.connect(self._on_add_requested)
        self.devices_panel.sig_pair_requested.connect(self._on_pair_requested)
        b.sig_local_agents_started.connect(self._on_local_agents_started)
        if self.agents is not None:
            b.sig_paired.connect(self.agents.on_paired)
            self.agents.sig_devices_changed.connect(self._on_agent_devices)

    def start(self) -> None:
        """Start the engine thread and read the model (call after show(): torch loads there, not here)."""
        self.bridge.start()
        if self.agents is not None:
            self.agents.start()
        if self.local_agents > 0:
            self.bridge.start_local_agents(self.local_agents)
        self.state_label.setText(f"Reading {self.model_ref} …")
        self.bridge.inspect_model(self.model_ref, self.dtype)

    # --- devices: local stage workers and agents

    @property
    def devices(self) -> tuple[DeviceInfo, ...]:
        return self.device_model.devices

    def set_devices(self, devices: tuple[DeviceInfo, ...]) -> None:
        """Replace the device states the engine side reports (local workers and agents alike)."""
        self._local_devices = tuple(d for d in devices if d.source == "local")
        self._show_devices()

    def _on_agent_devices(self, devices: tuple[DeviceInfo, ...]) -> None:
        self._agent_devices = devices
        self._show_devices()
        self._maybe_auto_apply()
        self._update_retry()

    def _update_retry(self) -> None:
        """While the banner shows a lost agent, "Retry same layout" is offered once it is back."""
        report = self.banner.report
        if not self.banner.isVisible() or report is None or not report.device_id:
            return
        device = find(self.devices, report.device_id)
        back = device is not None and (device.source == "local" or device.usable)
        self.banner.retry_button.setEnabled(back)
        self.banner.retry_button.setToolTip("" if back else f"Waiting for {report.device_id} to come back")

    def _show_devices(self) -> None:
        """The list shows every device; the layout's lanes are the usable agents when there are any
        (a ring runs on agents or on local processes, not both), else the local workers."""
        everything = self._local_devices + self._agent_devices
        self.device_model.set_devices(everything)
        usable_agents = any(d.usable for d in self._agent_devices)
        lanes = self._agent_devices if usable_agents or not self._local_devices else (
            self._local_devices + tuple(d for d in self._agent_devices if d.state == "unpaired"))
        self.layout_model.set_devices(lanes)

    def _on_speeds_measured(self, speeds) -> None:
        speeds = dict(speeds)
        self.set_devices(with_speeds(self._local_devices, speeds))
        if self.agents is not None:
            self.agents.set_speeds(speeds)

    def _mark(self, device_id: str, state: str) -> None:
        self.set_devices(with_state(self._local_devices, device_id, state))
        if state == "lost" and self.agents is not None and find(self._agent_devices, device_id):
            self.agents.mark_lost(device_id)

    def _on_add_requested(self, address: str) -> None:
        if self.agents is None:
            self.devices_panel.set_message("Device discovery is off in this window.")
            return
        try:
            self.agents.add(address)
        except ValueError as error:
            self.devices_panel.set_message(str(error))
            return
        self.devices_panel.set_message(f"Watching {address}; it appears here when it answers.")

    def _on_pair_requested(self, device_id: str, code: str) -> None:
        device = find(self.devices, device_id)
        if device is not None:
            self.devices_panel.set_message(f"Pairing with {device.name} …")
            self.bridge.pair(device.address, code)

    def _on_local_agents_started(self, agents) -> None:
        self.local_agent_pids = tuple(agent.pid for agent in agents)
        for agent in agents:
            self.agents.add(agent.address)
        self.devices_panel.set_message(f"{len(agents)} local agents started on 127.0.0.1 and paired.")

    def _maybe_auto_apply(self) -> None:
        """With --local-agents N: lay out and load once the model is read and N agents answer."""
        ready = sum(d.usable for d in self._agent_devices) >= self.local_agents
        if not (self.auto_apply and self.local_agents and ready and self.layout_model.shape is not None):
            return
        self.auto_apply = False
        if self._restore_last_layout() or self.editor.suggest():
            self.apply_layout(self.layout_model.layout)

    def _restore_last_layout(self) -> bool:
        """The layout applied last time, if these devices can run it."""
        if not self.settings.last_layout:
            return False
        try:
            layout = Layout.from_text(self.settings.last_layout, "the last layout")
        except LayoutError as error:
            logger.info("last layout not usable: %s", error)
            return False
        if layout.model not in (None, self.model_ref):
            return False
        return self.layout_model.set_layout(layout)

    # --- layout and loading

    def _on_model_inspected(self, shape: ModelShape) -> None:
        self.layout_model.set_shape(shape)
        self.state_label.setText(f"{shape.name}: {shape.n_layers} layers")
        restored = False if self.local_agents else self._restore_last_layout()
        if not restored and not self.local_agents:  # with local agents, _maybe_auto_apply suggests
            self.editor.suggest()
        if self.local_agents:
            self._maybe_auto_apply()
        elif self.auto_apply and self.layout_model.layout is not None:
            self.auto_apply = False
            self.apply_layout(self.layout_model.layout)

    def _plan(self, layout: Layout) -> EnginePlan | None:
        sources = {(find(self.devices, s.device_id) or DeviceInfo(s.device_id, "", "")).source for s in layout.stages}
        if "local" in sources and len(sources) > 1:
            self.editor.show_message("A layout runs on agents or on this computer's worker processes, not both: "
                                     "move the local stages onto agents.", "error")
            return None
        return EnginePlan(self.model_ref, replace(layout, model=self.model_ref), self.dtype,
                          on_agents="local" not in sources)

    def apply_layout(self, layout: Layout) -> None:
        plan = self._plan(layout)
        if plan is None:
            return
        self.plan = plan
        self.editor.begin_loading(layout)
        self.chat.set_ready(False, "Loading the stages …")
        self.bridge.load(self.plan)

    def _on_engine_ready(self, ready: EngineReady) -> None:
        self.settings = replace(self.settings, last_layout=ready.plan.layout.to_text())
        used = {s.device_id for s in ready.plan.layout.stages}
        devices = self._local_devices
        for device in devices:
            if device.device_id in used and device.state == "online":
                devices = with_state(devices, device.device_id, "busy")
        self.set_devices(devices)
        self.editor.end_loading(True, f"Stages loaded in {ready.seconds:.1f} s. Type a prompt in the chat.")
        n = len(ready.plan.bounds)
        self.chat.set_ready(True, f"Ready: {n} stage{'s' if n > 1 else ''}.")
        self.banner.hide()

    def _on_engine_state(self, state: EngineState) -> None:
        text = {"loading": "Loading", "ready": "Ready", "generating": "Generating", "lost": "Stage lost",
                "error": "Error", "idle": "Idle", "closed": "Closed"}[state.state]
        self.state_label.setText(f"{text}{': ' + state.message if state.message else ''}")
        if state.state == "error" or (state.state == "idle" and self.editor.cancel_button.isVisible()):
            self.editor.end_loading(False, state.message or text, "error" if state.state == "error" else "info")
            self.chat.set_ready(False, state.message)
        elif state.state == "ready":
            self.chat.set_generating(False)
        elif state.state == "generating":
            self.chat.set_generating(True)

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
        for d in self._local_devices:  # the ring is down: the other local workers are idle again
            if d.state == "busy":
                self.set_devices(with_state(self._local_devices, d.device_id, "online"))
        if report.device_id:
            self._mark(report.device_id, "lost")
        name = device.name if device else (report.device_id or "a device")
        self.chat.mark_cut(f"cut short: {name} was lost")
        self.chat.set_ready(False, f"{name} was lost.")
        try:
            plan = suggest(self.layout_model.shape, self.devices)
            n = len(plan.layout.stages)
            offer = f"Re-plan: {n} stage{'s' if n > 1 else ''} on the devices still online."
            self.banner.replan_button.setEnabled(True)
        except (LayoutError, AttributeError) as error:
            offer = f"The remaining devices cannot hold the model ({error})."
            self.banner.replan_button.setEnabled(False)
        self.banner.show_report(report, name, offer)
        self._update_retry()
        self.editor.show_message(f"{name} was lost. Re-plan from the banner above the chat, or change the "
                                 "layout here and press Apply.", "error")

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
            self.set_devices(with_state(self._local_devices, self.banner.report.device_id, "online"))
            if self.agents is not None:
                self.agents.mark_found(self.banner.report.device_id)
        self._continue_on(self.plan.layout)

    def _continue_on(self, layout: Layout) -> None:
        plan = self._plan(layout)
        if plan is None:
            return
        self.banner.hide()
        self.plan = plan
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
        if self.agents is not None:
            self.agents.close()
        super().closeEvent(event)
