"""Threads per stage worker: planned by the ring per request, applied by the worker on Reset."""

from __future__ import annotations

import os

import pytest
import torch

from engine.ring_zmq import stage_threads
from engine.stage_worker import StageWorker
from engine.wire import Reset


class _Module:
    """Just enough of a StageModule for a Reset: it counts cache resets."""

    def __init__(self) -> None:
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1


@pytest.fixture
def keep_threads():
    before = torch.get_num_threads()
    yield before
    torch.set_num_threads(before)


def test_reset_with_threads_sets_the_workers_thread_count(keep_threads):
    worker = StageWorker(_Module(), 0, 2)
    wanted = keep_threads + 1

    out = worker.handle([(Reset(request_id=5, threads=wanted), [])])

    assert torch.get_num_threads() == wanted
    assert worker.module.resets == 1 and worker.request_id == 5
    assert [type(msg) for msg, _ in out] == [Reset]  # passed on to the next stage


def test_reset_without_threads_keeps_the_count(keep_threads):
    worker = StageWorker(_Module(), 0, 2)
    torch.set_num_threads(keep_threads + 2)

    worker.handle([(Reset(request_id=6), [])])

    assert torch.get_num_threads() == keep_threads + 2


def test_one_busy_stage_takes_every_core_and_side_by_side_stages_keep_their_share():
    cores = len(os.sched_getaffinity(0))

    assert stage_threads(1, 1) == cores
    assert stage_threads(0, 3) == cores  # nothing in flight yet counts as one
    assert stage_threads(2, 1) == 1
    assert stage_threads(5, 3) == 3
