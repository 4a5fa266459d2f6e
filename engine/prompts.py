"""Prompt sets for ``flowspec check`` and ``flowspec bench``, read from JSON Lines files.

Terms used in this module:

- *prompt file*: a JSON Lines file, one JSON object per line::

      {"prompt": "Write a haiku about snow.", "category": "instructions"}
      {"prompt": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                  {"role": "user", "content": "Tell me a joke."}], "category": "chat"}
      {"prompt": "Once upon a time", "raw": true, "category": "continuation"}

  ``prompt`` is a string (one user message) or a list of chat messages; ``category`` is optional
  (default ``"other"``); ``raw: true`` marks text the model continues as it is, without the chat
  template. Blank lines are skipped; other keys are ignored, so files with extra fields (ids,
  reference answers) load as they are.
- *chat messages*: ``{"role", "content"}`` objects. An optional ``system`` message comes first;
  then ``user`` and ``assistant`` alternate, starting and ending with ``user`` (the model answers
  the last user message).
- *prompt set*: a prompt file shipped in ``engine/prompts/``, named by its file name without
  ``.jsonl`` (``quick``, ``all``, ``check``, ``heldout``; see ``engine/prompts/README.md``).

Stdlib only. Every problem is a :class:`PromptsError` that names the file and the line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Literal, get_args

Role = Literal["system", "user", "assistant"]
ROLES: tuple[Role, ...] = get_args(Role)
DEFAULT_CATEGORY = "other"


class PromptsError(ValueError):
    """A prompt file or set cannot be used; the message says where and why."""


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a conversation, as chat templates take it."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class Prompt:
    """One prompt: a plain string (a single user message, or raw text) or a conversation.

    ``raw`` prompts are strings fed to the model without a chat template, for continuation.
    """

    text_or_messages: str | tuple[ChatMessage, ...]
    category: str
    raw: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.text_or_messages, list):
            object.__setattr__(self, "text_or_messages", tuple(self.text_or_messages))
        if not isinstance(self.category, str) or not self.category.strip():
            raise PromptsError(f'"category" must be a non-empty string, not {self.category!r}.')
        if not isinstance(self.raw, bool):
            raise PromptsError(f'"raw" must be true or false, not {self.raw!r}.')
        if isinstance(self.text_or_messages, str):
            if not self.text_or_messages.strip():
                raise PromptsError('"prompt" is empty.')
        elif isinstance(self.text_or_messages, tuple):
            if self.raw:
                raise PromptsError('a raw prompt must be a string, not a list of chat messages.')
            _check_conversation(self.text_or_messages)
        else:
            raise PromptsError(
                f'"prompt" must be a string or a list of chat messages, not {type(self.text_or_messages).__name__}.'
            )

    @property
    def is_chat(self) -> bool:
        """True when the prompt is a conversation rather than a single string."""
        return isinstance(self.text_or_messages, tuple)

    def chat_messages(self) -> list[dict[str, str]]:
        """The prompt as ``[{"role", "content"}, ...]`` for a tokenizer's chat template.

        A string becomes one user message. Raises :class:`PromptsError` for raw prompts, which
        must not go through a chat template.
        """
        if self.raw:
            raise PromptsError("a raw prompt is continued as it is; it has no chat messages.")
        if isinstance(self.text_or_messages, str):
            return [{"role": "user", "content": self.text_or_messages}]
        return [{"role": m.role, "content": m.content} for m in self.text_or_messages]


def _check_conversation(messages: tuple[ChatMessage, ...]) -> None:
    """Optional system message first, then user/assistant alternating, starting and ending with user."""
    if not messages:
        raise PromptsError('"prompt" is an empty list of chat messages.')
    expected: Role = "user"
    for number, message in enumerate(messages, start=1):
        if not isinstance(message, ChatMessage):
            raise PromptsError(f"message {number} is a {type(message).__name__}, not a ChatMessage.")
        if message.role not in ROLES:
            raise PromptsError(
                f"message {number} has role {message.role!r}; use 'system', 'user' or 'assistant'."
            )
        if not isinstance(message.content, str) or not message.content.strip():
            raise PromptsError(f'message {number} has no text: "content" must be a non-empty string.')
        if message.role == "system":
            if number != 1:
                raise PromptsError(
                    f"message {number} has role 'system'; only the first message may be a system message."
                )
            continue
        if message.role != expected:
            raise PromptsError(
                f"message {number} has role {message.role!r} where {expected!r} was expected: "
                f"user and assistant messages must alternate, starting with user."
            )
        expected = "assistant" if expected == "user" else "user"
    if messages[-1].role != "user":
        raise PromptsError(
            f"the last message has role {messages[-1].role!r}; it must be a user message for the model to answer."
        )


def prompts_dir() -> Traversable:
    """The folder of shipped prompt sets (``engine/prompts/``), found through the package."""
    return files("engine") / "prompts"


def available_sets() -> tuple[str, ...]:
    """Names of the shipped prompt sets, sorted: each ``engine/prompts/NAME.jsonl``."""
    return tuple(sorted(e.name.removesuffix(".jsonl") for e in prompts_dir().iterdir() if e.name.endswith(".jsonl")))


def load_prompts(set_or_file: str | os.PathLike[str]) -> tuple[Prompt, ...]:
    """Load a shipped prompt set by name (``"quick"``) or a prompt file by path.

    A bare name that matches a shipped set wins over a file of the same name in the current
    folder; write ``./quick`` to mean the file. Raises :class:`PromptsError` for an unknown set,
    a missing or unreadable file, and any malformed line (with its line number).
    """
    name = os.fspath(set_or_file)
    if name in available_sets():
        resource = prompts_dir() / f"{name}.jsonl"
        return parse_prompts(resource.read_text(encoding="utf-8"), source=f"prompt set {name!r} ({resource})")
    path = Path(name)
    if not path.exists() and path.suffix != ".jsonl" and os.sep not in name and "/" not in name:
        raise PromptsError(
            f"Unknown prompt set {name!r}: use one of {', '.join(available_sets())}, "
            f"or give the path of a .jsonl file."
        )
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptsError(f"Prompt file {name} does not exist: check the path.") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PromptsError(f"Cannot read prompt file {name}: {error}") from error
    return parse_prompts(text, source=name)


def parse_prompts(text: str, source: str = "<prompts>") -> tuple[Prompt, ...]:
    """Parse JSON Lines text; ``source`` names the file in error messages."""
    prompts = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompts.append(_prompt_from_json(json.loads(line)))
        except json.JSONDecodeError as error:
            reason = f"not valid JSON ({error.msg} at column {error.colno})"
            raise PromptsError(f"{source}, line {line_number}: {reason}.") from None
        except PromptsError as error:
            raise PromptsError(f"{source}, line {line_number}: {error}") from None
    if not prompts:
        raise PromptsError(f'{source} has no prompts: write one JSON object per line, e.g. {{"prompt": "Hello"}}.')
    return tuple(prompts)


def _prompt_from_json(obj: object) -> Prompt:
    """One decoded line -> Prompt; the shape checks that JSON needs before Prompt's own."""
    if not isinstance(obj, dict):
        raise PromptsError(f'expected a JSON object such as {{"prompt": "..."}}, got {type(obj).__name__}.')
    if "prompt" not in obj:
        raise PromptsError('missing "prompt": every line needs a "prompt" string or list of chat messages.')
    prompt = obj["prompt"]
    if isinstance(prompt, list):
        messages = []
        for number, message in enumerate(prompt, start=1):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise PromptsError(f'message {number} must be an object with "role" and "content".')
            messages.append(ChatMessage(message["role"], message["content"]))
        prompt = tuple(messages)
    return Prompt(prompt, obj.get("category", DEFAULT_CATEGORY), obj.get("raw", False))
