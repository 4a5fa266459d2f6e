"""LocalAgents: `flowspec-agent` processes on this machine's loopback, started and paired by the app.

`flowspec-studio --local-agents N` uses them so that a newcomer sees the whole flow (discovery,
pairing, stages on agents, charts) on one machine. Each agent keeps its state (id, keys, pairing)
in the app's state directory, so the same agents come back on the next run. Qt-free; the bridge
runs it on its worker thread because starting agents blocks for seconds.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0
STOP_GRACE_S = 5.0
FIRST_PORT = 47110  # each agent uses PORT, PORT+1 and PORT+2; a taken block is skipped
_CODE = re.compile(r"pairing code (\S+)")
_REPO_ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class LocalAgent:
    name: str
    address: str  # 127.0.0.1:PORT
    code: str  # pairing code it printed
    pid: int


def default_state_root() -> Path:
    import platformdirs

    return Path(platformdirs.user_state_dir("flowspec-studio")) / "local-agents"


def _ports_free(port: int) -> bool:
    for p in range(port, port + 3):
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", p))
            except OSError:
                return False
    return True


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the app dies, so no local agent outlives the app."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


class LocalAgents:
    """Starts, pairs and stops local agents. Not thread-safe: use from one thread."""

    def __init__(self, state_root: Path | None = None, first_port: int = FIRST_PORT) -> None:
        self.state_root = state_root or default_state_root()
        self.first_port = first_port
        self._procs: list[subprocess.Popen] = []
        self._logs: list = []
        self.threads = 1

    def start(self, n: int, on_progress=None) -> list[LocalAgent]:
        """Start ``n`` agents named local-1 .. local-N on 127.0.0.1 and pair this client with each."""
        from engine.agent_client import ClientKeys, pair

        keys = ClientKeys()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.threads = max(1, cores // max(1, n))  # the agents share this machine's cores
        agents, port = [], self.first_port
        for k in range(1, n + 1):
            while not _ports_free(port):
                port += 3
            name = f"local-{k}"
            if on_progress is not None:
                on_progress(f"starting agent {name} on 127.0.0.1:{port}")
            agent = self._start_one(name, port)
            pair(agent.address, agent.code, keys)
            agents.append(agent)
            port += 3
        return agents

    def _start_one(self, name: str, port: int) -> LocalAgent:
        state = self.state_root / name
        state.mkdir(parents=True, exist_ok=True)
        log = open(state / "agent.log", "a", encoding="utf-8")
        self._logs.append(log)
        threads = str(self.threads)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(_REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
                   OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        command = [sys.executable, "-m", "agent", "--name", name, "--port", str(port), "--bind", "127.0.0.1",
                   "--no-mdns", "--state-dir", str(state)]
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, env=env, text=True,
                                preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self._procs.append(proc)
        deadline = time.monotonic() + START_TIMEOUT_S
        lines = []
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = _CODE.search(line)
            if match:
                return LocalAgent(name, f"127.0.0.1:{port}", match.group(1), proc.pid)
        raise RuntimeError(f"agent {name} did not start (see {state / 'agent.log'}): {''.join(lines).strip()}")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p.poll() is None]

    def close(self) -> None:
        """SIGTERM every agent (they unload their stages), then kill stragglers."""
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in self._procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
        for log in self._logs:
            log.close()
        self._procs, self._logs = [], []
