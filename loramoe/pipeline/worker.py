"""One process of a multi-process train branch (started by pipeline/launch.py).

    python -m loramoe.pipeline.worker --config train_config.json [--threads N]
        [--mlflow-run-id ID --tracking-uri URI]

Trains with the branch's resolved TrainConfig; the main process streams the step metrics
to the branch's MLflow run, as the one-process branch does.
"""

from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loramoe.pipeline.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--mlflow-run-id", default=None)
    parser.add_argument("--tracking-uri", default=None)
    args = parser.parse_args(argv)
    import torch

    from loramoe.train import TrainConfig, train

    if args.threads:
        torch.set_num_threads(args.threads)
    sink = None
    if args.mlflow_run_id:
        from loramoe.tracking import MlflowSink, use_store

        use_store(args.tracking_uri)
        sink = MlflowSink(args.mlflow_run_id)
    train(TrainConfig.from_file(args.config), sink=sink, progress=False)
    # Leave the process group before the interpreter exits, as torch asks.
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def exit_without_teardown() -> None:
    """Flush the output and end the process with status 0, skipping the interpreter's
    teardown. Called once everything is trained, written and every rank has passed the final
    barrier. Why: a gloo rank can still abort in that teardown ("terminate called without an
    active exception", SIGABRT), when C++ worker threads release tensors while the
    interpreter is being finalized (pytorch/pytorch PR #179291 describes it); the launcher
    then reports a finished training as failed. Seen twice under ZeRO-3 on CPU (CI, session
    18's clean-clone suite), although destroy_process_group had run. Nothing the worker
    needs runs at exit: its MLflow logging is synchronous and its files are closed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
    exit_without_teardown()
