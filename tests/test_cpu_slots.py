"""Parallel local branches share the cores: one slot per branch at a time, threads split."""

from __future__ import annotations

import multiprocessing as mp
import os
import time


def _hold(lock_dir: str, slots: int, out, seconds: float) -> None:
    import torch

    from loramoe.pipeline import cpu_slot

    with cpu_slot(lock_dir, slots):
        start = time.monotonic()
        threads = torch.get_num_threads()
        time.sleep(seconds)
        out.put((start, time.monotonic(), threads))


def run_holders(tmp_path, slots: int, workers: int, seconds: float = 0.4):
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_hold, args=(str(tmp_path), slots, out, seconds))
             for _ in range(workers)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    return sorted(results)


def overlapping(intervals) -> int:
    """Largest number of intervals open at the same time."""
    events = sorted([(s, 1) for s, _, _ in intervals] + [(e, -1) for _, e, _ in intervals])
    open_now = peak = 0
    for _, delta in events:
        open_now += delta
        peak = max(peak, open_now)
    return peak


def test_one_slot_serialises_branches_and_gives_all_cores(tmp_path):
    results = run_holders(tmp_path, slots=1, workers=3)
    assert overlapping(results) == 1
    assert all(threads == (os.cpu_count() or 1) for _, _, threads in results)


def test_two_slots_split_the_cores(tmp_path):
    results = run_holders(tmp_path, slots=2, workers=4)
    assert overlapping(results) <= 2
    assert all(threads == max(1, (os.cpu_count() or 1) // 2) for _, _, threads in results)
