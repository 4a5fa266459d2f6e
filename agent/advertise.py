"""Advertise the agent on mDNS as `_flowspec._tcp.local.` with a small TXT record (S14).

TXT holds identity and version only (agent id, name, protocol, control port, key fingerprint),
each key=value at most 255 bytes; everything else comes over the authenticated control socket.
mDNS is for finding addresses, never for trust. Registration and unregistration pair up: `close`
unregisters (the agent calls it on SIGINT/SIGTERM) so peers see the agent leave at once.
"""

from __future__ import annotations

import logging
import socket

import psutil
from zeroconf import IPVersion, ServiceInfo, Zeroconf

from engine import wire

logger = logging.getLogger(__name__)

MAX_TXT_ENTRY = 255


def txt_record(agent_id: str, name: str, port: int, key_fingerprint: str) -> dict[str, str]:
    """The TXT properties; ValueError if an entry would exceed mDNS's 255-byte limit."""
    props = {
        wire.TXT_ID: agent_id,
        wire.TXT_NAME: name,
        wire.TXT_PROTO: wire.PROTOCOL.decode("ascii"),
        wire.TXT_CTL_PORT: str(port),
        wire.TXT_FINGERPRINT: key_fingerprint,
    }
    for key, value in props.items():
        if len(key.encode()) + 1 + len(value.encode()) > MAX_TXT_ENTRY:
            raise ValueError(f"mDNS TXT entry {key}= is longer than {MAX_TXT_ENTRY} bytes: use a shorter --name")
    return props


def advertised_addresses(bind: str) -> list[str]:
    """The IPv4 addresses to announce: the bound one, or every non-loopback one for 0.0.0.0."""
    if bind not in ("0.0.0.0", "*", ""):
        return [bind]
    found = [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
             if a.family == socket.AF_INET and not a.address.startswith("127.")]
    return found or ["127.0.0.1"]


class Advertiser:
    """Registers one ServiceInfo on start(), unregisters and closes on close()."""

    def __init__(self, agent_id: str, name: str, port: int, key_fingerprint: str, bind: str) -> None:
        self.addresses = advertised_addresses(bind)
        interfaces = self.addresses if bind not in ("0.0.0.0", "*", "") else None
        instance = f"{name}-{agent_id.removeprefix('ag-')[:8]}"
        self.info = ServiceInfo(
            wire.SERVICE_TYPE, f"{instance}.{wire.SERVICE_TYPE}",
            parsed_addresses=self.addresses, port=port,
            properties=txt_record(agent_id, name, port, key_fingerprint),
            server=f"{instance}.local.",
        )
        self.zeroconf = Zeroconf(interfaces=interfaces) if interfaces else Zeroconf(ip_version=IPVersion.V4Only)
        self.registered = False

    def start(self) -> None:
        self.zeroconf.register_service(self.info)
        self.registered = True
        logger.info("advertising %s on mDNS at %s", self.info.name, ", ".join(self.addresses))

    def close(self) -> None:
        try:
            if self.registered:
                self.zeroconf.unregister_service(self.info)
                self.registered = False
        finally:
            self.zeroconf.close()
