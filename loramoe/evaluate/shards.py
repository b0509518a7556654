"""One evaluation's batches split over processes on a CPU, every output as one process
computes it.

Why: the pipeline evaluates the base model alone, at a branch's thread count (the count is
part of the rounding in bf16, cache.rounding), so with two branches at a time on two cores
one core idled through the whole base evaluation. A shard takes every `count`-th batch of
the *same* batches (same items, same padding, same shapes) at that same thread count, so
each prediction and log-prob is bit for bit what one process computes
(tests/test_shards.py); the evaluation's settings and cache key do not change.

A worker is `python -m loramoe.evaluate.shards JOB`: a plain subprocess rather than
multiprocessing's spawn, which re-imports the caller's main script in the child (a script
without a `__main__` guard would run again there).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Shard:
    """Batches index, index + count, index + 2·count, ... of an evaluation."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"Shard.index: must be in [0, {self.count}), got {self.index}")

    def take(self, batches: list[T]) -> list[T]:
        return batches[self.index::self.count]


WHOLE = Shard()


@dataclass
class Worker:
    """A started worker process and the files it reads and writes."""

    process: subprocess.Popen
    result: Path
    log: Path

    def wait(self) -> Any:
        """Its result; a RuntimeError with the end of its log when it failed."""
        code = self.process.wait()
        if code != 0:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"evaluation worker {self.result.stem} failed (exit {code}):\n"
                               f"{tail}")
        return pickle.loads(self.result.read_bytes())

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_worker(folder: Path, name: str, job: dict[str, Any]) -> Worker:
    """Run `work(job)` in a new interpreter; its output goes to a log file, not a pipe (a
    full pipe would stall it while this process computes its own shard)."""
    job_file, result, log = (folder / f"{name}.{ext}" for ext in ("job", "result", "log"))
    job_file.write_bytes(pickle.dumps(job))
    package_root = str(Path(__file__).resolve().parents[2])  # importable as this one is
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [package_root, *filter(None, [os.environ.get("PYTHONPATH")])])}
    with log.open("wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "loramoe.evaluate.shards",
                                    str(job_file), str(result)], stdout=out,
                                   stderr=subprocess.STDOUT, env=env)
    return Worker(process, result, log)


def work(job: dict[str, Any]) -> Any:
    """A worker's part: the model loaded as the parent loaded it, at the parent's thread
    count, then `answer` on its shard (loramoe/evaluate/run.py)."""
    import torch

    from loramoe.evaluate.run import answer, load_for_eval

    torch.set_num_threads(job["threads"])
    model, tokenizer, _ = load_for_eval(**job["load"])
    return answer(model, tokenizer, job["frame"], job["full"], job["batch_size"],
                  shard=job["shard"])


def main(argv: list[str]) -> int:
    job_file, result = (Path(a) for a in argv)
    result.write_bytes(pickle.dumps(work(pickle.loads(job_file.read_bytes()))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
