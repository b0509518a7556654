"""Metrics on hand-made examples; evaluation end to end on a tiny trained run."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from loramoe.evaluate import evaluate, generate_predictions, retention
from loramoe.evaluate.metrics import accuracy, chrf, contains, exact_match, rouge_l, score, token_f1
from loramoe.evaluate.stats import wilson_interval


def test_exact_match_normalises_like_squad():
    assert exact_match("The Paris!", ["paris"]) == 1.0
    assert exact_match("Paris, France", ["Paris"]) == 0.0
    assert exact_match("Lyon", ["Paris", "lyon"]) == 1.0  # aliases


def test_token_f1_partial_overlap():
    # "the" is dropped: pred {big, red, dog} vs gold {red, dog}: P=2/3, R=1, F1=0.8
    assert token_f1("the big red dog", ["red dog"]) == pytest.approx(0.8)
    assert token_f1("cat", ["red dog"]) == 0.0


def test_contains_needs_whole_words():
    assert contains("I think it is Paris.", ["Paris"]) == 1.0
    assert contains("A Parisian answer", ["Paris"]) == 0.0
    assert contains("Rome", ["Paris", "Rome"]) == 1.0


def test_accuracy_takes_the_leading_label():
    assert accuracy("Entailment.", ["entailment"]) == 1.0
    assert accuracy("entailment because of X", ["entailment"]) == 1.0
    assert accuracy("not entailment", ["entailment"]) == 0.0


def test_rouge_l_and_chrf():
    # LCS("a b c d", "a c d e") = 3 -> P = R = 3/4 -> F = 0.75
    assert rouge_l("a b c d", ["a c d e"]) == pytest.approx(0.75)
    assert chrf("Deutschland", ["Deutschland"]) == pytest.approx(1.0)
    assert 0 < chrf("Deutschlant", ["Deutschland"]) < 1
    with pytest.raises(ValueError, match="unknown metric"):
        score("bleu", "a", ["a"])


def test_retention_counts_only_base_correct_items():
    base = pd.DataFrame({"id": list("abcd"), "task": ["t1", "t1", "t2", "t2"],
                         "task_type": ["knowledge"] * 4, "score": [1.0, 1.0, 1.0, 0.0]})
    tuned = pd.DataFrame({"id": list("abcd"), "score": [1.0, 0.0, 1.0, 1.0]})
    result = retention(base, tuned)
    assert result["overall"] == pytest.approx(2 / 3)
    assert result["base_correct"] == 3
    assert result["per_task"] == {"t1": 0.5, "t2": 1.0}
    assert result["per_task_ci"] == {"t1": wilson_interval(1, 2), "t2": wilson_interval(1, 1)}


def test_batched_left_padded_generation_equals_one_by_one(tiny_model_dir):
    from loramoe import LoRAMoEConfig, apply_loramoe
    from loramoe.model import load_base_model

    model, tokenizer = load_base_model(str(tiny_model_dir))
    apply_loramoe(model, LoRAMoEConfig())
    frame = pd.DataFrame({"prompt": ["Hi", "What is 2+2? Tell me.", "Name a color"],
                          "metric": ["exact_match"] * 3})
    batched = generate_predictions(model, tokenizer, frame, batch_size=3)
    single = [generate_predictions(model, tokenizer, frame.iloc[[i]], batch_size=1)[0]
              for i in range(3)]
    assert batched == single


def test_evaluate_run_end_to_end(tiny_model_dir, tiny_train_file, tmp_path):
    from loramoe.train import TrainConfig, train

    eval_file = tiny_train_file.parent / "eval.jsonl"
    base = evaluate(eval_file, tmp_path / "base", model=str(tiny_model_dir), progress=False)
    run = tmp_path / "run"
    train(TrainConfig(model=str(tiny_model_dir), train_file=str(tiny_train_file),
                      output_dir=str(run), max_steps=2, batch_size=8), progress=False)
    metrics = evaluate(eval_file, tmp_path / "tuned", run=run, base_dir=tmp_path / "base",
                       progress=False)
    assert {"knowledge_score", "downstream_score", "per_task"} <= set(base)
    assert "retention" in metrics and "router_type_weights" in metrics
    assert "base_scored_otherwise" not in metrics  # same process, same settings
    for weights in metrics["router_type_weights"].values():
        assert sum(weights.values()) == pytest.approx(1.0, abs=1e-5)
    router = json.loads((tmp_path / "tuned" / "router.json").read_text())
    assert len(router["layers"]) == 6
    first = next(iter(router["tasks"].values()))
    assert len(first["per_layer_type_weights"]) == 6 and len(first["expert_weights"]) == 6
    assert (tmp_path / "tuned" / "router.png").stat().st_size > 1000
    lines = (tmp_path / "tuned" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(eval_file.read_text().splitlines())
    assert {"prediction", "score", "answers"} <= set(json.loads(lines[0]))
    # what scored them, for the registry's champion comparison across runs
    import torch

    from loramoe.digest import file_sha256
    from loramoe.evaluate.cache import code_digest, rounding
    from loramoe.precision import default_device, resolve_dtype

    device = default_device()
    dtype = str(resolve_dtype("auto", device)).removeprefix("torch.")  # this machine's auto
    hardware = ({"threads": torch.get_num_threads(), "cpu": rounding("cpu")["cpu"]}
                if device.type == "cpu" else {"gpu": torch.cuda.get_device_name()})
    assert metrics["scored_by"] == base["scored_by"] == {
        "records": file_sha256(eval_file), "code": code_digest(),
        "settings": json.dumps({"batch_size": 16, "device": device.type, "dtype": dtype,
                                "generate_per_task": 0, **hardware}, sort_keys=True)}


def test_a_base_scored_otherwise_is_named_beside_retention(tiny_model_dir, tiny_train_file,
                                                           tmp_path, capsys):
    """Retention and vs_base pair the base's items with this evaluation's: a base evaluated
    with another thread count (or dtype, batch size, eval file, code) is named, not silent."""
    from loramoe.evaluate.__main__ import main

    eval_file = tiny_train_file.parent / "eval.jsonl"
    evaluate(eval_file, tmp_path / "base", model=str(tiny_model_dir), progress=False)
    saved = tmp_path / "base" / "metrics.json"
    base = json.loads(saved.read_text())
    settings = json.loads(base["scored_by"]["settings"])
    settings["threads"] = 99
    base["scored_by"]["settings"] = json.dumps(settings, sort_keys=True)
    saved.write_text(json.dumps(base))
    assert main(["--eval-file", str(eval_file), "--out", str(tmp_path / "again"), "--model",
                 str(tiny_model_dir), "--base", str(tmp_path / "base")]) == 0
    unlike = json.loads((tmp_path / "again" / "metrics.json").read_text())[
        "base_scored_otherwise"]
    assert unlike.startswith("threads 99 vs ") and unlike.count(",") == 0  # nothing else
    assert f"--base {tmp_path / 'base'} was scored otherwise" in capsys.readouterr().err
    again = ["--eval-file", str(eval_file), "--out", str(tmp_path / "again"), "--model",
             str(tiny_model_dir)]  # now without --base: the earlier one is kept unless asked
    assert main(again) == 2 and "already holds an evaluation" in capsys.readouterr().err
    assert "base_scored_otherwise" in (tmp_path / "again" / "metrics.json").read_text()
    assert main([*again, "--overwrite"]) == 0
    assert "base_scored_otherwise" not in (tmp_path / "again" / "metrics.json").read_text()


def test_eval_items_holding_a_control_tokens_text_are_named(tiny_model_dir, tiny_train_file,
                                                             tmp_path, capfd):
    """A question or answer that mentions '</s>' is prompted or probed with the end token in
    its place, silently before; the evaluation names the items (and still scores them)."""
    from loramoe.data.records import read_records, write_records

    frame = read_records(tiny_train_file.parent / "eval.jsonl").head(6)
    frame.at[1, "prompt"] = "What does </s> close?"
    frame.at[4, "answers"] = ["x", "y </s>"]
    eval_file = write_records(frame, tmp_path / "eval.jsonl")
    metrics = evaluate(eval_file, tmp_path / "out", model=str(tiny_model_dir), progress=False)
    assert metrics["generated_items"] == 6
    assert (f"warning: 2 of 6 eval items hold the text '</s>', which the tokenizer reads as "
            f"its control token, not as text ({eval_file}: line 2 id={frame['id'][1]!r}, line 5 "
            f"id={frame['id'][4]!r})") in capfd.readouterr().err
    evaluate(tiny_train_file.parent / "eval.jsonl", tmp_path / "clean",
             model=str(tiny_model_dir), progress=False)
    assert "control token" not in capfd.readouterr().err


def test_style_breakdown_separates_format_losses_from_knowledge_losses():
    import pandas as pd

    from loramoe.evaluate.scoring import style_breakdown

    base = pd.DataFrame({"id": list("abcde"), "task_type": ["knowledge"] * 4 + ["downstream"],
                         "prediction": ["Tokyo", "Well, the capital city of that country is "
                                        "certainly Paris", "Rome", "no", "x"],
                         "score": [1.0, 1.0, 1.0, 0.0, 1.0]})
    tuned = pd.DataFrame({"id": list("abcde"), "score": [0.0, 0.0, 1.0, 1.0, 0.0]})
    probe = pd.DataFrame({"id": list("abcd"), "mc_correct": [True, False, True, True]})
    got = style_breakdown(base, tuned, probe)
    # a and b lost by generation; the probe still knows a (format) but not b (knowledge)
    assert got["generation_lost"] == 2 and got["lost_still_known"] == 1
    assert got["lost_still_known_share"] == 0.5 and got["lost_still_known_ci"][0] < 0.5
    assert got["base_long_answers"] == 1 and got["base_correct"] == 3


def test_short_answers_stop_at_the_first_newline(tiny_model_dir):
    import torch

    from loramoe.evaluate.stopping import StopAtNewline, first_line, newline_token_ids
    from loramoe.model import load_base_model

    _, tokenizer = load_base_model(str(tiny_model_dir))
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"][-1]
    assert newline in newline_token_ids(tokenizer).tolist()
    other = tokenizer("a", add_special_tokens=False)["input_ids"][-1]
    prompt = [other] * 3
    ids = torch.tensor([prompt + [other, newline], prompt + [other, other],
                        prompt + [newline, other]])
    stop = StopAtNewline(tokenizer, prompt_width=3, applies=torch.tensor([True, True, False]))
    assert stop(ids).tolist() == [True, False, False]  # the 3rd row is not a short answer
    assert first_line("Paris\nIt is also...") == "Paris"


def test_a_batch_holds_one_answer_budget(tiny_model_dir):
    """A chrF item (32 new tokens) batched with a ROUGE-L item (64) used to decode 64 tokens;
    each item must get its own metric's budget, the same as generated alone."""
    from loramoe.model import load_base_model

    model, tokenizer = load_base_model(str(tiny_model_dir))
    metrics = ["rouge_l", "chrf", "exact_match", "chrf", "rouge_l"]
    frame = pd.DataFrame({"prompt": ["Summarise: a b c", "Translate: hello there",
                                     "What is 2+2?", "Translate: good day", "Summarise: d e"],
                          "metric": metrics})
    batched = generate_predictions(model, tokenizer, frame, batch_size=2)
    single = [generate_predictions(model, tokenizer, frame.iloc[[i]], batch_size=1)[0]
              for i in range(len(frame))]
    assert batched == single


