"""engine.prompts: the shipped prompt sets and the JSON Lines loader."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from engine.prompts import (
    ChatMessage,
    Prompt,
    PromptsError,
    available_sets,
    load_prompts,
    parse_prompts,
    prompts_dir,
)

CATEGORIES = {"chat", "code", "math", "instructions", "summarisation", "qa"}


def text_of(prompt: Prompt) -> str:
    """All the text of a prompt, for duplicate checks."""
    return "\n".join(m["content"] for m in prompt.chat_messages()) if not prompt.raw else prompt.text_or_messages


def test_the_shipped_sets_are_available():
    assert {"all", "quick", "check", "heldout"} <= set(available_sets())
    assert available_sets() == tuple(sorted(available_sets()))


@pytest.mark.parametrize("name", ["all", "quick", "check", "heldout"])
def test_every_shipped_set_loads(name):
    prompts = load_prompts(name)
    assert prompts and all(isinstance(p, Prompt) for p in prompts)
    texts = [text_of(p) for p in prompts]
    assert len(set(texts)) == len(texts), "duplicate prompts"


def test_every_file_in_the_prompts_folder_loads():
    for name in available_sets():
        assert load_prompts(name)


def test_all_has_at_least_12_prompts_in_each_of_the_six_categories():
    counts = Counter(p.category for p in load_prompts("all"))
    assert set(counts) == CATEGORIES
    assert min(counts.values()) >= 12, counts


def test_all_chat_prompts_are_multi_turn():
    chats = [p for p in load_prompts("all") if p.category == "chat"]
    for prompt in chats:
        roles = [m.role for m in prompt.text_or_messages]
        assert "assistant" in roles and roles[-1] == "user" and roles.count("user") >= 2, roles


def test_summarisation_passages_have_80_to_200_words():
    for prompt in load_prompts("all"):
        if prompt.category == "summarisation":
            instruction, passage = prompt.text_or_messages.split("\n\n", 1)
            assert 80 <= len(passage.split()) <= 200, instruction


def test_quick_has_one_short_prompt_per_category():
    prompts = load_prompts("quick")
    assert len(prompts) == 6
    assert sorted(p.category for p in prompts) == sorted(CATEGORIES)
    assert all(len(text_of(p).split()) <= 120 for p in prompts)


def test_check_has_a_raw_continuation_and_a_long_prompt():
    prompts = load_prompts("check")
    assert len(prompts) == 4
    raw = [p for p in prompts if p.raw]
    assert len(raw) == 1 and isinstance(raw[0].text_or_messages, str)
    # About 1.3 tokens per English word: 90 words is comfortably more than 100 tokens.
    assert max(len(text_of(p).split()) for p in prompts) >= 90
    assert any(p.is_chat for p in prompts)


def test_heldout_has_12_prompts_never_seen_in_another_set():
    heldout = load_prompts("heldout")
    assert len(heldout) == 12
    assert len({p.category for p in heldout}) >= 4
    others = {text_of(p) for name in available_sets() if name != "heldout" for p in load_prompts(name)}
    assert not {text_of(p) for p in heldout} & others


def test_prompts_are_frozen_and_chat_messages_are_tuples():
    prompt = next(p for p in load_prompts("quick") if p.is_chat)
    assert isinstance(prompt.text_or_messages, tuple)
    assert all(isinstance(m, ChatMessage) for m in prompt.text_or_messages)
    with pytest.raises(dataclasses.FrozenInstanceError):
        prompt.category = "code"  # type: ignore[misc]


def test_chat_messages():
    assert Prompt("Hi", "qa").chat_messages() == [{"role": "user", "content": "Hi"}]
    conversation = Prompt([ChatMessage("system", "Be brief."), ChatMessage("user", "Hi")], "chat")
    assert conversation.chat_messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    with pytest.raises(PromptsError, match="raw"):
        Prompt("Once upon a time", "continuation", raw=True).chat_messages()


def test_a_jsonl_file_by_path(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(
        '{"prompt": "Hello", "id": 7}\n\n'
        '{"prompt": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
        '{"role": "user", "content": "c"}], "category": "chat"}\n'
        '{"prompt": "The end", "raw": true, "category": "continuation"}\n',
        encoding="utf-8",
    )
    prompts = load_prompts(path)
    assert load_prompts(str(path)) == prompts
    assert prompts[0] == Prompt("Hello", "other")
    assert prompts[1].text_or_messages == (
        ChatMessage("user", "a"),
        ChatMessage("assistant", "b"),
        ChatMessage("user", "c"),
    )
    assert prompts[2] == Prompt("The end", "continuation", raw=True)


def test_a_set_name_wins_over_a_file_of_the_same_name(tmp_path, monkeypatch):
    (tmp_path / "quick").write_text('{"prompt": "not the shipped set"}\n', encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert len(load_prompts("quick")) == 6
    assert load_prompts("./quick") == (Prompt("not the shipped set", "other"),)


def test_unknown_set_and_missing_file():
    with pytest.raises(PromptsError, match="Unknown prompt set 'quik'.*quick"):
        load_prompts("quik")
    with pytest.raises(PromptsError, match="does not exist"):
        load_prompts("no/such/file.jsonl")


def line(obj: object) -> str:
    return json.dumps(obj)


GOOD = line({"prompt": "fine"})
U, A, S = ({"role": r, "content": "x"} for r in ("user", "assistant", "system"))

# (case id, file text, line number, fragment of the reason)
MALFORMED = [
    ("bad json", GOOD + "\n" + '{"prompt": "unterminated}\n', 2, "not valid JSON"),
    ("not an object", GOOD + "\n" + line(["a list"]), 2, "expected a JSON object"),
    ("missing prompt", line({"text": "hi"}), 1, 'missing "prompt"'),
    ("empty prompt", GOOD + "\n\n" + line({"prompt": "  "}), 3, '"prompt" is empty'),
    ("number prompt", line({"prompt": 5}), 1, "must be a string or a list"),
    ("empty message list", line({"prompt": []}), 1, "empty list of chat messages"),
    ("message without role", line({"prompt": [{"content": "x"}]}), 1, 'message 1 must be an object with "role"'),
    ("wrong role", GOOD + "\n" + line({"prompt": [U, {"role": "bot", "content": "x"}, U]}), 2, "has role 'bot'"),
    ("late system message", line({"prompt": [U, A, S, U]}), 1, "only the first message may be a system"),
    ("two users in a row", line({"prompt": [U, U]}), 1, "must alternate"),
    ("starts with assistant", line({"prompt": [A, U]}), 1, "message 1 has role 'assistant'"),
    ("ends with assistant", line({"prompt": [U, A]}), 1, "the last message has role 'assistant'"),
    ("only system", line({"prompt": [S]}), 1, "the last message has role 'system'"),
    ("empty content", line({"prompt": [{"role": "user", "content": ""}]}), 1, "message 1 has no text"),
    ("raw chat", line({"prompt": [U], "raw": True}), 1, "raw prompt must be a string"),
    ("raw not bool", line({"prompt": "x", "raw": "yes"}), 1, '"raw" must be true or false'),
    ("category not a string", line({"prompt": "x", "category": 3}), 1, '"category" must be'),
]


@pytest.mark.parametrize(("case", "text", "line_number", "fragment"), MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_files_report_the_file_and_line(case, text, line_number, fragment, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(text + "\n", encoding="utf-8")
    with pytest.raises(PromptsError) as info:
        load_prompts(path)
    message = str(info.value)
    assert message.startswith(f"{path}, line {line_number}: "), message
    assert fragment in message, message


def test_empty_and_unreadable_files(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(PromptsError, match="has no prompts"):
        load_prompts(empty)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe{")
    with pytest.raises(PromptsError, match="Cannot read prompt file"):
        load_prompts(binary)


def test_prompts_error_is_a_value_error():
    assert issubclass(PromptsError, ValueError)
    with pytest.raises(ValueError):
        parse_prompts("")


def test_the_data_files_are_found_through_the_package():
    assert Path(str(prompts_dir())) == Path(__file__).parents[3] / "engine" / "prompts"


def test_importing_prompts_loads_no_torch():
    code = "import sys, engine.prompts; bad = {'torch', 'numpy', 'PySide6'} & set(sys.modules); assert not bad, bad"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[3])
    assert result.returncode == 0, result.stderr
