"""great-expectations suites for train and eval records (ephemeral context, no project folder).

Each failed expectation becomes a `Failure` naming the column, the rule, how many rows break
it and example rows (line number in the file and id), so a user can fix the file without
reading code.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from loramoe.data.records import (
    CHOICES_RULE,
    EVAL_COLUMNS,
    METRICS,
    TRAIN_COLUMNS,
    normalize_text,
    read_records,
    row_name,
    shown_value,
)
from validation.derived import shown_column, with_derived

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
logging.getLogger("great_expectations").setLevel(logging.ERROR)

DEFAULT_TYPES = ("knowledge", "downstream")
DEFAULT_MAX_CHARS = 8000


@dataclass
class Failure:
    expectation: str
    column: str | None
    rule: str
    unexpected_count: int | None
    examples: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        where = f"column '{self.column}'" if self.column else "table"
        count = f": {self.unexpected_count} row(s) fail" if self.unexpected_count else ""
        examples = f", e.g. {'; '.join(self.examples)}" if self.examples else ""
        return f"{where} {self.rule} [{self.expectation}]{count}{examples}"


@dataclass
class ValidationReport:
    name: str
    kind: str
    rows: int
    failures: list[Failure]
    docs_path: str | None = None

    @property
    def success(self) -> bool:
        return not self.failures

    def summary(self) -> str:
        head = f"{self.name} ({self.kind}, {self.rows} rows): "
        if self.success:
            return head + "all expectations met"
        return head + f"{len(self.failures)} expectation(s) failed\n" + "\n".join(
            f"  - {f}" for f in self.failures)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "rows": self.rows,
                "success": self.success, "docs_path": self.docs_path,
                "failures": [f.__dict__ for f in self.failures]}


def _expectations(frame: pd.DataFrame, kind: str, task_types: list[str], max_chars: int,
                  max_tokens: int | None, check_overlap: bool) -> list[tuple[Any, str]]:
    """(GX expectation, plain-words rule) for the columns present; missing ones fail exist."""
    import great_expectations.expectations as gxe

    columns = TRAIN_COLUMNS if kind == "train" else EVAL_COLUMNS
    present = set(frame.columns)
    out: list[tuple[Any, str]] = [
        (gxe.ExpectColumnToExist(column=c), "is required but missing") for c in columns
    ]
    out.append((gxe.ExpectTableRowCountToBeBetween(min_value=1), "must have at least one row"))
    text_columns = ["id", "task", "task_type", "prompt"] + (["response"] if kind == "train"
                                                           else [])
    for col in text_columns:
        if col in present:
            out.append((gxe.ExpectColumnValuesToNotBeNull(column=col), "must not be empty/null"))
            out.append((gxe.ExpectColumnValuesToBeInSet(column=f"_is_text_{col}",
                                                        value_set=[True]),
                        "must be a non-empty string (not a number, list or null)"))
            out.append((gxe.ExpectColumnValueLengthsToBeBetween(
                column=f"_str_{col}", min_value=1, max_value=max_chars),
                f"must be 1..{max_chars} characters long"))
    if kind == "train" and "response" in present:
        out.append((gxe.ExpectColumnValuesToBeInSet(column="_serialized_list_response",
                                                    value_set=[False]),
                    "must be the answer text, not a serialised list such as \"['42' '42.0']\" "
                    "(map a list column to `answers`, or store one answer per row)"))
    if "id" in present:
        out.append((gxe.ExpectColumnValuesToBeUnique(column="id"), "must be unique"))
    if "task_type" in present:
        out.append((gxe.ExpectColumnValuesToBeInSet(column="task_type", value_set=task_types),
                    f"must be one of the declared types {task_types}"))
        if kind == "train":
            out.append((gxe.ExpectColumnDistinctValuesToContainSet(
                column="task_type", value_set=task_types),
                f"must contain every declared type {task_types}"))
    if kind == "eval":
        if "metric" in present:
            out.append((gxe.ExpectColumnValuesToBeInSet(column="metric", value_set=list(METRICS)),
                        f"must be one of {list(METRICS)}"))
        if "answers" in present:
            out.append((gxe.ExpectColumnValuesToBeBetween(column="_n_answers", min_value=1),
                        "answers must be a non-empty list of non-empty strings"))
        if "choices" in present:
            out.append((gxe.ExpectColumnValuesToBeInSet(column="_choices_ok", value_set=[True]),
                        CHOICES_RULE))
        if check_overlap:
            out.append((gxe.ExpectColumnValuesToBeInSet(column="_in_train", value_set=[False]),
                        "prompt must not appear in the training data (train/eval overlap)"))
    if max_tokens is not None:
        out.append((gxe.ExpectColumnValuesToBeBetween(column="_n_tokens", max_value=max_tokens),
                    f"prompt+response must fit in max_length={max_tokens} tokens"))
    for col in [c for c in frame.columns if c.startswith("_control_text_")]:
        out.append((gxe.ExpectColumnValuesToBeInSet(column=col, value_set=[False]),
                    "must not hold a control token's text (e.g. '</s>', '<|im_end|>'): the "
                    "tokenizer reads it as the token, which ends or opens a turn there"))
    return out


def _examples(frame: pd.DataFrame, indices: list[int] | None, column: str | None,
              source: Path | None) -> list[str]:
    out = []
    shown = shown_column(column)
    for index in (indices or [])[:3]:
        value = ""
        if shown and shown in frame:
            value = f" value={shown_value(frame[shown].iloc[index])}"
        out.append(f"{row_name(frame, index, source, shown != 'id')}{value}")
    return out


def _context(docs_dir: Path | None):
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    # No "Calculating Metrics" bar: its carriage returns broke a flow task's output lines
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        context.add_data_docs_site(site_name="loramoe", site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend",
                              "base_directory": str(Path(docs_dir).resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
    return context


def validate_frame(
    frame: pd.DataFrame,
    kind: str,
    name: str = "records",
    task_types: list[str] | tuple[str, ...] = DEFAULT_TYPES,
    max_chars: int = DEFAULT_MAX_CHARS,
    tokenizer=None,
    max_tokens: int | None = None,
    train_prompts: set[str] | None = None,
    docs_dir: str | Path | None = None,
    source: Path | None = None,
) -> ValidationReport:
    """Run the train or eval suite on a DataFrame of records."""
    import great_expectations as gx

    if kind not in ("train", "eval"):
        raise ValueError(f"kind must be 'train' or 'eval', got {kind!r}")
    task_types = list(task_types)
    data = with_derived(frame, kind, tokenizer, train_prompts)
    docs = Path(docs_dir) if docs_dir else None
    context = _context(docs)
    asset = context.data_sources.add_pandas("records").add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("all")
    suite = context.suites.add(gx.ExpectationSuite(name=f"loramoe_{kind}"))
    rules = {}
    for expectation, rule in _expectations(data, kind, task_types, max_chars, max_tokens,
                                           train_prompts is not None):
        added = suite.add_expectation(expectation)
        rules[id(added)] = rule
        rules[_key(added)] = rule
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=f"{name}_{kind}", data=batch, suite=suite))
    if docs is not None:
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"{name}_{kind}_checkpoint", validation_definitions=[definition],
            actions=[gx.checkpoint.UpdateDataDocsAction(name="docs")],
            result_format={"result_format": "COMPLETE"}))
        run = checkpoint.run(batch_parameters={"dataframe": data})
        result = next(iter(run.run_results.values()))
    else:
        result = definition.run(batch_parameters={"dataframe": data},
                                result_format={"result_format": "COMPLETE"})
    failures = _failures(result, data, rules, source)
    docs_path = None
    if docs is not None:
        context.build_data_docs()
        docs_path = str(docs / "index.html")
    return ValidationReport(name, kind, len(frame), failures, docs_path)


def _key(expectation) -> str:
    config = expectation.configuration if hasattr(expectation, "configuration") else expectation
    kwargs = {k: v for k, v in config.kwargs.items() if k in ("column", "value_set",
                                                               "min_value", "max_value")}
    return f"{config.type}:{json.dumps(kwargs, sort_keys=True, default=str)}"


def _failures(result, data: pd.DataFrame, rules: dict, source: Path | None) -> list[Failure]:
    missing_columns = {r.expectation_config.kwargs.get("column") for r in result.results
                       if r.expectation_config.type == "expect_column_to_exist" and not r.success}
    failures = []
    for res in result.results:
        if res.success:
            continue
        config = res.expectation_config
        column = config.kwargs.get("column")
        if column in missing_columns and config.type != "expect_column_to_exist":
            continue  # one message per missing column is enough
        shown = shown_column(column)
        res_dict = res.result or {}
        failures.append(Failure(
            expectation=config.type, column=shown, rule=rules.get(_key(config), config.type),
            unexpected_count=res_dict.get("unexpected_count"),
            examples=_examples(data, res_dict.get("unexpected_index_list"), column, source),
        ))
    return failures


def validate_file(path: str | Path, kind: str, **kwargs) -> ValidationReport:
    path = Path(path)
    try:
        frame = read_records(path)
    except (FileNotFoundError, ValueError) as err:
        return ValidationReport(path.name, kind, 0, [Failure("read_file", None, str(err), None)])
    return validate_frame(frame, kind, name=path.stem, source=path, **kwargs)


class ManifestError(ValueError):
    """A folder given as a mixture has no usable manifest.json; the message says why."""


def read_manifest(outdir: Path) -> dict:
    """A built mixture folder's manifest.json (what `python -m loramoe.data build` writes),
    with the keys validation reads."""
    path = outdir / "manifest.json"
    if not path.is_file():
        raise ManifestError(f"{outdir}: no manifest.json there; a folder given to validation "
                            "must be one `python -m loramoe.data build` wrote (or pass a "
                            "records file)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: not valid JSON ({err})") from None
    missing = [k for k in ("config", "train_files", "eval_file")
               if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise ManifestError(f"{path}: lacks key(s) {missing}")
    return manifest


def validate_mixture(outdir: str | Path, task_types: list[str] | None = None,
                     docs_dir: str | Path | None = None, **kwargs) -> list[ValidationReport]:
    """Every scale's train file and the eval file of a `python -m loramoe.data build` folder;
    the eval set is also checked for overlap with the largest training set."""
    outdir = Path(outdir)
    manifest = read_manifest(outdir)
    task_types = task_types or manifest["config"].get("task_types", list(DEFAULT_TYPES))
    reports = []
    largest = None
    for _scale, name in sorted(manifest["train_files"].items(), key=lambda kv: int(kv[0])):
        reports.append(validate_file(outdir / name, "train", task_types=task_types,
                                     docs_dir=docs_dir, **kwargs))
        largest = outdir / name
    train_prompts = None
    if largest is not None and largest.is_file():
        train_prompts = set(read_records(largest)["prompt"].astype(str).map(normalize_text))
    reports.append(validate_file(outdir / manifest["eval_file"], "eval", task_types=task_types,
                                 train_prompts=train_prompts, docs_dir=docs_dir, **kwargs))
    return reports
