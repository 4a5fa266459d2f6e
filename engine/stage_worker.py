"""What a pipeline stage does with the messages it receives, independent of the transport.

A stage handles its inbox in batches. Segments wait in `pending` until the batch is done; a Prune
that arrives behind a pending segment is applied to that segment before it is computed (in-flight
pruning), and is forwarded ahead of it, so every stage downstream sees each segment in the index
space of the prunes it has already applied. Empty segments are dropped; the coordinator knows
from its own bookkeeping that they will not come back.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import msgspec
import numpy as np
import torch

from engine.stage import StageModule
from engine.wire import Prune, Reset, Segment

logger = logging.getLogger(__name__)

Item = tuple[object, list[torch.Tensor]]


@dataclass
class _Pending:
    seg: Segment
    x: torch.Tensor  # [T] ids or [T, hidden]
    positions: torch.Tensor  # [T]
    mask: torch.Tensor | None  # [T, start + T] bool


def prune_segment(seg: Segment, x: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor | None,
                  prune: Prune) -> tuple[Segment, torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """Re-index a not-yet-computed segment into the index space after `prune`; None when nothing survives."""
    survivors = np.asarray(prune.keep[prune.n_accepted :], dtype=np.int64)
    a, b = seg.start, seg.start + positions.shape[0]
    rows = survivors[(survivors >= a) & (survivors < b)] - a
    if rows.size == 0:
        return None
    rows_t = torch.from_numpy(rows)
    new_mask = None
    if mask is not None:
        cols = torch.from_numpy(survivors[survivors < b])
        new_mask = mask[rows_t][:, cols]
    new_seg = msgspec.structs.replace(
        seg, epoch=prune.epoch, prefix_len=prune.prefix_len + prune.n_accepted,
        start=int(np.searchsorted(survivors, a)),
    )
    return new_seg, x[rows_t], positions[rows_t], new_mask


class StageWorker:
    """Runs one StageModule over the segments of the current request, keeping its cache consistent."""

    def __init__(self, module: StageModule, index: int, n_stages: int) -> None:
        self.module, self.index, self.n_stages = module, index, n_stages
        self.request_id = -1
        self.epoch = 0
        self.busy_s = 0.0

    def handle(self, batch: list[Item]) -> list[Item]:
        """Process a batch of inbound messages in order; return the messages to send downstream."""
        out: list[Item] = []
        pending: list[_Pending] = []
        for msg, tensors in batch:
            if isinstance(msg, Reset):
                pending.clear()
                self.module.reset()
                self.request_id, self.epoch = msg.request_id, 0
                if msg.threads:
                    torch.set_num_threads(msg.threads)
                out.append((msg, []))
            elif isinstance(msg, Prune):
                if msg.request_id != self.request_id:
                    continue
                pending = self._apply_prune(msg, pending)
                out.append((msg, []))
            elif isinstance(msg, Segment):
                if msg.request_id != self.request_id:
                    continue
                pending.append(_Pending(msg, tensors[0], tensors[1], tensors[2] if msg.masked else None))
            else:
                raise TypeError(f"stage {self.index} cannot handle {type(msg).__name__}")
        for p in pending:
            out.append(self._compute(p))
        return out

    def _apply_prune(self, prune: Prune, pending: list[_Pending]) -> list[_Pending]:
        cache = self.module.cache
        keep = np.asarray(prune.keep, dtype=np.int64)
        in_cache = keep[keep < cache.length - prune.prefix_len]
        cache.keep(prune.prefix_len, in_cache.tolist())
        self.epoch = prune.epoch
        survivors = []
        for p in pending:
            pruned = prune_segment(p.seg, p.x, p.positions, p.mask, prune)
            if pruned is not None:
                survivors.append(_Pending(*pruned))
        return survivors

    def _compute(self, p: _Pending) -> Item:
        seg = p.seg
        t0 = time.perf_counter()
        cache = self.module.cache
        expected = seg.prefix_len + seg.start
        if cache.length != expected:
            raise RuntimeError(
                f"stage {self.index}: cache holds {cache.length} slots but segment {seg.seg_id} starts at {expected}"
            )
        hidden = self.module(p.x, p.positions, seg.prefix_len if p.mask is not None else None, p.mask)
        dt = time.perf_counter() - t0
        self.busy_s += dt
        tensors = [hidden, p.positions] + ([p.mask] if p.mask is not None else [])
        return msgspec.structs.replace(seg, busy_s=seg.busy_s + (dt,)), tensors
