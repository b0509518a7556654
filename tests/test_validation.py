"""great-expectations suites: each bad input trips its own expectation; a good mixture passes."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from loramoe.data import MixtureConfig, build_mixture, write_mixture
from loramoe.data.records import write_records
from validation import validate_file, validate_frame, validate_mixture
from validation.__main__ import main as validation_cli

GOOD = {"id": "a", "task": "t", "task_type": "knowledge", "prompt": "Q?", "response": "A."}
GOOD2 = {**GOOD, "id": "b", "task_type": "downstream", "prompt": "Sort 2, 1"}


@pytest.fixture(scope="module")
def mixture_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("mix")
    config = MixtureConfig.from_dict({"tasks": [{"name": "country_capital"},
                                                {"name": "arithmetic"}],
                                      "scales": [8, 16], "eval_size": 4})
    write_mixture(build_mixture(config), config, out)
    return out


def failed(report) -> set[tuple[str, str | None]]:
    return {(f.expectation, f.column) for f in report.failures}


def test_good_mixture_passes_with_data_docs(mixture_dir, tmp_path):
    reports = validate_mixture(mixture_dir, docs_dir=tmp_path / "docs")
    assert [r.success for r in reports] == [True, True, True], [r.summary() for r in reports]
    assert (tmp_path / "docs" / "index.html").is_file()


@pytest.mark.parametrize(("rows", "kind", "expected"), [
    ([{k: v for k, v in row.items() if k != "response"} for row in (GOOD, GOOD2)], "train",
     ("expect_column_to_exist", "response")),
    ([{**GOOD, "response": ""}, GOOD2], "train",
     ("expect_column_value_lengths_to_be_between", "response")),
    ([{**GOOD, "task_type": "trivia"}, GOOD2], "train",
     ("expect_column_values_to_be_in_set", "task_type")),
    ([GOOD, {**GOOD2, "id": "a"}], "train", ("expect_column_values_to_be_unique", "id")),
    ([{**GOOD, "prompt": "x" * 200}, GOOD2], "train",
     ("expect_column_value_lengths_to_be_between", "prompt")),
    ([GOOD, {**GOOD2, "task_type": "knowledge"}], "train",
     ("expect_column_distinct_values_to_contain_set", "task_type")),
    ([], "train", ("expect_table_row_count_to_be_between", None)),
])
def test_each_bad_input_trips_its_expectation(rows, kind, expected):
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(GOOD)) if not rows else pd.DataFrame(rows)
    report = validate_frame(frame, kind, max_chars=100)
    assert not report.success
    assert expected in failed(report), report.summary()
    assert all(f.column != "id" or f.examples for f in report.failures if f.unexpected_count)


def test_empty_answers_and_overlap_in_eval(mixture_dir):
    import pandas as pd

    row = {"id": "e", "task": "t", "task_type": "knowledge", "prompt": "Q?", "answers": [],
           "metric": "contains"}
    report = validate_frame(pd.DataFrame([row]), "eval")
    assert ("expect_column_values_to_be_between", "answers") in failed(report)
    report = validate_frame(pd.DataFrame([{**row, "answers": ["A"]}]), "eval",
                            train_prompts={"q"})
    assert ("expect_column_values_to_be_in_set", "prompt") in failed(report)
    assert "overlap" in report.summary()


def test_a_facts_choices_and_ids_are_checked_in_both_twins():
    """One option scores every model right and a repeated one splits a tie; a repeated id
    pairs an item with the wrong base item. Before: neither the suites nor the light check
    looked at choices, and the light check (which the evaluate CLI runs) not at ids."""
    import pandas as pd

    from loramoe.data.records import RecordsError, check_records

    row = {"id": "e", "task": "t", "task_type": "knowledge", "prompt": "Q?", "answers": ["A"],
           "metric": "contains", "choices": ["A", "B"]}
    good = pd.DataFrame([row, {**row, "id": "f", "choices": None}])
    check_records(good, "eval")
    assert validate_frame(good, "eval").success
    for bad, column in [([row, {**row, "id": "f", "choices": ["A"]}], "choices"),
                        ([row, {**row, "id": "f", "choices": ["A", "A"]}], "choices"),
                        # text and numbers are not lists of options ("AB" read as ["A", "B"],
                        # 5 a TypeError, in this check's first version)
                        ([row, {**row, "id": "f", "choices": "AB"}], "choices"),
                        ([row, {**row, "id": "f", "choices": 5}], "choices"),
                        ([row, {**row, "choices": ["A", "B"]}], "id")]:
        frame = pd.DataFrame(bad)
        with pytest.raises(RecordsError, match=f"column '{column}' must be"):
            check_records(frame, "eval")
        assert column in {f.column for f in validate_frame(frame, "eval").failures}


def test_overlong_in_tokens_given_a_tokenizer():
    import pandas as pd
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw)
    rows = [{**GOOD, "prompt": "w " * 50}, GOOD2]
    report = validate_frame(pd.DataFrame(rows), "train", tokenizer=tokenizer, max_tokens=20)
    assert ("expect_column_values_to_be_between", "prompt") in failed(report)
    # a frame from memory has no lines: its rows are named by id (before: "line 1")
    assert "e.g. id='a' value=" in report.summary() and "line" not in report.summary()


def test_control_token_text_fails_given_a_tokenizer(tmp_path, capsys):
    """A response mentioning '</s>' is encoded with the end token there (the model learns to
    stop mid-answer); an eval answer or prompt is probed with it. With --tokenizer the suite
    names the column and the rows (before: passed)."""
    from loramoe.model import load_tokenizer

    tokenizer = load_tokenizer("tiny-random-llama")  # control tokens '</s>', '<unk>', '<pad>'
    rows = [GOOD, {**GOOD2, "response": "4</s> and on"}, {**GOOD, "id": "c", "prompt": "<unk>?"}]
    report = validate_frame(pd.DataFrame(rows), "train", tokenizer=tokenizer, max_tokens=100)
    assert failed(report) == {("expect_column_values_to_be_in_set", "response"),
                              ("expect_column_values_to_be_in_set", "prompt")}
    assert "e.g. id='b' value='4</s> and on'" in report.summary()  # a frame: no lines
    assert "must not hold a control token's text" in report.summary()
    assert validate_frame(pd.DataFrame(rows), "train").success  # no tokenizer, no rule
    eval_rows = [{"id": "q", "task": "t", "task_type": "knowledge", "prompt": "p",
                  "answers": ["x", "y</s>"], "metric": "contains"}]
    eval_report = validate_frame(pd.DataFrame(eval_rows), "eval", tokenizer=tokenizer)
    assert failed(eval_report) == {("expect_column_values_to_be_in_set", "answers")}
    path = tmp_path / "train.jsonl"
    write_records(pd.DataFrame(rows), path)
    assert validation_cli([str(path), "--tokenizer", "tiny-random-llama"]) == 1
    out = capsys.readouterr().out
    assert "column 'response' must not hold a control token's text" in out
    assert "e.g. line 2 id='b' value='4</s> and on'" in out  # a file: by line and id


def test_unreadable_file_is_a_failure_not_a_crash(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text("{not json\n")
    report = validate_file(path, "train")
    assert not report.success and "not a readable jsonl records file (line 1:" in report.summary()


def test_cli_exit_codes_and_json(mixture_dir, tmp_path, capsys):
    assert validation_cli([str(mixture_dir)]) == 0
    bad = tmp_path / "bad.jsonl"
    write_records(pd.DataFrame([GOOD, {**GOOD2, "id": "a"}]), bad)
    assert validation_cli([str(bad), "--json", str(tmp_path / "r.json")]) == 1
    result = json.loads((tmp_path / "r.json").read_text())
    assert result[0]["failures"][0]["expectation"] == "expect_column_values_to_be_unique"
    assert "must be unique" in capsys.readouterr().out


def test_a_folder_that_build_did_not_write_is_named(tmp_path, capsys):
    # Before: FileNotFoundError: .../manifest.json, a traceback from the CLI.
    from validation.__main__ import main

    assert main([str(tmp_path)]) == 2
    assert "no manifest.json there" in capsys.readouterr().err
    (tmp_path / "manifest.json").write_text('{"config": {}}')
    assert main([str(tmp_path)]) == 2
    assert "lacks key(s) ['train_files', 'eval_file']" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--max-chars", "0"], "--max-chars: must be >= 1, got 0"),
    (["--max-tokens", "5"], "--max-tokens needs --tokenizer"),
    (["--docs", "{file}/docs"], "--docs: {file}/docs cannot be made: {file} is a file"),
    (["--json", "{file}/r.json"], "--json: {file}/r.json cannot be written"),
    (["--tokenizer", "{file}/no-model"], "error: --tokenizer: model '{file}/no-model'"),
])
def test_the_cli_names_a_bad_argument_before_validating(tmp_path, capsys, args, message):
    # Before: --max-chars 0 ran every suite ("1..0 characters"), --max-tokens without a
    # tokenizer was ignored, and the others ended in tracebacks (--json's after validating).
    good = tmp_path / "good.jsonl"
    write_records(pd.DataFrame([GOOD]), good)
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    try:  # argparse's usage errors exit 2 themselves
        code = validation_cli([str(good)] + [a.format(file=a_file) for a in args])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 2
    out = capsys.readouterr()
    assert message.format(file=a_file) in out.err and "expectations" not in out.out
    assert a_file.read_text() == "mine"


def test_a_suite_draws_no_progress_bar(capfd):
    """great-expectations' "Calculating Metrics" bar wrote carriage returns into the flow's
    validate task (failed before: tests/test_pipeline.py::test_every_task_writes_whole_lines
    found its lines)."""
    report = validate_frame(pd.DataFrame([GOOD, GOOD2]), "train")
    assert report.success
    err = capfd.readouterr().err
    assert "\r" not in err and "Calculating Metrics" not in err, err[-300:]
