"""EngineWorker: the engine's owner on the bridge's worker thread (see app/bridge.py).

Everything here runs on that thread. It is the app's boundary for engine failures (STYLE.md S16):
each slot catches what the engine raises, logs it with its traceback and reports it as a signal
(sig_engine_error, sig_request_failed or sig_stage_lost), because an exception escaping a Qt slot
would be lost and leave the window waiting.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import replace

from PySide6.QtCore import QObject, QThread, QTimer, Signal, Slot

from app.messages import (AcceptedText, EnginePlan, EngineReady, EngineState, LoadProgress, StageLostReport)
from engine.config import SessionConfig
from engine.events import EngineEvent, RequestFailed, RequestFinished, StepStats, TokensAccepted

logger = logging.getLogger(__name__)

LIVENESS_INTERVAL_MS = 500
_STAGE_IN_MESSAGE = re.compile(r"stage (\d+)/(\d+)")


_WEIGHTS = re.compile(r"weights ([\d.]+)/([\d.]+) MiB")


def _stage_fraction(text: str) -> float:
    """How far one stage's start-up line says it is: spawned, weights sent (agents), loading, ready."""
    if "ready" in text:
        return 1.0
    match = _WEIGHTS.search(text)
    if match and float(match.group(2)) > 0:
        return 0.1 + 0.7 * float(match.group(1)) / float(match.group(2))
    if "into memory" in text:
        return 0.85
    return 0.4 if "loading" in text else 0.1


class LoadCancelled(Exception):
    """The user cancelled Apply while the stages were loading."""


