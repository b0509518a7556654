"""python -m validation PATH [--kind train|eval] [--docs DIR]

PATH is a records file (.jsonl/.json/.csv/.parquet) or a folder written by
`python -m loramoe.data build` (all scales and the eval set, with the overlap check).
Prints a summary, writes Data Docs HTML with --docs, exits 1 when any expectation fails
(2 when a folder is not one that build wrote).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from validation.suites import (
    DEFAULT_MAX_CHARS,
    ManifestError,
    validate_file,
    validate_mixture,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m validation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path")
    parser.add_argument("--kind", choices=["train", "eval"], default="train")
    parser.add_argument("--docs", help="write great-expectations Data Docs HTML here")
    parser.add_argument("--types", default=None,
                        help="comma-separated declared task types (default knowledge,downstream)")
    parser.add_argument("--max-chars", type=int, default=DEFAULT_MAX_CHARS)
    parser.add_argument("--tokenizer", help="model name/folder: also check token lengths")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--json", help="write the structured result here")
    args = parser.parse_args(argv)
    if problem := argument_problem(args):
        parser.error(problem)

    kwargs = {"max_chars": args.max_chars, "docs_dir": args.docs}
    if args.tokenizer:
        from transformers import AutoTokenizer

        from loramoe.model import resolve_model_path
        from loramoe.model_paths import ModelNotAvailableError

        try:
            kwargs["tokenizer"] = AutoTokenizer.from_pretrained(
                resolve_model_path(args.tokenizer))
        except (ModelNotAvailableError, OSError) as err:
            print(f"error: --tokenizer: {err}", file=sys.stderr)
            return 2
        kwargs["max_tokens"] = args.max_tokens or 512
    types = args.types.split(",") if args.types else None
    path = Path(args.path)
    if path.is_dir():
        try:
            reports = validate_mixture(path, task_types=types, **kwargs)
        except ManifestError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    else:
        if types:
            kwargs["task_types"] = types
        reports = [validate_file(path, args.kind, **kwargs)]
    for report in reports:
        print(report.summary())
    docs = {r.docs_path for r in reports if r.docs_path}
    if docs:
        print(f"Data Docs: {', '.join(sorted(docs))}")
    if args.json:
        Path(args.json).write_text(json.dumps([r.to_dict() for r in reports], indent=2))
    return 0 if all(r.success for r in reports) else 1


def argument_problem(args: argparse.Namespace) -> str:
    """What is wrong with the arguments ('' if nothing), told before any file is read."""
    from loramoe.folders import folder_problem

    if args.max_chars < 1:
        return f"--max-chars: must be >= 1, got {args.max_chars}"
    if args.max_tokens is not None and (args.max_tokens < 1 or not args.tokenizer):
        return (f"--max-tokens: must be >= 1, got {args.max_tokens}" if args.max_tokens < 1
                else "--max-tokens needs --tokenizer (the tokenizer that counts the tokens)")
    if args.docs and (problem := folder_problem(args.docs)):
        return f"--docs: {problem}"
    if args.json and (problem := folder_problem(Path(args.json).absolute().parent)):
        return f"--json: {args.json} cannot be written ({problem})"
    return ""


if __name__ == "__main__":
    sys.exit(main())
