"""`flowspec-agent --show-pairing-code`: what installers print; the same code every time, private files."""

from __future__ import annotations

import re
import stat
import subprocess
import sys


def show(state_dir) -> str:
    done = subprocess.run([sys.executable, "-m", "agent", "--show-pairing-code", "--state-dir", str(state_dir)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_code_is_created_once_then_shown_again(tmp_path):
    first, second = show(tmp_path / "state"), show(tmp_path / "state")
    assert re.match(r"pairing code [0-9A-Z]{4}-[0-9A-Z]{4}\n", first), first
    assert first == second
    assert stat.S_IMODE((tmp_path / "state" / "pairing.json").stat().st_mode) == 0o600
    assert show(tmp_path / "other").splitlines()[0] != first.splitlines()[0]
