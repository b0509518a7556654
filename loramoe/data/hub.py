"""Hub tasks (the paper's Table 4) for users with internet: dataset id, formatter, metric.

Nothing here downloads at import time; `datasets.load_dataset` runs only when a hub task's
records are built. The formatters take one row in the dataset's own column format and are
tested offline on fixture rows.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from loramoe.data.records import EvalRecord, TrainRecord
from loramoe.data.registry import Task, register

Row = dict[str, Any]
# formatter(row) -> (prompt, gold response, answers incl. aliases), or None to skip the row
Formatter = Callable[[Row], tuple[str, str, list[str]] | None]


def _choice_prompt(question: str, options: list[str]) -> str:
    letters = "ABCDEFGH"
    lines = "\n".join(f"{letters[i]}. {opt}" for i, opt in enumerate(options))
    return f"{question}\n{lines}\nAnswer with the letter."


def trivia_qa(row: Row) -> tuple[str, str, list[str]]:
    answer = row["answer"]
    aliases = [answer["value"], *answer.get("aliases", [])]
    return row["question"], answer["value"], list(dict.fromkeys(aliases))


def nq_open(row: Row) -> tuple[str, str, list[str]]:
    return row["question"], row["answer"][0], list(row["answer"])


def hotpot_qa(row: Row) -> tuple[str, str, list[str]]:
    return row["question"], row["answer"], [row["answer"]]


def labelled(labels: list[str], prompt: Callable[[Row], str]) -> Formatter:
    """A formatter for classification rows: integer `label` -> its name; rows whose label is
    not one of them (unlabeled test rows, -1) are skipped."""

    def format_row(row: Row) -> tuple[str, str, list[str]] | None:
        if row["label"] not in range(len(labels)):
            return None
        label = labels[row["label"]]
        return prompt(row), label, [label]

    return format_row


rte = labelled(["entailment", "not_entailment"], lambda row: (
    f"Premise: {row['premise']}\nHypothesis: {row['hypothesis']}\nDoes the premise entail "
    f"the hypothesis? Answer entailment or not_entailment."))
wsc = labelled(["no", "yes"], lambda row: (
    f"{row['text']}\nIn this sentence, does '{row['span2_text']}' refer to "
    f"'{row['span1_text']}'? Answer yes or no."))


def winogrande(row: Row) -> tuple[str, str, list[str]] | None:
    if row["answer"] not in ("1", "2"):
        return None
    answer = row["option1"] if row["answer"] == "1" else row["option2"]
    prompt = (f"Fill in the blank: {row['sentence']}\nOption 1: {row['option1']}\n"
              f"Option 2: {row['option2']}\nAnswer with the option text.")
    return prompt, answer, [answer]


def record(row: Row) -> tuple[str, str, list[str]] | None:
    if not row["answers"]:
        return None
    prompt = (f"{row['passage']}\nQuery: {row['query']}\nWhich entity replaces @placeholder? "
              f"Candidates: {', '.join(dict.fromkeys(row['entities']))}")
    return prompt, row["answers"][0], list(row["answers"])


multirc = labelled(["false", "true"], lambda row: (
    f"{row['paragraph']}\nQuestion: {row['question']}\nCandidate answer: {row['answer']}\n"
    f"Is the candidate answer correct? Answer true or false."))


def race(row: Row) -> tuple[str, str, list[str]]:
    prompt = _choice_prompt(f"{row['article']}\nQuestion: {row['question']}", row["options"])
    return prompt, row["answer"], [row["answer"]]


def xsum(row: Row) -> tuple[str, str, list[str]]:
    return f"Summarise in one sentence: {row['document']}", row["summary"], [row["summary"]]


anli = labelled(["entailment", "neutral", "contradiction"], lambda row: (
    f"Premise: {row['premise']}\nHypothesis: {row['hypothesis']}\nDoes the premise entail "
    f"the hypothesis? Answer entailment, contradiction or neutral."))
qqp = labelled(["no", "yes"], lambda row: (
    f"Question 1: {row['question1']}\nQuestion 2: {row['question2']}\nDo these two questions "
    f"ask the same thing? Answer yes or no."))


AG_NEWS_LABELS = ["world", "sports", "business", "science"]


def ag_news(row: Row) -> tuple[str, str, list[str]]:
    label = AG_NEWS_LABELS[row["label"]]
    prompt = f"Classify the topic of this news as world, sports, business or science: {row['text']}"
    return prompt, label, [label]


def yelp_polarity(row: Row) -> tuple[str, str, list[str]]:
    label = ["negative", "positive"][row["label"]]
    return f"Is this review positive or negative? {row['text']}", label, [label]


def wmt16_de_en(row: Row) -> tuple[str, str, list[str]]:
    pair = row["translation"]
    return f"Translate into English: {pair['de']}", pair["en"], [pair["en"]]


@dataclass(frozen=True)
class HubSpec:
    name: str
    task_type: str
    path: str
    config: str | None
    train_split: str
    eval_split: str
    formatter: Formatter
    metric: str


HUB_TASKS = [
    HubSpec("triviaqa", "knowledge", "mandarjoshi/trivia_qa", "rc.nocontext", "train",
            "validation", trivia_qa, "contains"),
    HubSpec("nq_open", "knowledge", "google-research-datasets/nq_open", "nq_open", "train",
            "validation", nq_open, "contains"),
    HubSpec("hotpotqa", "knowledge", "hotpotqa/hotpot_qa", "fullwiki", "train", "validation",
            hotpot_qa, "contains"),
    HubSpec("rte", "downstream", "aps/super_glue", "rte", "train", "validation", rte,
            "accuracy"),
    HubSpec("wsc", "downstream", "aps/super_glue", "wsc.fixed", "train", "validation", wsc,
            "accuracy"),
    HubSpec("winogrande", "downstream", "allenai/winogrande", "winogrande_xl", "train",
            "validation", winogrande, "exact_match"),
    HubSpec("record", "downstream", "aps/super_glue", "record", "train", "validation", record,
            "exact_match"),
    HubSpec("multirc", "downstream", "aps/super_glue", "multirc", "train", "validation",
            multirc, "accuracy"),
    HubSpec("race", "downstream", "ehovy/race", "all", "train", "validation", race, "accuracy"),
    HubSpec("xsum", "downstream", "EdinburghNLP/xsum", None, "train", "validation", xsum,
            "rouge_l"),
    HubSpec("anli", "downstream", "facebook/anli", None, "train_r1", "dev_r1", anli, "accuracy"),
    HubSpec("qqp", "downstream", "nyu-mll/glue", "qqp", "train", "validation", qqp, "accuracy"),
    HubSpec("ag_news", "downstream", "fancyzhx/ag_news", None, "train", "test", ag_news,
            "accuracy"),
    HubSpec("yelp", "downstream", "fancyzhx/yelp_polarity", None, "train", "test",
            yelp_polarity, "accuracy"),
    HubSpec("wmt16_de_en", "downstream", "wmt/wmt16", "de-en", "train", "validation",
            wmt16_de_en, "chrf"),
]


def _formatted(spec: HubSpec, rows: Iterable[Row], n: int, seed: int
               ) -> list[tuple[str, str, list[str]]]:
    """Up to n formatted rows in a seeded shuffled order; unusable rows are skipped."""
    rows = list(rows)
    random.Random(seed).shuffle(rows)
    usable = (f for f in map(spec.formatter, rows) if f is not None)
    return list(itertools.islice(usable, n))


def rows_to_train(spec: HubSpec, rows: Iterable[Row], n: int, seed: int) -> list[TrainRecord]:
    return [TrainRecord(f"{spec.name}-train-{i}", spec.name, spec.task_type, prompt, response)
            for i, (prompt, response, _) in enumerate(_formatted(spec, rows, n, seed))]


def rows_to_eval(spec: HubSpec, rows: Iterable[Row], n: int, seed: int) -> list[EvalRecord]:
    return [EvalRecord(f"{spec.name}-test-{i}", spec.name, spec.task_type, prompt, answers,
                       spec.metric)
            for i, (prompt, _, answers) in enumerate(_formatted(spec, rows, n, seed))]


class DatasetNotAvailableError(RuntimeError):
    """A hub task's dataset cannot be loaded (no network, a wrong id, config or split)."""


def _load(spec: HubSpec, split: str):
    import datasets

    try:
        return datasets.load_dataset(spec.path, spec.config, split=split)
    except (OSError, ValueError) as err:  # ConnectionError, DatasetNotFoundError, bad split
        raise DatasetNotAvailableError(
            f"task {spec.name!r}: hub dataset {spec.path} ({spec.config or 'default'}, split "
            f"{split!r}) could not be loaded: {err}. Hub tasks need the network or the "
            f"datasets cache; without them use a local copy (source = \"local\")") from None


def _register(spec: HubSpec) -> None:
    register(Task(
        name=spec.name, task_type=spec.task_type, metric=spec.metric, source="hub",
        build_train=lambda n, seed: rows_to_train(spec, _load(spec, spec.train_split), n, seed),
        build_eval=lambda n, seed: rows_to_eval(spec, _load(spec, spec.eval_split), n, seed),
        description=f"{spec.path} ({spec.config or 'default'})",
    ))


for _spec in HUB_TASKS:
    _register(_spec)