def test_a_frozen_head_gets_a_contiguous_input_when_generating(tiny_model_dir):
    """generate() hands the LM head the last position as a non-contiguous (B, 1, H) slice;
    with the head frozen (LoRA, LoRAMoE) torch's matmul then runs a bmm over the weight
    expanded B times (a 3.6 GB copy a prefill for the default model at B = 64): LoRAMoE
    generation ran 1.9x slower than it needed to. The head must see a contiguous input,
    with one hook however often generation runs."""
    from loramoe import LoRAMoEConfig, apply_loramoe
    from loramoe.model import backbone_and_head, load_base_model

    model, tokenizer = load_base_model(str(tiny_model_dir))
    apply_loramoe(model, LoRAMoEConfig())  # freezes the head with the rest of the base
    head = backbone_and_head(model)[1]
    assert not head.weight.requires_grad
    frame = pd.DataFrame({"prompt": ["Hi", "What is 2+2? Tell me.", "Name a color"],
                          "metric": ["exact_match"] * 3})
    seen: list[bool] = []
    hook = head.register_forward_hook(lambda _, args, out: seen.append(args[0].is_contiguous()))
    generate_predictions(model, tokenizer, frame, batch_size=3)
    hook.remove()
    assert seen and all(seen)
    generate_predictions(model, tokenizer, frame, batch_size=3)
    assert len(head._forward_pre_hooks) == 1  # idempotent: one hook however often it runs


