"""An evaluation shared by worker processes (evaluate/shards.py) writes what one process
writes, bit for bit: the same batches, each at the same thread count."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
import torch

from loramoe.evaluate.generation import generate_predictions
from loramoe.evaluate.probe import probe_facts
from loramoe.evaluate.run import evaluate
from loramoe.evaluate.shards import Shard
from loramoe.model import load_base_model


@pytest.fixture(scope="module")
def eval_file(tmp_path_factory):
    """Enough facts for two probe batches of 64 and enough prompts for many generation
    batches, from two knowledge and two downstream tasks."""
    from loramoe.data import MixtureConfig, build_mixture, write_records

    config = MixtureConfig.from_dict({
        "tasks": [{"name": "country_capital"}, {"name": "element_symbol"},
                  {"name": "arithmetic"}, {"name": "sort_numbers"}],
        "scales": [8], "eval_size": 40, "seed": 0})
    path = tmp_path_factory.mktemp("shards") / "eval.jsonl"
    write_records(build_mixture(config).eval, path)
    return path


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_shards_take_every_countth_batch_and_cover_all_once():
    batches = list(range(7))
    parts = [Shard(i, 3).take(batches) for i in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sorted(sum(parts, [])) == batches
    with pytest.raises(ValueError, match=r"Shard.index: must be in \[0, 2\), got 2"):
        Shard(2, 2)


def test_sharded_generation_and_probe_equal_the_whole(tiny_model_dir, eval_file, capsys):
    from loramoe.data.records import read_records

    model, tokenizer = load_base_model(str(tiny_model_dir))
    frame = read_records(eval_file)
    whole_answers = generate_predictions(model, tokenizer, frame, batch_size=4, progress=True)
    whole_probe = probe_facts(model, tokenizer, frame, batch_size=16)
    answers = [generate_predictions(model, tokenizer, frame, batch_size=4, shard=Shard(i, 3),
                                    progress=i == 1) for i in range(3)]
    # a shard's progress says which shard it counts, out of its own batches
    err = capsys.readouterr().err
    whole = int(re.findall(r"^generate: \d+/(\d+)", err, re.M)[-1])
    own = {int(t) for t in re.findall(r"^generate, shard 2 of 3: \d+/(\d+)", err, re.M)}
    assert own == {len(Shard(1, 3).take(range(whole)))}
    probes = [probe_facts(model, tokenizer, frame, batch_size=16, shard=Shard(i, 3))
              for i in range(3)]
    for column, whole in zip(zip(*answers, strict=True), whole_answers, strict=True):
        assert [a for a in column if a is not None] == [whole]  # exactly one shard answers
    assert all(0 < len(p) < len(whole_probe) for p in probes)
    merged = pd.concat(probes).set_index("id").loc[whole_probe["id"]].reset_index()
    pd.testing.assert_frame_equal(merged, whole_probe)  # exact: same batches, same shapes


def test_an_evaluation_in_two_processes_writes_what_one_writes(tiny_model_dir, eval_file,
                                                               tmp_path, one_thread):
    one = evaluate(eval_file, tmp_path / "one", model=str(tiny_model_dir), batch_size=4,
                   progress=False)
    two = evaluate(eval_file, tmp_path / "two", model=str(tiny_model_dir), batch_size=4,
                   progress=False, workers=2)
    assert (one["workers"], two["workers"]) == (1, 2)
    assert one["probe"]["facts"] > 64  # two probe batches of 64: each process probes one
    for name in ("predictions.jsonl", "probe.jsonl"):
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    saved = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two")]
    for metrics in saved:
        metrics.pop("workers")
    assert saved[0] == saved[1]  # scored_by too: the same thread count, hence cache key


def test_a_loramoe_run_or_a_gpu_is_not_split_and_nothing_is_loaded(tmp_path, eval_file,
                                                                    monkeypatch):
    """A LoRAMoE run's router weights are recorded per batch in one process; workers share
    a CPU's cores. Both are refused from the run's config and the device, before loading."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU for cuda:0 to name
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    run = tmp_path / "run"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps({"method": "loramoe", "model": "m"})
                                           )  # no weights
    with pytest.raises(ValueError, match="workers = 2: a LoRAMoE run's router"):
        evaluate(eval_file, tmp_path / "e", run=run, progress=False, workers=2, device="cpu")
    with pytest.raises(ValueError, match="workers = 2: worker processes share a CPU's cores; "
                                         "on cuda:0"):
        evaluate(eval_file, tmp_path / "e", model="unused", progress=False, workers=2,
                 device="cuda:0")
    with pytest.raises(ValueError, match="workers: must be >= 1, got 0"):
        evaluate(eval_file, tmp_path / "e", model="unused", progress=False, workers=0)


def test_a_failing_worker_raises_with_the_end_of_its_log(tmp_path, eval_file):
    from loramoe.data.records import read_records
    from loramoe.evaluate.shards import start_worker

    frame = read_records(eval_file)
    job = {"load": {"model": str(tmp_path / "no-such-model")}, "frame": frame, "full": frame,
           "batch_size": 4, "shard": Shard(1, 2), "threads": 1}
    worker = start_worker(tmp_path, "shard-1", job)
    with pytest.raises(RuntimeError, match=r"(?s)evaluation worker shard-1 failed \(exit 1\)"
                                           r".*no-such-model"):
        worker.wait()
