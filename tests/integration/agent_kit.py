"""Agents as real subprocesses on 127.0.0.1 for tests: start, read the pairing code, pair, stop;
and the tiny random model (with its Hugging Face greedy continuation) they serve.

Every agent started through `AgentProcess` is killed at the end of its `with` block (or by the
`agents` fixture), so no test leaves a process behind.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30.0
_CODE = re.compile(r"pairing code (\S+)")
MAX_NEW_TOKENS = 60


def free_port_block(n: int = 3) -> int:
    """A port P such that P .. P+n-1 are free on 127.0.0.1 now."""
    for _ in range(200):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1]
        if base + n >= 65535:
            continue
        ok = True
        for port in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no free block of ports")


class AgentProcess:
    """`python -m agent` on 127.0.0.1; `code` is its pairing code once started."""

    def __init__(self, state_dir: Path, name: str, port: int | None = None, mdns: bool = False,
                 extra: list[str] | None = None, program: list[str] | None = None) -> None:
        self.state_dir, self.name = Path(state_dir), name
        self.program = program or [sys.executable, "-m", "agent"]  # or a frozen build's executable
        self.port = port or free_port_block()
        self.mdns, self.extra = mdns, list(extra or [])
        self.proc: subprocess.Popen | None = None
        self.code = ""
        self.log_path = self.state_dir.parent / f"{name}-{self.port}.log"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> AgentProcess:
        command = [*self.program, "--name", self.name, "--port", str(self.port),
                   "--bind", "127.0.0.1", "--state-dir", str(self.state_dir), *self.extra]
        if not self.mdns:
            command.append("--no-mdns")
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.log = open(self.log_path, "a", encoding="utf-8")
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=self.log, env=env, text=True)
        deadline = time.monotonic() + START_TIMEOUT_S
        lines = []
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            match = _CODE.search(line)
            if match:
                self.code = match.group(1)
                return self
        self.kill()
        raise RuntimeError(f"agent {self.name} did not start: {''.join(lines)} {self.log_text()}")

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def stop(self) -> int | None:
        self.kill(signal.SIGTERM)
        return self.proc.returncode if self.proc is not None else None

    def __enter__(self) -> AgentProcess:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.kill()
        self.log.close()


@dataclass(frozen=True)
class Tiny:
    path: Path
    prompt: list[int]
    expected: list[int]


def make_tiny(path: Path, hidden: int = 64, intermediate: int = 128) -> Tiny:
    config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(3)  # sharper logits: fewer near-ties between fp32 orders of summation
    model.save_pretrained(path)
    ids = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(3))  # [1, T]
    out = model.generate(ids, max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS, do_sample=False)
    return Tiny(path, ids[0].tolist(), out[0, ids.shape[1]:].tolist())
