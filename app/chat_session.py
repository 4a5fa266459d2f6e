"""ChatSession: engine.session.Session plus resuming an answer that a lost stage cut short.

Imported only on the bridge's worker thread (it loads torch through engine.session).
After a stage is lost the app builds a new engine on the remaining devices; `resume` continues
the last user turn's answer from the token ids already shown, so the user keeps the partial
answer and the continuation is what the model would have said (exactly so under greedy decoding).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from engine.config import SessionConfig
from engine.events import RequestFinished, RequestId
from engine.session import Session, TextStream

logger = logging.getLogger(__name__)


class ChatSession(Session):
    """A Session whose conversation can move to a new engine and continue a cut answer."""

    _prefix_ids: tuple[int, ...] = ()

    def submit(self, prompt: str, config: SessionConfig | None = None) -> RequestId:
        self._prefix_ids = ()
        return super().submit(prompt, config)

    def resume(self, answer_ids: Sequence[int], config: SessionConfig | None = None) -> RequestId:
        """Continue the answer to the last user message from ``answer_ids`` (tokens already shown).

        The history must end with that user message. TokensAccepted events carry only the new text.
        """
        if self._coordinator is not None and not self._coordinator.done:
            raise RuntimeError("a request is still running; cancel it or wait for it to finish")
        if not self.history or self.history[-1]["role"] != "user":
            raise RuntimeError("there is no cut answer to continue: send a new message instead")
        self.config = config or self.config
        self._next_id += 1
        request = RequestId(self._next_id)
        self._prefix_ids = tuple(int(t) for t in answer_ids)
        ids = self.engine.encode(self.history) + list(self._prefix_ids)
        self.engine.check_fits(ids, self.config.max_new_tokens)
        self._stream = TextStream(self.engine.tokenizer)
        self._stream.push(self._prefix_ids)
        self._request = request
        self._coordinator = self.engine.coordinator(self.config, self._on_tokens)
        self._coordinator.start(ids)
        return request

    def _finish(self, stopped_by: str) -> None:
        """As Session._finish, but the history and the event hold the whole answer, cut part included."""
        if not self._prefix_ids:
            super()._finish(stopped_by)
            return
        r = self._coordinator.result()
        ids = self._prefix_ids + tuple(r.token_ids)
        text = self.engine.tokenizer.decode(list(ids), skip_special_tokens=True)
        self.history.append({"role": "assistant", "content": text})
        self.on_event(RequestFinished(
            self._request, text, ids, stopped_by, r.seconds, r.ttft_s,
            len(r.token_ids) / r.seconds if r.seconds else 0.0, r.mean_accepted_length,
            r.rounds, r.turns, tuple(r.stage_busy)))
