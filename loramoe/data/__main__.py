"""python -m loramoe.data build CONFIG OUTDIR [--overwrite] | python -m loramoe.data list"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from loramoe.data.hub import DatasetNotAvailableError
from loramoe.data.mixture import (
    MixtureConfig,
    MixtureError,
    build_mixture,
    summary_table,
    write_mixture,
)
from loramoe.data.records import RecordsError
from loramoe.data.registry import list_tasks
from loramoe.folders import folder_problem


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loramoe.data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="write train sets per scale, the eval set, a summary")
    build.add_argument("config", help="mixture config (.toml, .yaml or .json)")
    build.add_argument("outdir")
    build.add_argument("--overwrite", action="store_true",
                       help="replace a mixture already in OUTDIR (its files, as a set)")
    sub.add_parser("list", help="list the registered tasks")
    args = parser.parse_args(argv)
    if args.command == "list":
        for task in list_tasks():
            print(f"{task.name:<24} {task.task_type:<11} {task.source:<8} {task.metric:<12} "
                  f"{task.description}")
        return 0
    if problem := folder_problem(args.outdir):
        print(f"error: OUTDIR: {problem}", file=sys.stderr)
        return 2
    if (Path(args.outdir) / "manifest.json").exists() and not args.overwrite:
        print(f"error: {args.outdir} already holds a mixture (manifest.json); choose another "
              "folder, or pass --overwrite to replace it (earlier runs may have trained on "
              "its files)", file=sys.stderr)
        return 2
    try:
        config = MixtureConfig.from_file(args.config)
    except (MixtureError, OSError) as err:
        print(f"error: {args.config}: {err}", file=sys.stderr)
        return 2
    try:  # a local task's file unreadable or lacking its columns, a hub dataset unreachable
        built = build_mixture(config)
    except (MixtureError, RecordsError, DatasetNotAvailableError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    write_mixture(built, config, args.outdir)
    print(summary_table(built).to_string(index=False))
    if built.dropped_overlap:
        print(f"eval items dropped for overlap with training: {built.dropped_overlap}")
    if built.shortfall:
        print(f"tasks short of their quota at the largest scale: {built.shortfall}")
    print(f"wrote {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
