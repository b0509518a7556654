"""CPU slots: parallel local branches must not oversubscribe the cores."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path

from loramoe.pipeline.config import PipelineConfig


@contextlib.contextmanager
def cpu_slot(lock_dir: str | Path, slots: int):
    """Hold one of `slots` machine-wide slots (file locks); torch gets cores // slots threads.

    Metaflow starts every foreach branch at once locally; without this, 6 branches × 2
    threads would fight over 2 cores. On cluster workers each branch has its own machine
    and its own lock folder, so the slot is always free.
    """
    import torch

    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    handles = [open(lock_dir / f"slot{i}.lock", "w") for i in range(slots)]  # noqa: SIM115
    held = None
    try:
        while held is None:
            for handle in handles:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    held = handle
                    break
                except BlockingIOError:
                    continue
            if held is None:  # all busy: block on the first one
                fcntl.flock(handles[0], fcntl.LOCK_EX)
                held = handles[0]
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // slots))
        yield
    finally:
        if held is not None:
            fcntl.flock(held, fcntl.LOCK_UN)
        for handle in handles:
            handle.close()


def branch_slot(config: PipelineConfig):
    """The machine-wide CPU slot a branch's training or evaluation runs in."""
    return cpu_slot(Path(tempfile.gettempdir()) / "loramoe-cpu-slots",
                    config.local_parallel_branches)
