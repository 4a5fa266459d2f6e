"""D0: the coordinator that drives one request through a ring of stages.

It owns the tree, the drafter, the LM head and every decision: what to send, what was accepted,
what to prune. It reacts to one returned segment at a time (`step`), so a caller can interleave
cancellation and UI work between pipeline turns.

The four strategies share this loop and differ only in policy (see `Policy`):
- `ar`: the tree is the root alone; one token per trip round the ring.
- `chunk`: one level-ordered tree per round, split into ring-size chunks, verified whole.
- `pipedec`: a level-ordered tree sent one level per segment, verified and pruned segment by segment.
- `flowspec`: a score-ordered tree, verified and pruned segment by segment, re-drafted from the new
  root with fresh target features after every acceptance, and kept full: a slot emptied by pruning
  is refilled from the waiting nodes or by drafting more. How many slots depends on how many stages
  can compute at once (`default_slots`, from the ring's `parallel_stages`).

Index spaces: every prune starts a new epoch in which the survivors are re-indexed from 0. The
coordinator keeps each in-flight segment's range in the current epoch, so a segment that comes
back in an older epoch is mapped (or dropped, when pruned away) without asking the stages.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

import numpy as np
import torch

from engine.config import SessionConfig
from engine.draft import Drafter
from engine.stage import Head
from engine.tree import TokenTree, from_parents, merge, prune, split_sizes
from engine.verify import Accepted, accept_greedy, accept_stochastic, logits_to_probs
from engine.wire import Prune, Reset, Segment

logger = logging.getLogger(__name__)

# Request ids are unique per process run, so a ring shared by several coordinators never mixes
# up stale in-flight segments of an earlier request with a new one.
_REQUEST_IDS = itertools.count(int.from_bytes(os.urandom(3), "big") << 16)


def default_slots(n_stages: int, parallel_stages: int) -> int:
    """Segments flowspec keeps in flight when the user does not say.

    With a device per stage, stages + 1 (the paper's setting): every stage has work while the
    coordinator verifies. When stages share cores, only `parallel_stages` of them can compute at
    once, and a segment sent ahead is computed in full even when the verification before it prunes
    it away: each extra segment in flight then costs real time. Measured over 4 stage processes on
    2 quiet cores (SmolLM2, 6 prompts, 64 tokens): 1 slot 1.31x `ar`, 2 slots 1.18x, 5 slots 1.10x.
    """
    if n_stages > 1 and parallel_stages >= n_stages:
        return n_stages + 1
    return max(1, min(parallel_stages, n_stages))


class StageLost(RuntimeError):
    """A stage stopped answering; the request cannot finish on this ring."""


class Ring(Protocol):
    n_stages: int

    def send(self, msg: object, tensors: list[torch.Tensor]) -> None: ...

    def recv(self, timeout_s: float) -> tuple[object, list[torch.Tensor]] | None: ...

    def stage_busy_s(self) -> list[float]: ...


@dataclass(frozen=True)
class Policy:
    order: str  # tree layout: "score" or "level"
    stepwise: bool  # verify (and prune) each returned segment
    expand: bool  # re-draft and merge after each acceptance; refill empty slots by drafting
    by_level: bool  # one tree level per segment (pipedec)
    tree: bool  # False for ar: the root alone


POLICIES = {
    "ar": Policy("level", True, False, False, False),
    "chunk": Policy("level", False, False, False, True),
    "pipedec": Policy("level", True, False, True, True),
    "flowspec": Policy("score", True, True, False, True),
}


@dataclass
class _Flight:
    seg_id: int
    start: int  # current-epoch range [start, end); empty when start == end
    end: int


@dataclass
class Result:
    token_ids: list[int]
    prompt_len: int
    seconds: float
    ttft_s: float
    verifications: int
    rounds: int
    turns: int
    accepted_lengths: list[int] = field(default_factory=list)
    stage_busy: list[float] = field(default_factory=list)
    stopped_by: str = "max_new_tokens"
    coordinator_s: float = 0.0  # D0's own work (verify, prune, draft, send), no stage forwards
    draft_s: float = 0.0  # of which drafting
    ring_slots: int = 1  # segments the coordinator keeps in flight at most
    in_flight: float = 0.0  # mean non-empty segments in flight when a decode segment came back
    stage_threads: int = 0  # torch threads the stage workers were asked to use (0: their own count)

    @property
    def mean_accepted_length(self) -> float:
        return float(np.mean(self.accepted_lengths)) if self.accepted_lengths else 0.0


class Coordinator:
    """Generates one request at a time over a ring. Not thread-safe."""

    def __init__(self, ring: Ring, head: Head, drafter: Drafter, config: SessionConfig,
                 eos_ids: set[int], on_tokens: Callable[[list[int]], None] | None = None) -> None:
        self.ring, self.head, self.drafter, self.config = ring, head, drafter, config
        self.policy = POLICIES[config.strategy]
        if not config.speculation.expand:
            self.policy = replace(self.policy, expand=False)
        self.spec = config.speculation
        self.slots = self.spec.ring_slots or ring.n_stages + 1
        if config.strategy == "ar":
            self.slots = 1
        self.segment_max, self.expand_segment_max = self.spec.segment_max, self.spec.expand_segment_max
        if config.strategy == "flowspec" and not self.spec.ring_slots:
            self.slots = default_slots(ring.n_stages, getattr(ring, "parallel_stages", ring.n_stages))
            if self.slots == 1:
                # Nothing to overlap: one segment per verification. Over 4 stage processes on 2 cores
                # (100 Mbit/s, 5 ms hops), 16 nodes made 15.8 tokens/s against 14.5 for 32 (8: 15.1):
                # a 32-node turn cost 152 ms against 132 ms, for 2.34 accepted tokens against 2.19.
                self.segment_max = self.expand_segment_max = self.spec.solo_segment
        self.eos_ids = set(eos_ids)
        self.on_tokens = on_tokens or (lambda ids: None)
        self.generator = torch.Generator().manual_seed(config.sampling.seed)
        self.clock: Callable[[], float] = getattr(ring, "clock", time.perf_counter)  # a simulated ring has its own
        self._request_id = 0
        self.done = True

    # --- request lifecycle

    def start(self, prompt_ids: list[int]) -> None:
        self._request_id = next(_REQUEST_IDS)
        self.generator.manual_seed(self.config.sampling.seed)
        self.prompt_len = len(prompt_ids)
        self.out: list[int] = []
        self.epoch, self.prefix_len, self.seg_counter = 0, 0, 0
        self.flights: list[_Flight] = []
        self._epoch_survivors: list[np.ndarray] = []  # survivors of the prune that ended each epoch
        self.tree: TokenTree | None = None
        self.sent = self.verified = 0
        self.planned: list[int] = []
        self.hidden_rows: list[torch.Tensor] = []
        self.prefill_left = 0
        self.stats = dict(verifications=0, rounds=0, turns=0, decode_turns=0, in_flight=0)
        self.accepted_lengths: list[int] = []
        self.busy0 = self.ring.stage_busy_s()
        self.t0 = self.clock()
        self.ttft = 0.0
        self.stopped_by = "max_new_tokens"
        self.coordinator_s = self.draft_s = 0.0
        self.done = False
        self.drafter.reset()
        self.drafter.extend(list(prompt_ids), None)
        plan = getattr(self.ring, "stage_threads", None)  # local worker processes share this machine's cores
        self.stage_threads = plan(self.slots) if plan is not None else 0
        self._prefill_slots = self.slots if plan is not None else 1 << 30  # dedicated devices: all chunks at once
        self.ring.send(Reset(self._request_id, self.stage_threads), [])
        sizes = split_sizes(len(prompt_ids), -(-len(prompt_ids) // self.config.prefill_chunk))
        ends = list(itertools.accumulate(sizes))
        self._prefill_todo = [(end - size, end) for size, end in zip(sizes, ends)]  # chunks [start, end) not sent yet
        self._prompt_ids = torch.tensor(prompt_ids, dtype=torch.long)
        self.prefill_left = len(sizes)
        self._send_prefill()

    def _send_prefill(self) -> None:
        """Send the next prompt chunks. Stages on devices of their own take them all at once (they
        pipeline); local stages that share this machine's cores take as many as the request keeps
        segments in flight, since stages given every core for one segment at a time would otherwise
        fight over them (a 1024-token prompt over 4 stage processes on 2 cores took 6-10 s)."""
        while self._prefill_todo and len(self.flights) < self._prefill_slots:
            a, b = self._prefill_todo.pop(0)
            self._send_segment(self._prompt_ids[a:b], torch.arange(a, b), None, start=0, prefix_len=a)

    def step(self) -> bool:
        """Handle one message from the ring; False once the request is finished."""
        if self.done:
            return False
        item = self.ring.recv(self.config.stage_timeout_s)
        if item is None:
            raise StageLost(f"no reply from the pipeline for {self.config.stage_timeout_s:.0f} s")
        t0 = time.perf_counter()
        try:
            self._handle(*item)
        finally:
            self.coordinator_s += time.perf_counter() - t0
        return not self.done

    def _handle(self, msg: object, tensors: list[torch.Tensor]) -> None:
        if not isinstance(msg, Segment) or msg.request_id != self._request_id:
            return
        self.stats["turns"] += 1
        if self.prefill_left:
            self._on_prefill(tensors[0])
        else:
            self.stats["decode_turns"] += 1
            self.stats["in_flight"] += sum(f.end > f.start for f in self.flights)
            self._on_segment(msg, tensors[0])

    def generate(self, prompt_ids: list[int]) -> Result:
        self.start(prompt_ids)
        while self.step():
            pass
        return self.result()

    def result(self) -> Result:
        seconds = self.clock() - self.t0
        busy = [b - b0 for b, b0 in zip(self.ring.stage_busy_s(), self.busy0)]
        return Result(list(self.out), self.prompt_len, seconds, self.ttft, self.stats["verifications"],
                      self.stats["rounds"], self.stats["turns"], list(self.accepted_lengths),
                      [b / seconds if seconds > 0 else 0.0 for b in busy], self.stopped_by,
                      self.coordinator_s, self.draft_s, self.slots,
                      self.stats["in_flight"] / max(self.stats["decode_turns"], 1), self.stage_threads)

    # --- prefill

    def _on_prefill(self, hidden: torch.Tensor) -> None:
        self.flights.pop(0)
        self.hidden_rows.append(hidden)
        self.prefill_left -= 1
        if self.prefill_left:
            self._send_prefill()
            return
        features = torch.cat(self.hidden_rows)  # [P, hidden]
        self.hidden_rows = []
        self.prefix_len = self.prompt_len
        first = self._sample_one(features[-1:])
        self.ttft = self.clock() - self.t0
        self.drafter.extend([first], features)
        if self._emit([first]):
            self._new_round()

    # --- decoding

    def _on_segment(self, msg: Segment, hidden: torch.Tensor) -> None:
        flight = self.flights.pop(0)
        while flight.seg_id != msg.seg_id:  # stages drop segments that pruning emptied
            if flight.end > flight.start or not self.flights:
                raise RuntimeError(f"segment {msg.seg_id} came back out of order (expected {flight.seg_id})")
            flight = self.flights.pop(0)
        if flight.start == flight.end:
            self._refill()
            return
        rows = self._current_rows(msg, hidden.shape[0])
        if flight.start != self.verified:
            raise RuntimeError(f"segment covers [{flight.start}, {flight.end}) but {self.verified} nodes are verified")
        self.hidden_rows.append(hidden[rows])
        self.verified = flight.end
        whole = self.verified == len(self.tree) and not any(f.end > f.start for f in self.flights)
        if self.policy.stepwise or whole:
            self._accept()
        self._refill()

    def _current_rows(self, msg: Segment, n_rows: int) -> torch.Tensor:
        """Rows of a returned segment that survive the prunes made since it left (in current order)."""
        idx = np.arange(msg.start, msg.start + n_rows)  # node indices in the segment's epoch
        rows = np.arange(n_rows)
        for survivors in self._epoch_survivors[msg.epoch :]:
            if survivors.size == 0:
                return torch.zeros(0, dtype=torch.long)
            at = np.searchsorted(survivors, idx)
            ok = (at < survivors.size) & (survivors[np.minimum(at, survivors.size - 1)] == idx)
            rows, idx = rows[ok], at[ok]
        return torch.from_numpy(rows)

    def _accept(self) -> None:
        hidden = torch.cat(self.hidden_rows)  # [verified, hidden]
        logits = self.head.logits(hidden)
        if self.config.sampling.temperature > 0:
            probs = logits_to_probs(logits, self.config.sampling.temperature, self.config.sampling.top_k)
            acc = accept_stochastic(self.tree, probs, self.generator)
        else:
            acc = accept_greedy(self.tree, logits.argmax(-1).numpy())
        self.stats["verifications"] += 1
        path = np.asarray(acc.path)
        new_tokens = [int(t) for t in self.tree.tokens[path[1:]]] + [acc.bonus_token]
        n_out = len(self.out)
        going = self._emit(new_tokens)
        self.accepted_lengths.append(len(self.out) - n_out)  # tokens past EOS or the limit do not count
        self.drafter.extend(new_tokens, hidden[torch.from_numpy(path)])
        survivors = self.tree.subtree(acc.next_node) if (going and acc.next_node is not None) else np.zeros(0, np.int64)
        keep = np.concatenate((path, survivors))
        self._prune(keep, len(path), survivors)
        if not going:
            return
        if acc.next_node is None:
            self._new_round()
        elif self.policy.expand:
            self._expand(self.spec.expand_budget)

    def _prune(self, keep: np.ndarray, n_accepted: int, survivors: np.ndarray) -> None:
        self.epoch += 1
        self.ring.send(Prune(self._request_id, self.epoch, self.prefix_len, n_accepted,
                             tuple(int(k) for k in keep)), [])
        self._epoch_survivors.append(survivors)
        for f in self.flights:
            f.start, f.end = (int(np.searchsorted(survivors, f.start)), int(np.searchsorted(survivors, f.end)))
        self.sent = int(np.searchsorted(survivors, self.sent))
        self.prefix_len += n_accepted
        self.verified = 0
        self.hidden_rows = []
        self.tree = prune(self.tree, survivors) if survivors.size else None
        self.planned = []

    def _new_round(self) -> None:
        self.stats["rounds"] += 1
        if not self.policy.tree:
            self.tree = from_parents([self.drafter.tokens[-1]], [-1])
        elif self.policy.by_level:
            self.tree = self._draft(self.spec.pipedec_width * self.slots, self.slots, self.spec.pipedec_width)
        else:
            self.tree = self._draft(self.spec.budget, self.spec.depth, self.spec.topk)
        self.sent = self.verified = 0
        limit = None if self.config.strategy == "chunk" else self.segment_max
        self.planned = [] if self.policy.by_level else split_sizes(len(self.tree), self.slots, limit)
        self._refill()

    def _draft(self, budget: int, depth: int, topk: int) -> TokenTree:
        t0 = time.perf_counter()
        tree = self.drafter.draft(topk=topk, depth=depth, budget=budget, order=self.policy.order)
        self.draft_s += time.perf_counter() - t0
        return tree

    def _expand(self, extra: int) -> bool:
        """Re-draft from the current root and append new nodes; False when nothing new came.

        flowspec re-drafts the usual tree shape with a larger budget; pipedec grows one level deeper.
        """
        if self.tree is None or len(self.tree) >= self.spec.max_tree:
            return False
        budget = min(len(self.tree) - 1 + extra, self.spec.max_tree - 1)
        if self.policy.by_level:
            width = self.spec.pipedec_width
            tree2 = self._draft(len(self.tree) - 1 + width, int(self.tree.depth.max()) + 1, width)
        else:
            tree2 = self._draft(budget, self.spec.depth, self.spec.topk)
        self.tree, n_new = merge(self.tree, tree2)
        return n_new > 0

    def _refill(self) -> None:
        """Keep `slots` non-empty segments in flight while there is anything to send."""
        if self.done or self.tree is None:
            return
        while sum(f.end > f.start for f in self.flights) < self.slots:
            if self.sent >= len(self.tree):
                can_grow = self.policy.expand or self.policy.by_level
                if not can_grow or not self._expand(self.spec.expand_budget):
                    return
            self._send_tree_segment(self._next_size())

    def _next_size(self) -> int:
        waiting = len(self.tree) - self.sent
        if self.planned:
            return min(self.planned.pop(0), waiting)
        if self.policy.by_level:
            depth = self.tree.depth
            return int(np.searchsorted(depth[self.sent :], depth[self.sent], side="right"))
        return min(waiting, self.expand_segment_max)

    def _send_tree_segment(self, size: int) -> None:
        a, b = self.sent, self.sent + size
        ids = torch.from_numpy(self.tree.tokens[a:b].copy())
        pos = torch.from_numpy(self.tree.positions(self.prefix_len, a, b).copy())
        mask = torch.from_numpy(self.tree.mask(a, b).copy())
        self._send_segment(ids, pos, mask, start=a, prefix_len=self.prefix_len)
        self.sent = b

    def _send_segment(self, ids, positions, mask, *, start: int, prefix_len: int) -> None:
        self.seg_counter += 1
        msg = Segment(self._request_id, self.seg_counter, self.epoch, prefix_len, start, mask is not None)
        self.ring.send(msg, [ids, positions] + ([mask] if mask is not None else []))
        self.flights.append(_Flight(self.seg_counter, start, start + int(positions.shape[0])))

    # --- tokens

    def _sample_one(self, hidden: torch.Tensor) -> int:
        logits = self.head.logits(hidden)[0]
        if self.config.sampling.temperature > 0:
            probs = logits_to_probs(logits, self.config.sampling.temperature, self.config.sampling.top_k)
            return int(torch.multinomial(probs, 1, generator=self.generator))
        return int(logits.argmax())

    def _emit(self, tokens: list[int]) -> bool:
        """Append tokens to the output up to EOS or max_new_tokens; False when the request is done."""
        kept = []
        for t in tokens:
            kept.append(t)
            if t in self.eos_ids:
                self.stopped_by = "eos"
                break
            if len(self.out) + len(kept) >= self.config.max_new_tokens:
                break
        self.out.extend(kept)
        if kept:
            self.on_tokens(kept)
        self.done = self.stopped_by == "eos" or len(self.out) >= self.config.max_new_tokens
        return not self.done
