"""Discovery: find agents by mDNS and by manual host:port, in one device registry. Qt-free.

    with Discovery(on_event=print, interfaces=["127.0.0.1"]) as discovery:
        discovery.add_manual("192.168.1.20:5555")   # for networks that block multicast
        ...
        discovery.devices()                        # a snapshot: tuple[Device, ...]

Events (frozen dataclasses) are `DeviceSeen`, `DeviceUpdated` and `DeviceLost`, each carrying the
`Device` as it is now. They reach the caller through `on_event`, called on Discovery's own worker
thread (a GUI must hand them to its own thread, e.g. with a queued signal), and through
`events`, a `queue.SimpleQueue` for callers that prefer to poll. `devices()` may be called from
any thread.

The zeroconf browser's handler only enqueues (S9, S14); the worker thread resolves services
(`Zeroconf.get_service_info`, blocking, never in the handler), probes manual entries, and owns
the registry. A device's key is its agent id when known (mDNS TXT, or the paired-agents store
for manual entries), else its host:port, so an agent found both ways is one device. mDNS says
where an agent is, never whether to trust it: `paired` comes from this client's own store.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal

from engine import wire

logger = logging.getLogger(__name__)

RESOLVE_TIMEOUT_MS = 3000
MANUAL_PROBE_INTERVAL_S = 5.0
PROBE_TIMEOUT_S = 2.0
WORKER_POLL_S = 0.2

Source = Literal["mdns", "manual"]


@dataclass(frozen=True)
class Device:
    """One agent as this client knows it. Memory and accelerator come from a Hello (paired only)."""

    key: str  # agent id when known, else host:port
    address: str  # host:port of the control socket
    source: Source
    agent_id: str = ""
    name: str = ""
    fingerprint: str = ""  # of its public key, as advertised
    protocol: str = ""
    paired: bool = False
    online: bool = True
    memory_total: int = 0
    memory_free: int = 0
    accelerator: str = ""
    torch_device: str = ""
    stage: str = ""


@dataclass(frozen=True)
class DeviceSeen:
    device: Device


@dataclass(frozen=True)
class DeviceUpdated:
    device: Device


@dataclass(frozen=True)
class DeviceLost:
    device: Device


DeviceEvent = DeviceSeen | DeviceUpdated | DeviceLost


class Discovery:
    """Browses `_flowspec._tcp.local.` and probes manual entries; see the module docstring.

    `interfaces`: zeroconf interfaces (None = all; tests use ["127.0.0.1"]). `mdns=False` gives
    a registry of manual entries only. `keys` (engine.agent_client.ClientKeys) marks paired devices
    and lets Discovery ask them for memory and accelerator with a Hello.
    """

    def __init__(self, on_event: Callable[[DeviceEvent], None] | None = None,
                 interfaces: Sequence[str] | None = None, mdns: bool = True, keys=None) -> None:
        self.on_event = on_event
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self._interfaces = list(interfaces) if interfaces is not None else None
        self._mdns = mdns
        self._keys = keys
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()  # ("added"|"updated"|"removed", name) | ("manual", addr)
        self._registry: dict[str, Device] = {}
        self._lock = threading.Lock()
        self._manual: dict[str, float] = {}  # address -> next probe time (worker thread only)
        self._services: dict[str, str] = {}  # mDNS service name -> registry key (worker thread only)
        self._next_check = 0.0  # when to look at the mDNS devices again (worker thread only)
        self._stop = threading.Event()
        self._zeroconf = self._browser = None
        self._thread = threading.Thread(target=self._run, name="discovery", daemon=True)
        self._started = False

    # --- public

    def start(self) -> Discovery:
        if self._mdns:
            from zeroconf import ServiceBrowser, Zeroconf

            self._zeroconf = Zeroconf(interfaces=self._interfaces) if self._interfaces else Zeroconf()
            self._browser = ServiceBrowser(self._zeroconf, wire.SERVICE_TYPE, handlers=[self._on_service_state_change])
        self._thread.start()
        self._started = True
        return self

    def close(self) -> None:
        self._stop.set()
        if self._started:
            self._thread.join(5.0)
        if self._browser is not None:
            self._browser.cancel()
        if self._zeroconf is not None:
            self._zeroconf.close()

    def add_manual(self, address: str) -> None:
        """Watch an agent at host:port without mDNS. ValueError if it is not host:port."""
        from engine.agent_client import split_address

        split_address(address)
        self._inbox.put(("manual", address))

    def devices(self) -> tuple[Device, ...]:
        with self._lock:
            return tuple(sorted(self._registry.values(), key=lambda d: (d.name or d.address, d.address)))

    def __enter__(self) -> Discovery:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- zeroconf's thread: enqueue only

    def _on_service_state_change(self, zeroconf, service_type: str, name: str, state_change) -> None:
        self._inbox.put((state_change.name.lower(), name))

    # --- the worker thread

    def _run(self) -> None:
        """Boundary: an error while handling one entry is logged and the worker goes on, so one bad
        advertisement or unreachable agent never stops discovery."""
        while not self._stop.is_set():
            try:
                kind, value = self._inbox.get(timeout=WORKER_POLL_S)
            except queue.Empty:
                kind = value = None
            try:
                if kind == "manual":
                    self._manual[value] = 0.0
                elif kind in ("added", "updated"):
                    self._resolve(value)
                elif kind == "removed":
                    self._remove_service(value)
                self._probe_manual_entries()
                self._check_advertised()
            except Exception:  # noqa: BLE001 - see docstring
                logger.exception("discovery: handling %s %s failed", kind, value)

    def _resolve(self, service_name: str) -> None:
        info = self._zeroconf.get_service_info(wire.SERVICE_TYPE, service_name, timeout=RESOLVE_TIMEOUT_MS)
        if info is None:
            logger.debug("discovery: %s did not resolve", service_name)
            return
        props = {k.decode("utf-8", "replace"): (v or b"").decode("utf-8", "replace") for k, v in info.properties.items()}
        addresses = info.parsed_addresses()
        if not addresses:
            return
        port = int(props.get(wire.TXT_CTL_PORT) or info.port)
        device = Device(key=props.get(wire.TXT_ID) or f"{addresses[0]}:{port}", address=f"{addresses[0]}:{port}",
                        source="mdns", agent_id=props.get(wire.TXT_ID, ""), name=props.get(wire.TXT_NAME, ""),
                        fingerprint=props.get(wire.TXT_FINGERPRINT, ""), protocol=props.get(wire.TXT_PROTO, ""))
        self._services[service_name] = device.key
        self._upsert(self._with_hello(device))

    def _check_advertised(self) -> None:
        """Every MANUAL_PROBE_INTERVAL_S, look at each mDNS device again: its control port must still
        accept a TCP connection, else it is lost now rather than when its mDNS record expires (a
        killed agent never unregisters); a paired one is asked for its state again."""
        now = time.monotonic()
        if now < self._next_check:
            return
        self._next_check = now + MANUAL_PROBE_INTERVAL_S
        for service_name, key in list(self._services.items()):
            with self._lock:
                device = self._registry.get(key)
            if device is None:
                continue
            if _accepts_tcp(device.address):
                if device.paired:
                    self._upsert(self._with_hello(device))
                continue
            self._services.pop(service_name, None)
            with self._lock:
                self._registry.pop(key, None)
            self._emit(DeviceLost(replace(device, online=False)))

    def _remove_service(self, service_name: str) -> None:
        key = self._services.pop(service_name, None)
        with self._lock:
            device = self._registry.pop(key, None) if key is not None else None
        if device is not None:
            self._emit(DeviceLost(replace(device, online=False)))

    def _probe_manual_entries(self) -> None:
        now = time.monotonic()
        for address, due in list(self._manual.items()):
            if due > now:
                continue
            self._manual[address] = now + MANUAL_PROBE_INTERVAL_S
            paired = self._keys.find(address) if self._keys is not None else None
            device = Device(key=paired.agent_id if paired else address, address=address, source="manual",
                            agent_id=paired.agent_id if paired else "", name=paired.name if paired else "")
            with self._lock:
                known = self._registry.get(device.key)
            if known is not None and known.source == "mdns":
                continue  # mDNS already reports it
            probed = self._with_hello(device)
            if paired is not None and not probed.online and known is not None and known.online:
                self._upsert(probed)
                self._emit(DeviceLost(probed))
            elif probed.online or known is None:
                self._upsert(probed)

    def _with_hello(self, device: Device) -> Device:
        """Mark the device paired if this client is, and fill in what a Hello tells."""
        if self._keys is None:
            return device
        paired = self._keys.find(device.agent_id or device.address) or self._keys.find(device.address)
        if paired is None:
            return device
        from engine.agent_client import AgentError, hello

        try:
            caps = hello(device.address, self._keys, paired.public_key, PROBE_TIMEOUT_S)
        except AgentError as exc:
            logger.debug("discovery: %s", exc)
            return replace(device, paired=True, online=device.source == "mdns")
        return replace(device, key=caps.agent_id, agent_id=caps.agent_id, name=caps.name, paired=True, online=True,
                       memory_total=caps.memory_total, memory_free=caps.memory_free,
                       accelerator=caps.accelerator, torch_device=caps.torch_device, stage=caps.stage)

    def _upsert(self, device: Device) -> None:
        with self._lock:
            old = self._registry.get(device.key)
            if old is not None and old.source == "mdns" and device.source == "manual":
                return
            self._registry[device.key] = device
            if device.key != device.address:
                self._registry.pop(device.address, None)  # a manual entry now known by its id
        if old is None:
            self._emit(DeviceSeen(device))
        elif old != device:
            self._emit(DeviceUpdated(device))

    def _emit(self, event: DeviceEvent) -> None:
        self.events.put(event)
        if self.on_event is not None:
            try:
                self.on_event(event)
            except Exception:  # noqa: BLE001 - a caller's callback must not stop discovery
                logger.exception("discovery: the on_event callback failed")


def _accepts_tcp(address: str) -> bool:
    """Whether something listens at host:port (a connection is opened and closed, nothing sent)."""
    from engine.agent_client import split_address

    host, port = split_address(address)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False
