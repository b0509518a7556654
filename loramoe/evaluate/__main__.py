"""Evaluate a base model or a trained run on an eval file.

    python -m loramoe.evaluate --eval-file EVAL.jsonl --out DIR (--model NAME | --run RUN_DIR)
                               [--base DIR_OF_BASE_EVAL] [--overwrite]

Writes predictions.jsonl, probe.jsonl and metrics.json (and router.json/.png for LoRAMoE
runs) into --out, all at once when the evaluation completes; exit 2 on a bad eval file, with
column, line and id named, or on an --out that already holds an evaluation (unless
--overwrite) or is the --base folder, before any model is loaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m loramoe.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-file", required=True)
    parser.add_argument("--out", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="evaluate a base model (name, hub id or folder)")
    source.add_argument("--run", help="evaluate a trained run folder (python -m loramoe.train)")
    parser.add_argument("--base", help="folder of the base model's evaluation, for retention")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16", "fp16"],
                        help="frozen weights' dtype (default: the run's, else auto)")
    parser.add_argument("--device", help="e.g. cpu, cuda, cuda:1 (default: a GPU if any)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an evaluation already in --out (once this one completes)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size: must be >= 1, got {args.batch_size}")
    if problem := out_problem(Path(args.out), args.base, args.overwrite):
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from loramoe.progress import whole_lines_off_terminal

    whole_lines_off_terminal()
    from loramoe.data.records import RecordsError, check_records, read_records
    from loramoe.train.config import TrainConfigError, read_run_config

    try:  # the eval file's schema and the run's config, before torch and the model load
        check_records(read_records(Path(args.eval_file)), "eval", args.eval_file)
        run_config = read_run_config(args.run) if args.run else None
    except (RecordsError, TrainConfigError, FileNotFoundError) as err:
        where = {TrainConfigError: "--run: ", FileNotFoundError: "--eval-file: "}.get(type(err), "")
        print(f"error: {where}{err}", file=sys.stderr)
        return 2
    from loramoe.adapter import AdapterError  # torch, not yet transformers
    from loramoe.train.config import check_run_weights

    if args.run:
        try:  # the run's weights files, before the model loads
            check_run_weights(args.run, run_config)
        except AdapterError as err:
            print(f"error: --run: {err}", file=sys.stderr)
            return 2
    from loramoe.cores import cap_threads_to_cores
    from loramoe.evaluate.run import evaluate
    from loramoe.model_paths import ModelNotAvailableError
    from loramoe.precision import PrecisionError, resolve_device

    cap_threads_to_cores()  # a container's CPU quota, which torch's default ignores
    try:
        resolve_device(args.device, "--device")  # named as the user typed it
        metrics = evaluate(args.eval_file, args.out, model=args.model, run=args.run,
                           base_dir=args.base, batch_size=args.batch_size, dtype=args.dtype,
                           device=args.device)
    except (RecordsError, PrecisionError, FileNotFoundError, AdapterError,
            ModelNotAvailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in metrics.items() if k != "per_task"}, indent=2))
    if "base_scored_otherwise" in metrics:
        print(f"warning: --base {args.base} was scored otherwise than this evaluation "
              f"({metrics['base_scored_otherwise']}): its retention and vs_base pair items "
              "scored under different settings", file=sys.stderr)
    return 0


def out_problem(out: Path, base: str | None, overwrite: bool) -> str:
    """Why --out may not take this evaluation ('' if it may): it would replace the base's
    evaluation it is compared with, or an earlier evaluation the user did not ask to replace."""
    from loramoe.evaluate.outputs import held_evaluation
    from loramoe.folders import folder_problem

    if problem := folder_problem(out):
        return f"--out: {problem}"
    if base is not None and out.resolve() == Path(base).resolve():
        return (f"--out is the --base folder ({base}): this evaluation would replace the base "
                "evaluation it is compared with; choose another --out")
    if (held := held_evaluation(out)) and not overwrite:
        return (f"--out {out} already holds an evaluation ({', '.join(held)}); choose another "
                "folder, or pass --overwrite to replace it (replaced only once the new "
                "evaluation completes)")
    return ""


if __name__ == "__main__":
    sys.exit(main())
