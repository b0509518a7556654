"""Progress: a tqdm bar on a terminal, whole lines anywhere else.

A bar redraws one line with carriage returns and ends it only when it closes. Metaflow's
local runtime reads every task's output with readline(): a task in the middle of a bar
holds the runtime until the bar ends, so the other parallel branches fill their output pipes
(64 KiB) and stop (a 507-step training stalled its two sibling branches at ~350 steps).
Logs written to files or CI consoles also read better as lines.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO


class LineProgress:
    """The part of tqdm's interface the loops use, written as one line per tenth done."""

    def __init__(self, total: int, desc: str, initial: int = 0, file: TextIO | None = None,
                 lines: int = 10) -> None:
        self.total, self.desc, self.n = max(total, 1), desc, initial
        self.file = file or sys.stderr
        self.every = max(1, -(-self.total // lines))  # ceil: at most `lines` lines
        self.postfix = ""

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if self.n // self.every > before // self.every or self.n >= self.total > before:
            tail = f" ({self.postfix})" if self.postfix else ""
            print(f"{self.desc}: {self.n}/{self.total}{tail}", file=self.file, flush=True)

    def close(self) -> None:
        pass


class NoProgress(LineProgress):
    def update(self, n: int = 1) -> None:
        pass


def progress(total: int, desc: str, enabled: bool = True, initial: int = 0):
    """A tqdm bar when stderr is a terminal, else a LineProgress (silent when disabled)."""
    if not enabled:
        return NoProgress(total, desc, initial)
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc)
    return LineProgress(total, desc, initial)


def track(items: Iterable, total: int, desc: str, enabled: bool = True) -> Iterator:
    """Iterate over items, reporting progress as `progress` does."""
    bar = progress(total, desc, enabled)
    for item in items:
        yield item
        bar.update(1)
    bar.close()


def whole_lines_off_terminal() -> None:
    """For entry points (CLIs, flow steps): off a terminal, the libraries' own bars (e.g.
    transformers' "Loading weights", MLflow's "Downloading artifacts") stay off too, so the
    process writes whole lines only."""
    if sys.stderr.isatty():
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # read on transformers' import
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # read per transfer
    if "transformers" in sys.modules:
        from transformers.utils import logging

        logging.disable_progress_bar()
