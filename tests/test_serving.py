"""Staging a run for the MLflow pyfunc model."""

import json
import os

from loramoe.serving.pyfunc import stage_run_for_serving


def sft_run(path):
    """A run folder that passes check_run_weights for full SFT (nothing here loads it)."""
    model = path / "model"
    model.mkdir(parents=True)
    (path / "train_config.json").write_text(json.dumps({"method": "sft", "model": "m"}))
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights " * 1000)
    return path


def test_staging_links_the_weights_instead_of_copying_them(tmp_path):
    """Before: the staged folder held a copy, and MLflow then made another: a default full-SFT
    branch wrote its ~540 MB model three times (run, staging, store)."""
    run = sft_run(tmp_path / "run")
    staged = stage_run_for_serving(run, tmp_path / "staged")
    weights = staged / "model" / "model.safetensors"
    assert os.path.samefile(weights, run / "model" / "model.safetensors")
    assert json.loads((staged / "serving.json").read_text())["batch_size"] == 8
    # the run's config is copied, not linked: a rewrite of the staged one leaves the run's
    assert not os.path.samefile(staged / "train_config.json", run / "train_config.json")


def test_staging_copies_where_the_filesystem_cannot_link(tmp_path, monkeypatch):
    run = sft_run(tmp_path / "run")

    def no_links(source, target):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    staged = stage_run_for_serving(run, tmp_path / "staged")
    weights = staged / "model" / "model.safetensors"
    assert not os.path.samefile(weights, run / "model" / "model.safetensors")
    assert weights.read_bytes() == (run / "model" / "model.safetensors").read_bytes()