class EngineWorker(QObject):
    sig_model_inspected = Signal(object)
    sig_load_progress = Signal(object)
    sig_engine_ready = Signal(object)
    sig_engine_state = Signal(object)
    sig_text_accepted = Signal(object)
    sig_step_stats = Signal(object)
    sig_request_finished = Signal(object)
    sig_request_failed = Signal(object)
    sig_stage_lost = Signal(object)
    sig_speeds_measured = Signal(object)
    sig_engine_error = Signal(str)
    sig_local_agents_started = Signal(object)
    sig_paired = Signal(object)

    def __init__(self, cancel_load: threading.Event) -> None:
        super().__init__()
        self._cancel_load = cancel_load
        self._engine = None
        self._session = None
        self._plan: EnginePlan | None = None
        self._history: list[dict] = []
        self._stream = None  # TextStream splitting accepted text into draft / target pieces
        self._answer_ids: list[int] = []
        self._liveness: QTimer | None = None
        self._generating = False
        self._local_agents = None

    # --- slots (entered only through queued signals)

    @Slot(str, str)
    def inspect_model(self, ref: str, dtype: str) -> None:
        """Resolve ``ref`` and read its shape; a bad reference becomes sig_engine_error."""
        try:
            from app.layout_plan import shape_from_config
            from engine.models import model_info, resolve_model

            resolved = resolve_model(ref, progress=False)
            info = model_info(resolved)
            config = json.loads((resolved.path / "config.json").read_text(encoding="utf-8"))
            self.sig_model_inspected.emit(shape_from_config(ref, info.name, config, info.n_params, dtype))
        except Exception as error:  # boundary: any failure to read the model is shown, not lost
            logger.exception("cannot read model %s", ref)
            self.sig_engine_error.emit(f"Cannot open model {ref}: {error}")

    @Slot(object)
    def load(self, plan: EnginePlan) -> bool:
        """Replace the engine with one for ``plan``; True when it is ready."""
        self._close_engine()
        self.sig_engine_state.emit(EngineState("loading", f"Loading {plan.model} on {len(plan.bounds)} stages"))
        t0 = time.monotonic()
        try:
            from app.chat_session import ChatSession
            from engine.session import Engine, EngineSpec

            ring_factory = None
            if plan.on_agents:
                from engine.agent_cli import agent_ring_factory

                ring_factory = agent_ring_factory(plan.layout, "this layout")
            spec = EngineSpec(model=plan.model, bounds=plan.bounds, n_stages=len(plan.bounds), dtype=plan.dtype,
                              draft=plan.draft, ring_factory=ring_factory)
            self._plan = plan
            self._engine = Engine(spec, on_progress=self._on_progress)
            self._session = ChatSession(self._engine, SessionConfig(), self._on_event)
            self._session.history = self._history
        except LoadCancelled:
            self._close_engine()
            self.sig_engine_state.emit(EngineState("idle", "Loading cancelled"))
            return False
        except Exception as error:  # boundary: a failed load (missing weights, a stage that died) is shown
            logger.exception("loading %s failed", plan.model)
            self._close_engine()
            self.sig_engine_state.emit(EngineState("error", str(error)))
            self.sig_engine_error.emit(f"Loading the stages failed: {error}")
            return False
        pids = tuple(getattr(self._engine.ring, "pids", ()))
        for i, stage in enumerate(plan.layout.stages):
            self.sig_load_progress.emit(LoadProgress(i, stage.device_id, 1.0, "ready"))
        self.sig_engine_ready.emit(EngineReady(plan, time.monotonic() - t0, pids))
        n = len(plan.bounds)
        self.sig_engine_state.emit(EngineState("ready", f"{plan.model} ready on {n} stage{'s' if n > 1 else ''}"))
        self._start_liveness()
        return True

    @Slot(str, object)
    def submit(self, prompt: str, config: SessionConfig) -> None:
        if self._session is None:
            self.sig_engine_error.emit("No model is loaded: press Apply in the layout editor first.")
            return
        try:
            self._begin_answer()
            self._session.submit(prompt, config)
        except Exception as error:  # boundary: a refused prompt (too long, a request running) is shown
            logger.exception("submit failed")
            # the ring broke while idle (an agent went away); matched by name: the app does not import
            # the coordinator (see the import contract in pyproject.toml)
            if type(error).__name__ == "StageLost":
                self._report_lost(self._lost_stage(str(error)), str(error), None)
            else:
                self.sig_engine_error.emit(str(error))
            return
        self._generating = True
        self.sig_engine_state.emit(EngineState("generating"))
        QTimer.singleShot(0, self._pump)

    @Slot(object, object)
    def resume(self, plan: EnginePlan, config: SessionConfig) -> None:
        """Load ``plan`` and continue the answer a lost stage cut short."""
        answer = list(self._answer_ids)
        if not self.load(plan):
            return
        left = config.max_new_tokens - len(answer)
        if not answer or left < 1:
            return
        try:
            self._begin_answer(answer)
            self._session.resume(answer, replace(config, max_new_tokens=left))
        except Exception as error:  # boundary: as in submit
            logger.exception("resume failed")
            self.sig_engine_error.emit(str(error))
            return
        self._generating = True
        self.sig_engine_state.emit(EngineState("generating", "Continuing the answer"))
        QTimer.singleShot(0, self._pump)

    @Slot()
    def stop(self) -> None:
        if self._session is not None:
            self._session.cancel()

    @Slot()
    def reset_conversation(self) -> None:
        self._history = []
        if self._session is not None:
            self._session.history = self._history

    @Slot(int)
    def start_local_agents(self, n: int) -> None:
        """Start and pair ``n`` flowspec-agents on loopback (app/local_agents.py)."""
        from app.local_agents import LocalAgents

        self.sig_engine_state.emit(EngineState("loading", f"Starting {n} local agents"))
        try:
            if self._local_agents is None:
                self._local_agents = LocalAgents()
            agents = self._local_agents.start(n, on_progress=lambda text: logger.info("%s", text))
        except Exception as error:  # boundary: an agent that cannot start or pair is shown, not lost
            logger.exception("local agents failed to start")
            self.sig_engine_state.emit(EngineState("error", str(error)))
            self.sig_engine_error.emit(f"Local agents did not start: {error}")
            return
        self.sig_engine_state.emit(EngineState("idle", f"{n} local agents started and paired"))
        self.sig_local_agents_started.emit(tuple(agents))

    @Slot(str, str)
    def pair(self, address: str, code: str) -> None:
        """Pair with the agent at ``address`` and ask it what it has (a Hello)."""
        from app.devices import DeviceInfo
        from engine.agent_client import ClientKeys, hello, pair

        try:
            keys = ClientKeys()
            agent = pair(address, code, keys)
            caps = hello(address, keys, agent.public_key)
        except Exception as error:  # boundary: a wrong code or an unreachable agent is shown
            logger.exception("pairing with %s failed", address)
            self.sig_engine_error.emit(f"Pairing with {address} failed: {error}")
            return
        accelerator = caps.accelerator if not caps.torch_device else f"{caps.accelerator} ({caps.torch_device})"
        self.sig_paired.emit(DeviceInfo(caps.agent_id, caps.name, address, "online", caps.memory_total,
                                        caps.memory_free, accelerator, None, "manual"))

    @Slot()
    def shutdown(self) -> None:
        """Close the engine (its stage processes end), stop local agents, end this thread's event loop."""
        self._close_engine()
        if self._local_agents is not None:
            self._local_agents.close()
        self.sig_engine_state.emit(EngineState("closed"))
        QThread.currentThread().quit()

    # --- generation

    def _pump(self) -> None:
        """One pipeline turn; re-armed while the answer runs. Catches what Session.step lets through."""
        if self._session is None:
            return
        try:
            going = self._session.step()
        except Exception as error:  # boundary: a programming error in the engine must not kill the thread
            logger.exception("engine step failed")
            self._generating = False
            self._session.cancel()
            self.sig_engine_error.emit(f"The engine failed: {error}")
            return
        if going:
            QTimer.singleShot(0, self._pump)
        else:
            self._generating = False

    def _begin_answer(self, prefix: list[int] | None = None) -> None:
        """Start the text stream of an answer; a continued answer keeps the stream that showed its start,
        so text held back at the cut (half a character) is shown once, not lost or repeated."""
        from engine.session import TextStream

        if prefix and self._stream is not None and self._stream.ids == list(prefix):
            self._answer_ids = list(prefix)
            return
        self._answer_ids = list(prefix or [])
        self._stream = TextStream(self._engine.tokenizer)
        self._stream.push(self._answer_ids)

    def _on_event(self, event: EngineEvent) -> None:
        if isinstance(event, TokensAccepted):
            self._on_tokens(event)
        elif isinstance(event, StepStats):
            self.sig_step_stats.emit(event)
        elif isinstance(event, RequestFinished):
            self.sig_request_finished.emit(event)
            self.sig_speeds_measured.emit(self._speeds(event))
            self.sig_engine_state.emit(EngineState("ready"))
        elif isinstance(event, RequestFailed):
            self._on_failed(event)

    def _on_tokens(self, event: TokensAccepted) -> None:
        """Split the accepted tokens: all but the last came from the draft, the last is the target's own.

        (A verification commits the drafted path plus one bonus token; prefill and `ar` commit one.)
        """
        ids = list(event.token_ids)
        self._answer_ids += ids
        drafted, own = self._stream.push(ids[:-1]), self._stream.push(ids[-1:])
        pieces = tuple((text, from_draft) for text, from_draft in ((drafted, True), (own, False)) if text)
        self.sig_text_accepted.emit(AcceptedText(event.request_id, pieces, len(ids)))

    def _on_failed(self, event: RequestFailed) -> None:
        index = self._lost_stage(event.reason)
        if index is None:
            self.sig_request_failed.emit(event)
            self.sig_engine_state.emit(EngineState("ready"))
            return
        self._report_lost(index, event.reason, event.request_id)

    def _report_lost(self, index: int | None, reason: str, request_id=None) -> None:
        device = self._plan.layout.stages[index].device_id if self._plan and index is not None else None
        report = StageLostReport(request_id, index, device, reason, tuple(self._answer_ids if request_id else ()))
        self._close_engine()
        self.sig_stage_lost.emit(report)
        self.sig_engine_state.emit(EngineState("lost", reason))

    def _lost_stage(self, reason: str) -> int | None:
        """Which stage a failure names ("stage 2/3 ... is lost"), else the first stage process that is gone."""
        match = _STAGE_IN_MESSAGE.search(reason)
        if match:
            return int(match.group(1)) - 1
        dead = self._dead_stages()
        return dead[0] if dead else None

    def _dead_stages(self) -> list[int]:
        import psutil

        dead = []
        for i, pid in enumerate(getattr(getattr(self._engine, "ring", None), "pids", ())):
            try:
                if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                    dead.append(i)
            except psutil.NoSuchProcess:
                dead.append(i)
        return dead

    def _speeds(self, event: RequestFinished) -> tuple[tuple[str, float], ...]:
        """Measured ms per layer per segment for each device: its stages' busy time over turns and layers."""
        if self._plan is None or not event.turns or not event.seconds:
            return ()
        per_device: dict[str, list[float]] = {}
        for stage, busy in zip(self._plan.layout.stages, event.stage_busy):
            ms = busy * event.seconds * 1000 / event.turns / stage.n_layers
            if ms > 0:
                per_device.setdefault(stage.device_id, []).append(ms)
        return tuple((device, sum(v) / len(v)) for device, v in per_device.items())

    # --- loading and liveness

    def _on_progress(self, text: str) -> None:
        """Engine start-up lines become per-stage progress; a cancelled Apply stops here."""
        if self._cancel_load.is_set():
            raise LoadCancelled()
        logger.info("%s", text)
        match = _STAGE_IN_MESSAGE.search(text)
        stages = self._plan.layout.stages
        if match is None:
            for i, stage in enumerate(stages):
                self.sig_load_progress.emit(LoadProgress(i, stage.device_id, 0.05, text))
            return
        i = int(match.group(1)) - 1
        fraction = _stage_fraction(text)
        if 0 <= i < len(stages):
            self.sig_load_progress.emit(LoadProgress(i, stages[i].device_id, fraction, text))

    def _start_liveness(self) -> None:
        if self._liveness is None:
            self._liveness = QTimer(self)
            self._liveness.setInterval(LIVENESS_INTERVAL_MS)
            self._liveness.timeout.connect(self._check_liveness)
        self._liveness.start()

    def _check_liveness(self) -> None:
        """While idle, notice a stage process that died (during an answer the ring itself reports it)."""
        if self._engine is None:
            return
        if self._generating:
            return
        dead = self._dead_stages()
        if dead:
            self._report_lost(dead[0], f"stage {dead[0] + 1}/{len(self._plan.bounds)} process ended")

    def _close_engine(self) -> None:
        self._generating = False
        if self._liveness is not None:
            self._liveness.stop()
        if self._session is not None:
            self._history = self._session.history
            self._session.close()
        if self._engine is not None:
            try:
                self._engine.close()
            except Exception:  # boundary: a ring that is already broken may fail to close cleanly
                logger.exception("closing the engine failed")
        self._engine = self._session = None
