"""`flowspec bench --simulate`: the ring on N dedicated devices and links, as a discrete-event model.

The real coordinator drives a `SimRing`. Its stages are real `StageWorker`s in this process, so
every hidden state, prune and acceptance is the real one; only time is modelled:

- *device*: each stage owns one device. A batch (everything that has arrived while the device
  was busy) takes the calibrated forward time of each segment it computes, looked up per stage
  and segment size in a table measured on this machine (`calibrate`) and interpolated linearly.
- *link*: each hop serialises messages at the emulated bandwidth, then adds its latency, as the
  real link shaper does (engine/stage_proc.py LinkSender); message sizes are the tensors' bytes.
- *coordinator*: its own work (verify, prune, draft) takes the time it really takes here.

Numbers from this model are labelled "simulated" wherever they appear. It predicts what this
machine cannot be: one device per stage. Where the two can be compared (one stage, where the
coordinator and the stage hardly compete for cores) the report gives the model's error.
"""

from __future__ import annotations

import heapq
import itertools
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from engine.config import LinkConfig
from engine.stage_worker import StageWorker
from engine.wire import Segment

CALIBRATION_SIZES = (1, 4, 16, 32, 64, 128)
CALIBRATION_PREFIX = 128  # cached tokens behind the timed segment
MESSAGE_OVERHEAD_BYTES = 96  # header and framing per message, roughly


@dataclass(frozen=True)
class Calibration:
    """Forward seconds per stage (rows) at each segment size (columns)."""

    sizes: tuple[int, ...]
    seconds: tuple[tuple[float, ...], ...]
    threads: int

    def forward_s(self, stage: int, size: int) -> float:
        return float(np.interp(size, self.sizes, self.seconds[stage]))

    def as_dict(self) -> dict:
        return {"sizes": list(self.sizes), "seconds": [list(r) for r in self.seconds], "threads": self.threads,
                "prefix_tokens": CALIBRATION_PREFIX}


@torch.inference_mode()
def calibrate(workers: list[StageWorker], hidden_size: int, sizes=CALIBRATION_SIZES, repeats: int = 3) -> Calibration:
    """Median forward time of every stage at each segment size, after a cached prefix, with this
    process's torch threads (the cores a dedicated device would have to itself)."""
    table = []
    for worker in workers:
        module = worker.module
        first = module.spec.first
        vocab = module.embed.num_embeddings if first else 1
        module.reset()
        prefix = torch.arange(CALIBRATION_PREFIX) % vocab if first else torch.randn(CALIBRATION_PREFIX, hidden_size)
        module(prefix, torch.arange(CALIBRATION_PREFIX))
        row = []
        for size in sizes:
            x = torch.arange(size) % vocab if first else torch.randn(size, hidden_size)
            pos = torch.arange(CALIBRATION_PREFIX, CALIBRATION_PREFIX + size)
            times = []
            for _ in range(repeats + 1):
                module.cache.truncate(CALIBRATION_PREFIX)
                t0 = time.perf_counter()
                module(x, pos)
                times.append(time.perf_counter() - t0)
            row.append(statistics.median(times[1:]))
        module.reset()
        table.append(tuple(row))
    return Calibration(tuple(sizes), tuple(table), torch.get_num_threads())


class SimRing:
    """The Ring interface over simulated devices and links; see the module docstring.

    Hop h carries messages into stage h (h < N) or back to the coordinator (h == N).
    """

    def __init__(self, workers: list[StageWorker], calibration: Calibration, link: LinkConfig | None) -> None:
        self.workers = workers
        self.n_stages = len(workers)
        self.parallel_stages = self.n_stages  # a modelled device per stage
        self.cal = calibration
        self.link = link if link is not None and link.active else None
        self.now = 0.0  # simulated seconds
        self._mark = time.perf_counter()  # real time at which the coordinator last got control
        self._events: list = []  # (time, seq, kind, hop/stage, payload)
        self._seq = itertools.count()
        self._link_free = [0.0] * (self.n_stages + 1)
        self._queue: list[list] = [[] for _ in workers]
        self._busy_until = [0.0] * self.n_stages
        self._running = [False] * self.n_stages
        self._busy = [0.0] * self.n_stages

    def clock(self) -> float:
        """Simulated time: the coordinator's own work advances it as it really takes."""
        return self.now + (time.perf_counter() - self._mark)

    def send(self, msg: object, tensors: list[torch.Tensor]) -> None:
        self._transmit(0, self.clock(), msg, [t.clone() for t in tensors])

    def recv(self, timeout_s: float):
        self.now = self.clock()
        while self._events:
            t, _, kind, where, payload = heapq.heappop(self._events)
            if kind == "arrive" and where == self.n_stages:
                self.now = max(self.now, t)
                self._mark = time.perf_counter()
                return payload
            if kind == "arrive":
                self._queue[where].append(payload)
                if not self._running[where]:
                    self._start_batch(where, t)
            else:  # "free": the device finished a batch
                self._running[where] = False
                if self._queue[where]:
                    self._start_batch(where, t)
        self._mark = time.perf_counter()
        return None

    def stage_busy_s(self) -> list[float]:
        return list(self._busy)

    def close(self) -> None:
        self._events.clear()

    def _start_batch(self, stage: int, t: float) -> None:
        batch, self._queue[stage] = self._queue[stage], []
        out = self.workers[stage].handle(batch)
        seconds = sum(self.cal.forward_s(stage, tensors[0].shape[0]) for msg, tensors in out
                      if isinstance(msg, Segment) and tensors)
        done = t + seconds
        self._busy[stage] += seconds
        self._running[stage] = True
        heapq.heappush(self._events, (done, next(self._seq), "free", stage, None))
        for msg, tensors in out:
            if stage + 1 == self.n_stages and not tensors:
                continue  # only segments travel back to the coordinator
            self._transmit(stage + 1, done, msg, tensors)

    def _transmit(self, hop: int, t: float, msg: object, tensors: list[torch.Tensor]) -> None:
        arrive = t
        if self.link is not None:
            nbytes = MESSAGE_OVERHEAD_BYTES + sum(x.numel() * x.element_size() for x in tensors)
            transmit = self.link.delay_s(nbytes) - self.link.delay_s(0)
            self._link_free[hop] = max(t, self._link_free[hop]) + transmit
            arrive = self._link_free[hop] + self.link.delay_s(0)
        heapq.heappush(self._events, (arrive, next(self._seq), "arrive", hop, (msg, tensors)))
