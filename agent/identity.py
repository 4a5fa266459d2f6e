"""Who this agent is and whom it trusts, kept in its state directory.

Files (the state directory is `platformdirs.user_state_dir("flowspec-agent")` unless given):

- `identity.json`: the agent id, plus the machine id and state-directory path it was made for.
  When either differs (a home directory copied to another machine or user), the agent makes a new
  id, key pair and pairing code and forgets its trusted clients: two agents never share an id.
- `agent.key_secret` (mode 0600) and `agent.key`: the CURVE key pair, z85 text.
- `pairing.json` (mode 0600): the pairing code shown to the user.
- `trusted_clients.json` (mode 0600): z85 public keys of paired clients, with name and date.

Every write goes to a temporary file first and is renamed into place, so a crash leaves the old
file or the new one, never half of one.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path


from engine.curve_auth import fingerprint, new_key_pair, normalize_code, read_key_pair, write_private

logger = logging.getLogger(__name__)

APP_NAME = "flowspec-agent"
CODE_ALPHABET = "ABCDEFGHJKMNPQRSTVWXYZ23456789"  # no 0/O, 1/I/L, U: easy to read aloud
CODE_LENGTH = 8
_MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


def default_state_dir() -> Path:
    import platformdirs

    return Path(platformdirs.user_state_dir(APP_NAME))


def machine_id() -> str:
    """A stable id of this machine: /etc/machine-id where it exists, else the host name."""
    for name in _MACHINE_ID_FILES:
        try:
            text = Path(name).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError):
            continue
        if text:
            return text
    return "host:" + socket.gethostname()


def format_code(code: str) -> str:
    """ABCD2345 -> "ABCD-2345" for display."""
    return code[:4] + "-" + code[4:] if len(code) == CODE_LENGTH else code


@dataclass(frozen=True)
class Identity:
    agent_id: str
    public_key: str  # z85
    secret_key: str  # z85
    pairing_code: str  # normalized
    created: bool  # made on this start (first start, or a copied state directory)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)


class StateDir:
    """The agent's identity and trust store in one directory; thread-safe."""

    def __init__(self, path: Path | None = None, cluster_secret: str | None = None) -> None:
        self.path = Path(path) if path is not None else default_state_dir()
        self.path.mkdir(parents=True, exist_ok=True)
        os.chmod(self.path, 0o700)
        self._lock = threading.Lock()
        self.identity = self._load_or_create(cluster_secret)
        self._trusted = self._read_trusted()

    # --- identity

    def _load_or_create(self, cluster_secret: str | None) -> Identity:
        here = {"machine_id": machine_id(), "state_dir": str(self.path.resolve())}
        info = self._read_json("identity.json")
        keys = read_key_pair(self.path, "agent")
        code_info = self._read_json("pairing.json")
        if info and keys and code_info and all(info.get(k) == v for k, v in here.items()):
            code = normalize_code(cluster_secret) if cluster_secret else code_info.get("code", "")
            return Identity(str(info["agent_id"]), keys[0], keys[1], code, created=False)
        if info:
            logger.warning("state directory %s was made on another machine or at another path; making a new "
                           "agent id, key pair and pairing code (clients must pair again)", self.path)
            (self.path / "trusted_clients.json").unlink(missing_ok=True)
        agent_id = "ag-" + uuid.uuid4().hex[:16]
        public, secret = new_key_pair(self.path, "agent")
        code = "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_LENGTH))
        write_private(self.path / "pairing.json", json.dumps({"code": code}) + "\n")
        write_private(self.path / "identity.json", json.dumps({"agent_id": agent_id, **here}, indent=1) + "\n")
        code = normalize_code(cluster_secret) if cluster_secret else code
        return Identity(agent_id, public, secret, code, created=True)

    def _read_json(self, name: str) -> dict | None:
        try:
            data = json.loads((self.path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    # --- trusted clients

    def _read_trusted(self) -> dict[str, dict]:
        data = self._read_json("trusted_clients.json") or {}
        clients = data.get("clients", {})
        return {key: value for key, value in clients.items() if isinstance(key, str) and len(key) == 40}

    def is_trusted(self, client_key: str) -> bool:
        with self._lock:
            return client_key in self._trusted

    def trust(self, client_key: str, client_name: str) -> None:
        """Remember a paired client's key (persisted before this returns)."""
        with self._lock:
            self._trusted[client_key] = {"name": client_name[:100], "paired_at": int(time.time())}
            write_private(self.path / "trusted_clients.json", json.dumps({"clients": self._trusted}, indent=1) + "\n")

    def trusted_names(self) -> list[str]:
        with self._lock:
            return [str(value.get("name", "")) for value in self._trusted.values()]
