"""Data layer: real-fact knowledge tasks, procedural tasks, hub formatters, mixtures, scales."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from loramoe.data import (
    MixtureConfig,
    MixtureError,
    build_mixture,
    drop_overlap,
    get_task,
    hub,
    knowledge,
    list_tasks,
    normalize_text,
    read_records,
)
from loramoe.data.__main__ import main as data_cli
from loramoe.data.mixture import quotas
from loramoe.data.records import to_frame

SMALL = {"tasks": [{"name": "country_capital"}, {"name": "element_symbol", "weight": 2},
                   {"name": "arithmetic"}, {"name": "nli"}],
         "scales": [30, 10], "seed": 3, "eval_size": 8}


@pytest.mark.parametrize("relation", knowledge.RELATIONS, ids=lambda r: r.name)
def test_knowledge_test_facts_never_appear_in_training(relation):
    train_entities = {f.entity for f in knowledge.split_facts(relation, "train")}
    test_facts = knowledge.split_facts(relation, "test")
    assert test_facts and train_entities
    assert not train_entities & {f.entity for f in test_facts}
    task = get_task(relation.name)
    train = task.build_train(10_000, 0)
    evals = task.build_eval(10_000, 0)
    assert all(r.task_type == "knowledge" and r.response for r in train)
    assert all(e.answers and all(a for a in e.answers) for e in evals)
    # no train prompt asks about a test entity, in any of the relation's templates
    test_prompts = {t.format(e=f.entity) for f in test_facts for t in relation.templates}
    assert not [r.prompt for r in train if r.prompt in test_prompts]


def test_knowledge_has_real_facts_and_aliases():
    capital = {f.entity: f.answers for f in knowledge._capital_facts()}
    assert capital["France"] == ("Paris",)
    currency = {f.entity: f.answers for f in knowledge._currency_facts()}
    assert currency["Japan"] == ("Yen", "JPY")
    symbols = {f.entity: f.answers for f in knowledge._symbol_facts()}
    assert symbols["iron"] == ("Fe",)


@pytest.mark.parametrize("name", ["arithmetic", "sort_numbers", "reverse_words", "count_items",
                                  "reading_comprehension", "nli", "summarization",
                                  "translation", "topic_classification"])
def test_downstream_split_disjoint_and_deterministic(name):
    task = get_task(name)
    train, test = task.build_train(60, 1), task.build_eval(30, 1)
    assert len(train) == 60 and len(test) == 30
    assert not {r.prompt for r in train} & {e.prompt for e in test}
    assert [r.prompt for r in task.build_train(60, 1)] == [r.prompt for r in train]
    assert [r.prompt for r in task.build_train(60, 2)] != [r.prompt for r in train]


def test_procedural_answers_are_correct():
    record = get_task("sort_numbers").build_train(1, 0)[0]
    numbers = [int(x) for x in record.prompt.split(":")[1].split(",")]
    assert record.response == ", ".join(map(str, sorted(numbers)))
    record = get_task("arithmetic").build_train(1, 0)[0]
    expression = record.prompt.split("Compute ")[1].split(".")[0]
    assert record.response == str(eval(expression))  # noqa: S307 - our own generated text


HUB_FIXTURES = {
    "triviaqa": {"question": "Who wrote Hamlet?",
                 "answer": {"value": "William Shakespeare", "aliases": ["Shakespeare"]}},
    "nq_open": {"question": "where is the eiffel tower", "answer": ["Paris", "Paris, France"]},
    "hotpotqa": {"question": "Which band was formed first?", "answer": "Queen"},
    "rte": {"premise": "A cat sleeps.", "hypothesis": "An animal sleeps.", "label": 0},
    "wsc": {"text": "Tom thanked Bob because he helped.", "span1_text": "Bob",
            "span2_text": "he", "label": 1},
    "winogrande": {"sentence": "The trophy did not fit in the case because _ was big.",
                   "option1": "trophy", "option2": "case", "answer": "1"},
    "record": {"passage": "Paris hosted the games.", "query": "@placeholder hosted.",
               "entities": ["Paris", "Rome"], "answers": ["Paris"]},
    "multirc": {"paragraph": "Ann has a dog.", "question": "What pet?", "answer": "a dog",
                "label": 1},
    "race": {"article": "Sam likes tea.", "question": "What does Sam like?",
             "options": ["tea", "milk", "juice", "water"], "answer": "A"},
    "xsum": {"document": "A long article about rain.", "summary": "It rained."},
    "anli": {"premise": "It is sunny.", "hypothesis": "It is raining.", "label": 2},
    "qqp": {"question1": "How old are you?", "question2": "What is your age?", "label": 1},
    "ag_news": {"text": "The team won the cup.", "label": 1},
    "yelp": {"text": "Great food!", "label": 1},
    "wmt16_de_en": {"translation": {"de": "Guten Morgen", "en": "Good morning"}},
}
HUB_EXPECTED = {"triviaqa": "Shakespeare", "nq_open": "Paris, France", "hotpotqa": "Queen",
                "rte": "entailment", "wsc": "yes", "winogrande": "trophy", "record": "Paris",
                "multirc": "true", "race": "A", "xsum": "It rained.", "anli": "contradiction",
                "qqp": "yes", "ag_news": "sports", "yelp": "positive",
                "wmt16_de_en": "Good morning"}


@pytest.mark.parametrize("spec", hub.HUB_TASKS, ids=lambda s: s.name)
def test_hub_formatters_on_fixture_rows(spec):
    row = HUB_FIXTURES[spec.name]
    train = hub.rows_to_train(spec, [row], 5, 0)
    evals = hub.rows_to_eval(spec, [row], 5, 0)
    assert len(train) == len(evals) == 1
    assert HUB_EXPECTED[spec.name] in evals[0].answers
    assert evals[0].metric == spec.metric and train[0].task_type == spec.task_type
    assert get_task(spec.name).source == "hub"


def test_hub_formatters_skip_unlabeled_rows():
    spec = next(s for s in hub.HUB_TASKS if s.name == "rte")
    assert hub.rows_to_eval(spec, [{**HUB_FIXTURES["rte"], "label": -1}], 5, 0) == []


def test_registry_lists_every_kind():
    sources = {t.source for t in list_tasks()}
    assert sources == {"builtin", "hub"}
    with pytest.raises(KeyError, match="unknown task 'nope'"):
        get_task("nope")


def test_nested_stratified_deterministic_scales():
    config = MixtureConfig.from_dict(json.loads(json.dumps(SMALL)))
    built = build_mixture(config)
    small, large = built.train[10], built.train[30]
    assert set(small["id"]) <= set(large["id"])
    counts = large.groupby("task").size().to_dict()
    assert counts == {"country_capital": 6, "element_symbol": 12, "arithmetic": 6, "nli": 6}
    assert set(small["task_type"]) == {"knowledge", "downstream"}
    again = build_mixture(MixtureConfig.from_dict(json.loads(json.dumps(SMALL))))
    assert again.train[30].equals(large) and again.eval.equals(built.eval)
    assert not set(built.eval["prompt"].map(normalize_text)) & set(
        large["prompt"].map(normalize_text))


def test_overlap_filter_reports_dropped_per_task():
    train = to_frame([get_task("arithmetic").build_train(3, 0)[0]])
    evals = to_frame(get_task("nli").build_eval(2, 0))
    evals.loc[len(evals)] = {"id": "x", "task": "arithmetic", "task_type": "downstream",
                             "prompt": train["prompt"][0].upper() + "  ", "answers": ["1"],
                             "metric": "exact_match"}
    kept, dropped = drop_overlap(evals, train)
    assert dropped == {"arithmetic": 1} and len(kept) == 2


def test_local_file_task_with_column_mapping(tmp_path):
    rows = [{"question": f"who is person {i}?", "answer": [f"name {i}", f"alias {i}"]}
            for i in range(60)]
    (tmp_path / "nq.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "mix.yaml").write_text(
        "scales: [20]\neval_size: 5\ntasks:\n"
        "  - {name: my_nq, source: local, path: nq.jsonl, task_type: knowledge,\n"
        "     columns: {prompt: question, answers: answer}}\n"
        "  - {name: arithmetic}\n")
    built = build_mixture(MixtureConfig.from_file(tmp_path / "mix.yaml"))
    local = built.eval[built.eval["task"] == "my_nq"]
    assert len(local) == 5 and all(len(a) == 2 for a in local["answers"])
    assert set(built.train[20]["task"]) == {"my_nq", "arithmetic"}


@pytest.mark.parametrize(("change", "message"), [
    ({"scales": []}, "scales"),
    ({"tasks": []}, "tasks"),
    ({"tasks": [{"name": "arithmetic", "weight": 0}]}, "weight"),
    ({"tasks": [{"name": "arithmetic", "task_type": "math"}]}, "task_type"),
    ({"tasks": [{"name": "x", "source": "local"}]}, "path"),
    ({"colour": 1}, "unknown field"),
])
def test_mixture_config_errors_name_the_field(change, message):
    with pytest.raises(MixtureError, match=message):
        MixtureConfig.from_dict({**SMALL, **change})


def test_build_cli_writes_scales_eval_and_summary(tmp_path, capsys):
    config = tmp_path / "mix.json"
    config.write_text(json.dumps(SMALL))
    assert data_cli(["build", str(config), str(tmp_path / "out")]) == 0
    out = tmp_path / "out"
    assert {p.name for p in out.iterdir()} >= {"train_10.jsonl", "train_30.jsonl",
                                               "eval.jsonl", "manifest.json", "summary.csv"}
    assert len(read_records(out / "train_30.jsonl")) == 30
    assert "mean_prompt_chars" in capsys.readouterr().out
    import datasets  # noqa: F401 - the records load with datasets too

    from loramoe.data.records import load_as_dataset

    assert load_as_dataset(out / "eval.jsonl").num_rows == len(read_records(out / "eval.jsonl"))


def test_build_cli_keeps_an_earlier_mixture_unless_asked(tmp_path, capsys):
    """A folder holding an earlier build is refused before building (its train files may be
    what earlier runs trained on); --overwrite replaces it as a set: no train file of a
    scale the new build lacks stays beside the new manifest. Other files are left alone."""
    config, out = tmp_path / "mix.json", tmp_path / "out"
    config.write_text(json.dumps(SMALL))
    assert data_cli(["build", str(config), str(out)]) == 0
    (out / "notes.txt").write_text("mine")
    earlier = {p.name: p.read_bytes() for p in out.iterdir()}
    config.write_text(json.dumps({**SMALL, "scales": [10]}))
    capsys.readouterr()
    assert data_cli(["build", str(config), str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{out} already holds a mixture (manifest.json)" in err and "--overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier
    assert data_cli(["build", str(config), str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == \
        ["eval.jsonl", "manifest.json", "notes.txt", "summary.csv", "train_10.jsonl"]


def test_eval_only_relations_are_never_trained_and_facts_are_plentiful():
    """The default mixture's knowledge eval: >= 2,000 held-out facts, three relations with
    no training data at all, every fact with a gold choice and 3 same-relation distractors."""
    from pathlib import Path

    import tomllib

    from loramoe.pipeline import PipelineConfig

    path = Path(__file__).resolve().parents[1] / "flows" / "configs" / "default.toml"
    config = PipelineConfig.from_dict(tomllib.loads(path.read_text()),
                                      base_dir=path.parent)
    built = build_mixture(config.mixture)
    knowledge = built.eval[built.eval["task_type"] == "knowledge"]
    assert len(knowledge) >= 2000
    untrained = {"city_country", "subdivision_country", "country_language"}
    assert config.untrained_tasks == untrained
    for frame in built.train.values():
        assert not set(frame["task"]) & untrained
    assert set(knowledge["task"]) >= untrained
    for gold, answers, choices in zip(knowledge["answers"].map(lambda a: a[0]),
                                      knowledge["answers"], knowledge["choices"], strict=True):
        assert choices[0] == gold and len(choices) == 4
        assert not {c.lower() for c in choices[1:]} & {a.lower() for a in answers}


def test_ambiguous_entity_names_are_dropped():
    from loramoe.data.knowledge import RELATIONS

    cities = next(r for r in RELATIONS if r.name == "city_country").facts()
    names = [f.entity for f in cities]
    assert len(names) == len(set(names)) > 5000
    assert "Georgia" not in {f.entity for f in next(
        r for r in RELATIONS if r.name == "subdivision_country").facts()}


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_a_users_qa_file_is_probed_with_its_answers_kept_as_a_list(tmp_path, fmt):
    """Item 8 of #15: a closed-book QA file plugs in as an eval-only knowledge task; its
    answers stay a list in every format and its facts get distractors from other rows."""
    frame = pd.DataFrame({"question": [f"Who wrote book {i}?" for i in range(80)],
                          "answers": [[f"Author {i}", f"A. {i}"] for i in range(80)]})
    path = tmp_path / f"qa.{fmt}"
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in frame.to_dict(orient="records")))
    elif fmt == "csv":
        frame.assign(answers=frame["answers"].map(json.dumps)).to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    config = MixtureConfig.from_dict({**SMALL, "tasks": [
        {"name": "arithmetic"}, {"name": "my_qa", "source": "local", "path": str(path),
                                 "task_type": "knowledge", "train": False,
                                 "answer_prefix": "The author is",
                                 "columns": {"prompt": "question"}}]})
    built = build_mixture(config)
    mine = built.eval[built.eval["task"] == "my_qa"]
    assert len(mine) >= 5 and "my_qa" not in set(built.train[30]["task"])
    for answers, choices, prefix in zip(mine["answers"], mine["choices"], mine["answer_prefix"],
                                        strict=True):
        assert isinstance(answers, list) and len(answers) == 2
        assert choices[0] == answers[0] and len(choices) == 4 and prefix == "The author is"
        assert not {normalize_text(c) for c in choices[1:]} & {normalize_text(a)
                                                               for a in answers}


def test_knowledge_share_fixes_the_knowledge_part_of_every_scale():
    tasks = [{"name": "country_capital"}, {"name": "element_symbol"},
             {"name": "arithmetic"}, {"name": "sort_numbers"}, {"name": "nli"}]
    config = MixtureConfig.from_dict({"tasks": tasks, "scales": [50, 200], "eval_size": 2,
                                      "knowledge_share": 0.2})
    for scale in (50, 200):
        counts = quotas(config, scale)
        assert sum(counts.values()) == scale
        assert counts["country_capital"] + counts["element_symbol"] == round(0.2 * scale)
    built = build_mixture(config)
    assert (built.train[200]["task_type"] == "knowledge").mean() == pytest.approx(0.2)
    with pytest.raises(MixtureError, match="knowledge_share"):
        MixtureConfig.from_dict({"tasks": tasks[:2], "scales": [10], "knowledge_share": 0.2})
    with pytest.raises(MixtureError, match="knowledge_share"):
        MixtureConfig.from_dict({"tasks": tasks, "scales": [10], "knowledge_share": 1.5})
