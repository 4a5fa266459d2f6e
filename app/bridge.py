"""EngineBridge: the one object through which the window drives the engine (STYLE.md S2, S10).

The engine (model, stages, session) lives on a worker QThread inside `EngineWorker`; the window
calls the bridge's methods on the GUI thread, which reach the worker only through queued signals,
and the worker's signals come back queued to the GUI thread. The worker runs one `Session.step()`
per event-loop turn and re-arms itself with `QTimer.singleShot(0, ...)`, so Stop, Apply and close
get in between pipeline turns and the window never freezes. torch and transformers are imported
by the worker the first time it needs them, never on the GUI thread.
"""

from __future__ import annotations

import logging
import threading

from PySide6.QtCore import QObject, QThread, Signal

from app.messages import EnginePlan
from app.worker import LoadCancelled, EngineWorker
from engine.config import SessionConfig

logger = logging.getLogger(__name__)

CLOSE_WAIT_MS = 15_000

__all__ = ["EngineBridge", "LoadCancelled"]


class EngineBridge(QObject):
    # --- Signals (all delivered on the GUI thread)
    sig_model_inspected = Signal(object)
    """app.layout_plan.ModelShape of the model the layout editor shows."""
    sig_load_progress = Signal(object)
    """app.messages.LoadProgress while Apply loads the stages."""
    sig_engine_ready = Signal(object)
    """app.messages.EngineReady: the stages are loaded."""
    sig_engine_state = Signal(object)
    """app.messages.EngineState for the status bar and the buttons."""
    sig_text_accepted = Signal(object)
    """app.messages.AcceptedText: the text one verification added, split by draft / target."""
    sig_step_stats = Signal(object)
    """engine.events.StepStats once per verification."""
    sig_request_finished = Signal(object)
    """engine.events.RequestFinished: the answer is complete (or stopped)."""
    sig_request_failed = Signal(object)
    """engine.events.RequestFailed that is not a lost stage."""
    sig_stage_lost = Signal(object)
    """app.messages.StageLostReport: a stage stopped; the conversation is kept."""
    sig_speeds_measured = Signal(object)
    """tuple[(device_id, ms_per_layer), ...] measured by the last answer."""
    sig_engine_error = Signal(str)
    """An unexpected engine error, to show in the window."""
    sig_local_agents_started = Signal(object)
    """tuple[app.local_agents.LocalAgent, ...] started and paired on loopback."""
    sig_paired = Signal(object)
    """app.devices.DeviceInfo of an agent this window just paired with (from its Hello)."""

    # private: GUI thread -> worker thread (queued)
    _req_inspect = Signal(str, str)
    _req_load = Signal(object)
    _req_submit = Signal(str, object)
    _req_resume = Signal(object, object)
    _req_stop = Signal()
    _req_reset = Signal()
    _req_local_agents = Signal(int)
    _req_pair = Signal(str, str)
    _req_close = Signal()

    def __init__(self, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self._thread: QThread | None = None
        self._worker: EngineWorker | None = None
        self._cancel_load = threading.Event()
        self._stuck: tuple | None = None

    # --- lifecycle

    def start(self) -> None:
        """Start the worker thread (the window calls this after it is shown)."""
        if self._thread is not None:
            return
        self._thread = QThread()
        self._thread.setObjectName("engine")
        self._worker = EngineWorker(self._cancel_load)
        self._worker.moveToThread(self._thread)
        self._thread.finished.connect(self._worker.deleteLater)
        w = self._worker
        for name in ("model_inspected", "load_progress", "engine_ready", "engine_state", "text_accepted",
                     "step_stats", "request_finished", "request_failed", "stage_lost", "speeds_measured",
                     "engine_error", "local_agents_started", "paired"):
            getattr(w, f"sig_{name}").connect(getattr(self, f"sig_{name}"))
        self._req_inspect.connect(w.inspect_model)
        self._req_load.connect(w.load)
        self._req_submit.connect(w.submit)
        self._req_resume.connect(w.resume)
        self._req_stop.connect(w.stop)
        self._req_reset.connect(w.reset_conversation)
        self._req_local_agents.connect(w.start_local_agents)
        self._req_pair.connect(w.pair)
        self._req_close.connect(w.shutdown)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.isRunning()

    def close(self) -> None:
        """Close the engine on its thread (stage processes end), then stop the thread and wait for it."""
        if self._thread is None:
            return
        self._cancel_load.set()
        self._req_close.emit()
        if not self._thread.wait(CLOSE_WAIT_MS):
            # Keep the QThread object alive: destroying a running QThread aborts the process.
            logger.error("the engine thread did not stop within %d ms; it ends with the process", CLOSE_WAIT_MS)
            self._stuck = (self._thread, self._worker)
        self._thread = None
        self._worker = None

    # --- requests (GUI thread)

    def inspect_model(self, ref: str, dtype: str = "bf16") -> None:
        """Read the model's shape (layers, bytes per layer) for the layout editor; no weights are loaded."""
        self._req_inspect.emit(ref, dtype)

    def load(self, plan: EnginePlan) -> None:
        """Load the stages of ``plan`` (replacing any running engine); progress comes as sig_load_progress."""
        self._cancel_load.clear()
        self._req_load.emit(plan)

    def cancel_load(self) -> None:
        """Stop a load in progress at its next step; the stages started so far are shut down."""
        self._cancel_load.set()

    def submit(self, prompt: str, config: SessionConfig) -> None:
        self._req_submit.emit(prompt, config)

    def resume(self, plan: EnginePlan, config: SessionConfig) -> None:
        """Load ``plan`` (after a lost stage) and continue the cut answer on it."""
        self._cancel_load.clear()
        self._req_resume.emit(plan, config)

    def stop(self) -> None:
        """Stop the answer being generated; what was accepted so far stays."""
        self._req_stop.emit()

    def start_local_agents(self, n: int) -> None:
        """Start ``n`` agents on loopback and pair with them; sig_local_agents_started says where."""
        self._req_local_agents.emit(n)

    def pair(self, address: str, code: str) -> None:
        self._req_pair.emit(address, code)

    def reset_conversation(self) -> None:
        """Start a new chat: the engine forgets the earlier messages."""
        self._req_reset.emit()
