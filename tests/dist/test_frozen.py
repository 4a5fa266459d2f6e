"""The frozen programs in dist/ (built by `make dist`; run by `make test-dist`).

The frozen agent starts, advertises on mDNS, pairs, answers hello, receives a stage's weights and
runs it: generation through it equals the same model run locally. The frozen app starts offscreen
and finds the agent. The agent installer installs, prints the pairing code and uninstalls cleanly.
Each test skips when its program has not been built.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.agent_client import ClientKeys, hello, pair
from engine.discovery import DeviceSeen, Discovery
from tests.integration.agent_kit import REPO_ROOT, AgentProcess
from tests.tiny_models import make_tiny_llama_dir

pytestmark = [pytest.mark.dist, pytest.mark.integration]

DIST = REPO_ROOT / "dist"
AGENT = DIST / "flowspec-agent" / "flowspec-agent"
STUDIO = DIST / "flowspec-studio" / "flowspec-studio"


def need(program: Path) -> None:
    if not program.exists():
        pytest.skip(f"{program.relative_to(REPO_ROOT)} is not built: run `make dist` first")


def frozen_agent(tmp_path: Path, name: str) -> AgentProcess:
    return AgentProcess(tmp_path / name, name, mdns=True, program=[str(AGENT)])


def test_frozen_agent_is_found_pairs_and_runs_a_stage(tmp_path):
    need(AGENT)
    model = make_tiny_llama_dir(tmp_path)
    client = tmp_path / "client"
    keys = ClientKeys(client)
    with frozen_agent(tmp_path, "frozen-agent") as agent:
        with Discovery(interfaces=["127.0.0.1"], keys=keys) as discovery:
            deadline = time.monotonic() + 20
            seen = None
            while seen is None and time.monotonic() < deadline:
                try:
                    event = discovery.events.get(timeout=0.5)
                except queue.Empty:
                    continue
                if isinstance(event, DeviceSeen) and event.device.name == "frozen-agent":
                    seen = event.device
            assert seen is not None, "the frozen agent was not found by mDNS on 127.0.0.1"
            assert seen.address == agent.address
        paired = pair(agent.address, agent.code, keys)
        caps = hello(agent.address, keys, paired.public_key)
        assert caps.memory_total > 0 and caps.agent_id == paired.agent_id == seen.agent_id
        layout = tmp_path / "frozen.toml"
        layout.write_text(f'model = "{model}"\nn_layers = 4\n[[stage]]\ndevice = "{agent.address}"\nlayers = [0, 4]\n')
        env = dict(os.environ, FLOWSPEC_CLIENT_DIR=str(client), PYTHONPATH=str(REPO_ROOT))
        args = ["--prompt", "hello there", "--raw", "--max-new-tokens", "16", "--dtype", "fp32", "--json",
                "--draft", "lookup"]
        remote = subprocess.run([sys.executable, "-m", "engine.cli", "generate", "--layout", str(layout), *args],
                                env=env, capture_output=True, text=True, timeout=300)
        assert remote.returncode == 0, remote.stderr[-3000:] + agent.log_text()[-3000:]
    local = subprocess.run([sys.executable, "-m", "engine.cli", "generate", "--model", str(model), "--in-process", *args],
                           env=env, capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-3000:]
    assert json.loads(remote.stdout)["token_ids"] == json.loads(local.stdout)["token_ids"]


def test_frozen_agent_bundle_holds_no_qt():
    need(AGENT)
    internal = AGENT.parent / "_internal"
    bundled = {p.name.split(".")[0] for p in internal.iterdir()}
    assert not bundled & {"PySide6", "shiboken6", "pyqtgraph", "matplotlib", "app"}


def test_frozen_app_starts_offscreen_and_finds_the_agent(tmp_path):
    need(STUDIO)
    need(AGENT)
    env = dict(os.environ, QT_QPA_PLATFORM="offscreen", FLOWSPEC_CLIENT_DIR=str(tmp_path / "client"),
               XDG_CONFIG_HOME=str(tmp_path / "config"))
    with frozen_agent(tmp_path, "seen-by-app"):
        app = subprocess.run([str(STUDIO), "--diagnose", "8", "--interface", "127.0.0.1"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert app.returncode == 0, app.stdout + app.stderr[-3000:]
    assert "window shown" in app.stdout and "seen-by-app" in app.stdout, app.stdout


def test_agent_installer_installs_prints_the_code_and_uninstalls(tmp_path):
    installers = sorted(DIST.glob("flowspec-agent-installer-linux-*.sh"))
    if not installers:
        pytest.skip("no agent installer in dist/: run `make agent-installer` first")
    home = tmp_path / "home"
    home.mkdir()
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": str(tmp_path / "no-systemd")}
    done = subprocess.run(["sh", str(installers[-1]), "--name", "pi-kitchen", "--port", "6001"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pairing code" in done.stdout.lower()
    program = home / ".local/share/flowspec-agent/flowspec-agent"
    unit = home / ".config/systemd/user/flowspec-agent.service"
    assert program.is_file() and os.access(program, os.X_OK)
    assert (home / ".local/bin/flowspec-agent").resolve() == program
    text = unit.read_text()
    assert "Restart=on-failure" in text and "WantedBy=default.target" in text and "--port 6001" in text
    again = subprocess.run([str(program), "--show-pairing-code"], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.strip().splitlines()[0] in done.stdout  # stable across calls
    gone = subprocess.run(["sh", str(installers[-1]), "--uninstall", "--purge"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert gone.returncode == 0, gone.stderr
    assert not (home / ".local/share/flowspec-agent").exists() and not unit.exists()
    assert not (home / ".local/bin/flowspec-agent").exists() and not (home / ".local/state/flowspec-agent").exists()
