"""CurveZMQ for agents and their clients: key files, and the ZAP handler that decides, during the
CURVE handshake, which client keys may connect.

libzmq asks it about every CURVE connection to a server socket, before any message from that
peer is delivered, so an unknown key never gets a command parsed. Each server socket names a ZAP
domain (`zap_domain`), and a policy per domain answers "may this z85 key connect?". Refusals are
logged at WARNING with the peer's address.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import zmq
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

logger = logging.getLogger(__name__)

Policy = Callable[[str], bool]  # z85 client key -> allowed


class KeyGate(ThreadAuthenticator):
    """A ThreadAuthenticator whose CURVE decisions come from one policy per ZAP domain.

    Create it on the same zmq.Context as the server sockets, `start()` it before binding them.
    Policies run on the authenticator's thread, so they must be thread-safe.
    """

    def __init__(self, context: zmq.Context, policies: dict[str, Policy], label: str = "flowspec") -> None:
        super().__init__(context, log=logging.getLogger(__name__ + ".zap"))
        self.policies = dict(policies)
        self.label = label
        self._address = "?"
        self.refused = 0  # how many handshakes were refused (for tests and status)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else "?"
        await super().handle_zap_message(msg)

    async def _authenticate_curve(self, domain: str, client_key: bytes) -> tuple[bool, bytes]:
        key = z85.encode(client_key).decode("ascii")
        policy = self.policies.get(domain)
        allowed = policy is not None and policy(key)
        if not allowed:
            self.refused += 1
            logger.warning("%s: refused a connection from %s on %r: client key %s is not trusted%s",
                           self.label, self._address, domain, key,
                           " (pair it first)" if domain == "control" else "")
        return allowed, b"OK" if allowed else b"Unknown key"


def curve_server(socket: zmq.Socket, secret_key: str, domain: str) -> None:
    """Make `socket` a CURVE server checked by the KeyGate policy of `domain`."""
    socket.curve_secretkey = secret_key.encode("ascii")
    socket.curve_publickey = zmq.curve_public(secret_key.encode("ascii"))
    socket.curve_server = True
    socket.zap_domain = domain.encode("ascii")


def curve_client(socket: zmq.Socket, public_key: str, secret_key: str, server_key: str) -> None:
    """Make `socket` a CURVE client with its own key pair, talking to the server `server_key`."""
    socket.curve_publickey = public_key.encode("ascii")
    socket.curve_secretkey = secret_key.encode("ascii")
    socket.curve_serverkey = server_key.encode("ascii")


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically, with mode 0600 from the first byte on."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_key_pair(directory: Path, stem: str) -> tuple[str, str] | None:
    """(public, secret) z85 from `stem.key` and `stem.key_secret`, or None if absent or inconsistent."""
    try:
        public = (directory / f"{stem}.key").read_text(encoding="ascii").strip()
        secret = (directory / f"{stem}.key_secret").read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if len(public) != 40 or len(secret) != 40 or zmq.curve_public(secret.encode("ascii")).decode("ascii") != public:
        return None
    return public, secret


def new_key_pair(directory: Path, stem: str) -> tuple[str, str]:
    """Make a key pair and store it as `stem.key` and `stem.key_secret` (mode 0600)."""
    public, secret = (key.decode("ascii") for key in zmq.curve_keypair())
    write_private(directory / f"{stem}.key_secret", secret + "\n")
    (directory / f"{stem}.key").write_text(public + "\n", encoding="ascii")
    return public, secret


def fingerprint(public_key: str) -> str:
    """16 hex digits that name a public key in mDNS and in messages for people."""
    return hashlib.sha256(public_key.encode("ascii")).hexdigest()[:16]


def normalize_code(code: str) -> str:
    """A pairing code as compared: upper case, without dashes or spaces."""
    return "".join(ch for ch in code.upper() if ch.isalnum())


def pairing_keys(code: str) -> tuple[str, str]:
    """(public, secret) z85 CURVE keys of an agent's pairing socket, derived from its pairing code.

    Only someone who knows the code can complete a CURVE handshake with the pairing socket, so that
    socket needs no list of keys. Curve25519 accepts any 32 bytes as a secret key.
    """
    seed = hashlib.sha256(b"flowspec-pairing-v1\0" + normalize_code(code).encode("utf-8")).digest()
    secret = z85.encode(seed).decode("ascii")
    return zmq.curve_public(secret.encode("ascii")).decode("ascii"), secret
