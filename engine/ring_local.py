"""The in-process ring: stages as objects in this process, links as FIFO queues.

Deterministic and single-threaded: `recv` lets every stage handle its whole inbox, last stage
first, until something reaches the coordinator. Used by tests and as the `--stages 0` fallback.
"""

from __future__ import annotations

from collections import deque

import torch

from engine.stage_worker import StageWorker


class LocalRing:
    """`parallel_stages` tells the coordinator how many stages could compute at once: by default
    all of them (the ring stands in for a pipeline of devices, as in tests); an engine that really
    runs its stages one after another in this process says 1."""

    def __init__(self, workers: list[StageWorker], parallel_stages: int | None = None) -> None:
        self.workers = workers
        self.n_stages = len(workers)
        self.parallel_stages = parallel_stages or self.n_stages
        self.inboxes: list[deque] = [deque() for _ in workers]
        self.returned: deque = deque()

    def send(self, msg: object, tensors: list[torch.Tensor]) -> None:
        self.inboxes[0].append((msg, [t.clone() for t in tensors]))

    def recv(self, timeout_s: float) -> tuple[object, list[torch.Tensor]] | None:
        while not self.returned:
            if not any(self.inboxes):
                return None
            for i in reversed(range(self.n_stages)):
                batch = list(self.inboxes[i])
                self.inboxes[i].clear()
                if not batch:
                    continue
                for msg, tensors in self.workers[i].handle(batch):
                    if i + 1 < self.n_stages:
                        self.inboxes[i + 1].append((msg, tensors))
                    elif tensors:  # only segments travel back to the coordinator
                        self.returned.append((msg, tensors))
        return self.returned.popleft()

    def stage_busy_s(self) -> list[float]:
        return [w.busy_s for w in self.workers]

    def close(self) -> None:
        self.inboxes = [deque() for _ in self.workers]
