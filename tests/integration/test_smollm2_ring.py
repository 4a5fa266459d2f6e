"""The shipped model over ZeroMQ: 3 stage worker processes, every strategy equals HF `generate` (fp32).

Runs `flowspec check` as a user would (its default drafter for smollm2-135m is the shipped draft
head), on one chat prompt and one raw continuation.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = [
    {"prompt": "Name three planets in our solar system.", "category": "qa"},
    {"prompt": "Once upon a time, in a small village by the sea, there lived", "category": "continuation", "raw": True},
]


def test_every_strategy_over_three_zmq_stages_equals_hugging_face(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    proc = subprocess.run(
        [sys.executable, "-m", "engine.cli", "check", "--model", "smollm2-135m", "--stages", "3",
         "--prompts", str(prompts), "--max-new-tokens", "24", "--ring-slots", "4"],  # 4: a full ring on any machine
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    ok = [line for line in proc.stdout.splitlines() if line.startswith("ok ")]
    assert len(ok) == 2 * 4, proc.stdout
    for strategy in ("ar", "chunk", "pipedec", "flowspec"):
        assert sum(f"] {strategy}: 24 tokens identical" in line for line in ok) == 2, proc.stdout
    assert "8/8 identical" in proc.stderr
