"""An evaluation's files in its folder: written whole or not at all.

`evaluate` writes into a staging folder inside the output folder and moves the files into
place only once every one of them is written, metrics.json last, so a failed evaluation
leaves an earlier one in that folder whole and a fresh folder without a partial one (which
`--base` would otherwise read as a finished base evaluation). Imports nothing heavy: the
CLI checks `--out` with it before torch loads.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# what an evaluation writes; metrics.json last, as the mark of a complete one
EVALUATION_FILES = ("predictions.jsonl", "probe.jsonl", "router.json", "router.png",
                    "metrics.json")


def held_evaluation(folder: str | Path) -> list[str]:
    """The evaluation files `folder` already holds, in EVALUATION_FILES' order."""
    return [name for name in EVALUATION_FILES if (Path(folder) / name).exists()]


@contextmanager
def staged(out: str | Path) -> Iterator[Path]:
    """A folder to write an evaluation into; on success its files replace the evaluation in
    `out` as one set (an earlier evaluation's files it did not write again are removed), on
    failure `out` is left as it was. Other files in `out` are never touched."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".evaluation-", dir=out))  # same file system
    try:
        yield staging
        written = held_evaluation(staging)
        for name in EVALUATION_FILES:
            if name not in written and (out / name).exists():
                (out / name).unlink()  # the earlier evaluation's, e.g. a router it had
        for name in written:  # metrics.json last: present means complete
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
