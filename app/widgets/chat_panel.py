"""ChatPanel: the transcript, the prompt box, Send / Stop, draft highlighting and saving.

Accepted text is appended as it arrives (AcceptedText pieces); pieces that came from the draft can
be shown on a tinted background. Each answer ends with its TTFT, tokens/s and mean accepted length.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from PySide6.QtCore import Signal
from PySide6.QtGui import QColor, QKeySequence, QShortcut, QTextCharFormat, QTextCursor
from PySide6.QtWidgets import (QCheckBox, QFileDialog, QHBoxLayout, QLabel, QPlainTextEdit, QPushButton,
                               QTextBrowser, QVBoxLayout, QWidget)

from app.messages import AcceptedText
from app.widgets.palette import DRAFT_HIGHLIGHT
from engine.events import RequestFinished

logger = logging.getLogger(__name__)


@dataclass
class ChatMessage:
    role: str  # "user" | "assistant"
    pieces: list[tuple[str, bool]] = field(default_factory=list)  # (text, from_draft)
    stats: str = ""
    note: str = ""  # e.g. "cut short: stage 2 lost"

    @property
    def content(self) -> str:
        return "".join(text for text, _ in self.pieces)


def format_stats(event: RequestFinished) -> str:
    return (f"TTFT {event.ttft_s:.2f} s · {event.tokens_per_s:.1f} tok/s · "
            f"accepted {event.mean_accepted_length:.2f} per verification · {len(event.token_ids)} tokens · "
            f"{event.stopped_by.replace('_', ' ')}")


class ChatPanel(QWidget):
    # --- Signals
    sig_prompt_submitted = Signal(str)
    """The user pressed Send; the argument is the prompt text."""
    sig_stop_requested = Signal()
    """The user pressed Stop."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.messages: list[ChatMessage] = []
        self.transcript = QTextBrowser()
        self.transcript.setObjectName("transcript")
        self.transcript.setOpenExternalLinks(False)
        self.prompt = QPlainTextEdit()
        self.prompt.setObjectName("prompt")
        self.prompt.setPlaceholderText("Ask something …  (Ctrl+Enter to send)")
        self.prompt.setFixedHeight(72)
        self.send_button = QPushButton("Send")
        self.send_button.setObjectName("primary")
        self.stop_button = QPushButton("Stop")
        self.stop_button.setEnabled(False)
        self.highlight = QCheckBox("Highlight draft tokens")
        self.highlight.setToolTip("Tint the text that the drafter proposed and the model accepted")
        self.save_button = QPushButton("Save…")
        self.clear_button = QPushButton("New chat")
        self.status = QLabel("")
        self.status.setObjectName("muted")
        self._generating = False
        self._ready = False
        self._build()
        self.send_button.clicked.connect(self._on_send_clicked)
        self.stop_button.clicked.connect(self.sig_stop_requested)
        self.highlight.toggled.connect(self._render_all)
        self.save_button.clicked.connect(self._on_save_clicked)
        QShortcut(QKeySequence("Ctrl+Return"), self.prompt, activated=self._on_send_clicked)
        self._update_buttons()

    def _build(self) -> None:
        top = QHBoxLayout()
        title = QLabel("Chat")
        title.setObjectName("panelTitle")
        top.addWidget(title)
        top.addStretch(1)
        top.addWidget(self.highlight)
        top.addWidget(self.clear_button)
        top.addWidget(self.save_button)
        row = QHBoxLayout()
        row.addWidget(self.prompt, 1)
        buttons = QVBoxLayout()
        buttons.addWidget(self.send_button)
        buttons.addWidget(self.stop_button)
        buttons.addStretch(1)
        row.addLayout(buttons)
        box = QVBoxLayout(self)
        box.setContentsMargins(10, 8, 10, 8)
        box.addLayout(top)
        box.addWidget(self.transcript, 1)
        box.addWidget(self.status)
        box.addLayout(row)

    # --- state

    def set_ready(self, ready: bool, status: str = "") -> None:
        """Whether a model is loaded and prompts can be sent."""
        self._ready = ready
        if status:
            self.status.setText(status)
        self._update_buttons()

    def set_generating(self, generating: bool) -> None:
        self._generating = generating
        self._update_buttons()

    def _update_buttons(self) -> None:
        self.send_button.setEnabled(self._ready and not self._generating)
        self.stop_button.setEnabled(self._generating)

    def _on_send_clicked(self) -> None:
        text = self.prompt.toPlainText().strip()
        if not text or not self.send_button.isEnabled():
            return
        self.prompt.clear()
        self.add_user_message(text)
        self.set_generating(True)
        self.sig_prompt_submitted.emit(text)

    # --- transcript

    def add_user_message(self, text: str) -> None:
        self.messages.append(ChatMessage("user", [(text, False)]))
        self.messages.append(ChatMessage("assistant"))
        self._render_all()

    def on_text_accepted(self, event: AcceptedText) -> None:
        if not self.messages or self.messages[-1].role != "assistant":
            self.messages.append(ChatMessage("assistant"))
        message = self.messages[-1]
        cursor = self.transcript.textCursor()
        cursor.movePosition(QTextCursor.MoveOperation.End)
        for text, from_draft in event.pieces:
            message.pieces.append((text, from_draft))
            cursor.insertText(text, self._format(from_draft))
        self.transcript.setTextCursor(cursor)
        self.transcript.ensureCursorVisible()

    def on_request_finished(self, event: RequestFinished) -> None:
        if self.messages and self.messages[-1].role == "assistant":
            message = self.messages[-1]
            shown = message.content
            if event.text != shown and event.text.startswith(shown):  # text held back mid-character
                message.pieces.append((event.text[len(shown):], False))
            message.stats = format_stats(event)
        self.set_generating(False)
        self._render_all()

    def mark_cut(self, note: str) -> None:
        """The answer in progress was cut (a stage was lost); it stays, with a note."""
        if self.messages and self.messages[-1].role == "assistant":
            self.messages[-1].note = note
        self.set_generating(False)
        self._render_all()

    def continue_answer(self) -> None:
        """The cut answer will continue: the note goes, new text appends to the same message."""
        if self.messages and self.messages[-1].role == "assistant":
            self.messages[-1].note = ""
        self.set_generating(True)
        self._render_all()

    def show_error(self, text: str) -> None:
        if self.messages and self.messages[-1].role == "assistant":
            self.messages[-1].note = text
        self.set_generating(False)
        self._render_all()

    def clear(self) -> None:
        self.messages.clear()
        self._render_all()

    def _format(self, from_draft: bool) -> QTextCharFormat:
        fmt = QTextCharFormat()
        if from_draft and self.highlight.isChecked():
            fmt.setBackground(QColor(DRAFT_HIGHLIGHT))
        return fmt

    def _render_all(self) -> None:
        parts = []
        for message in self.messages:
            if message.role == "user":
                parts.append(f'<p class="who"><b>You</b></p><p>{_html(message.content)}</p>')
                continue
            body = "".join(
                f'<span style="background-color:{DRAFT_HIGHLIGHT}">{_html(t)}</span>'
                if d and self.highlight.isChecked() else _html(t) for t, d in message.pieces)
            parts.append(f'<p class="who"><b>Assistant</b></p><p>{body}')
            if message.note:
                parts.append(f'<br><span style="color:#D64541">⚠ {_html(message.note)}</span>')
            if message.stats:
                parts.append(f'<br><span style="color:#8A94A6; font-size:small">{_html(message.stats)}</span>')
            parts.append("</p>")
        self.transcript.setHtml("".join(parts))
        cursor = self.transcript.textCursor()
        cursor.movePosition(QTextCursor.MoveOperation.End)
        self.transcript.setTextCursor(cursor)
        self.transcript.ensureCursorVisible()

    # --- saving

    def conversation(self) -> list[dict]:
        """The conversation as chat messages (role, content) plus each answer's stats."""
        out = []
        for m in self.messages:
            if m.role == "assistant" and not m.pieces and not m.note:
                continue
            item = {"role": m.role, "content": m.content}
            if m.stats:
                item["stats"] = m.stats
            if m.note:
                item["note"] = m.note
            out.append(item)
        return out

    def save_conversation(self, path: str) -> None:
        """JSON (chat messages) for .json, Markdown otherwise. OSError propagates."""
        target = Path(path)
        if target.suffix.lower() == ".json":
            target.write_text(json.dumps(self.conversation(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            return
        lines = []
        for item in self.conversation():
            lines += [f"**{'You' if item['role'] == 'user' else 'Assistant'}:**", "", item["content"], ""]
            if "stats" in item:
                lines += [f"_{item['stats']}_", ""]
        target.write_text("\n".join(lines), encoding="utf-8")

    def _on_save_clicked(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save conversation", str(Path.home() / "conversation.md"),
                                              "Markdown (*.md);;JSON (*.json)")
        if not path:
            return
        try:
            self.save_conversation(path)
            self.status.setText(f"Saved {path}")
        except OSError as error:
            self.status.setText(f"Cannot save {path}: {error.strerror or error}")


def _html(text: str) -> str:
    return html.escape(text).replace("\n", "<br>")