@pytest.mark.parametrize("kind", ["base", "sft run"])
def test_load_for_eval_hands_back_an_eval_mode_model(kind, tiny_model_dir, tmp_path,
                                                    monkeypatch):
    """Whatever the loader hands back (here a model left in training mode), the evaluation
    gets it in eval mode, for a base name as for a run (tests/test_cuda.py checks the device)."""
    import shutil

    from loramoe import model as model_module
    from loramoe.evaluate import load_for_eval
    from loramoe.train.config import RUN_CONFIG, run_part

    real = model_module.load_base_model

    def left_training(*args, **kwargs):
        loaded, tokenizer = real(*args, **kwargs)
        return loaded.train(), tokenizer

    monkeypatch.setattr(model_module, "load_base_model", left_training)
    where = {"model": str(tiny_model_dir)}
    if kind == "sft run":
        run = tmp_path / "run"
        shutil.copytree(tiny_model_dir, run / run_part("sft"))
        (run / RUN_CONFIG).write_text(json.dumps({"method": "sft"}))
        where = {"run": run}
    loaded, _, config = load_for_eval(**where, dtype="fp32", device="cpu")
    assert not any(m.training for m in loaded.modules())
    assert (config is None) == (kind == "base")


def test_an_evaluation_replaces_a_folder_only_when_it_completes(tiny_model_dir, tiny_train_file,
                                                                 tmp_path, monkeypatch):
    """A failed evaluation leaves an earlier one in its folder whole (and a fresh folder
    without a partial one); a completed one replaces the earlier one's files as a set."""
    import loramoe.evaluate.run as run_module

    eval_file = tiny_train_file.parent / "eval.jsonl"
    out = tmp_path / "eval"
    out.mkdir()
    earlier = {"predictions.jsonl": "earlier\n", "metrics.json": "{}", "router.json": "{}"}
    for name, text in earlier.items():
        (out / name).write_text(text)
    (out / "notes.txt").write_text("the user's own")

    def fail(*args, **kwargs):  # after predictions.jsonl and probe.jsonl are written
        raise RuntimeError("the probe's summary failed")

    with monkeypatch.context() as patch:
        patch.setattr(run_module, "probe_summary", fail)
        for folder in (out, tmp_path / "fresh"):
            with pytest.raises(RuntimeError, match="summary failed"):
                evaluate(eval_file, folder, model=str(tiny_model_dir), progress=False)
    assert {p.name: p.read_text() for p in out.iterdir()} == \
        {**earlier, "notes.txt": "the user's own"}
    assert not any((tmp_path / "fresh").iterdir())
    metrics = evaluate(eval_file, out, model=str(tiny_model_dir), progress=False)
    assert sorted(p.name for p in out.iterdir()) == \
        ["metrics.json", "notes.txt", "predictions.jsonl", "probe.jsonl"]  # no stale router
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(metrics))
