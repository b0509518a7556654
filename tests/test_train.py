"""The trainer on tiny models: every method learns, base stays frozen, resume is exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from loramoe.adapter import WEIGHTS_NAME
from loramoe.data.collate import IGNORE_INDEX, encode_example
from loramoe.pipeline.launch import free_port
from loramoe.train import TrainConfig, TrainConfigError, TrainingDiverged, train


def config_for(tiny_model_dir, tiny_train_file, tmp_path, **overrides) -> TrainConfig:
    base = dict(model=str(tiny_model_dir), train_file=str(tiny_train_file),
                output_dir=str(tmp_path / "run"), batch_size=8, max_steps=12, lr=5e-3,
                max_length=128, warmup_ratio=0.0, seed=0)
    return TrainConfig(**{**base, **overrides})


def losses(output_dir) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["sft", "lora", "loramoe"])
def test_loss_decreases_for_every_method(method, tiny_model_dir, tiny_train_file, tmp_path):
    lr = 2e-3 if method == "sft" else 2e-2
    config = config_for(tiny_model_dir, tiny_train_file, tmp_path, method=method, lr=lr,
                        max_steps=24, batch_size=16)
    result = train(config, progress=False)
    rows = losses(result.output_dir)
    first = rows[0]["lm_loss"]  # measured before any update
    final = sum(r["lm_loss"] for r in rows[-4:]) / 4
    assert final < first - 0.15, (first, final)  # ~ln(vocab) at start; adapters drop ~0.3
    assert all({"lm_loss", "lr", "tokens_per_s"} <= set(r) for r in rows)
    if method == "loramoe":
        assert all("lbc_loss" in r and "router_cv" in r for r in rows)
    assert result.artifact.is_dir()
    saved = json.loads((result.output_dir / "train_config.json").read_text())
    assert saved["method"] == method and saved["lr"] == lr


@pytest.mark.parametrize("method", ["lora", "loramoe"])
def test_frozen_base_unchanged(method, tiny_model_dir, tiny_train_file, tmp_path):
    from loramoe.train import build_model

    config = config_for(tiny_model_dir, tiny_train_file, tmp_path, method=method, max_steps=3)
    before = load_file(tiny_model_dir / "model.safetensors")
    train(config, progress=False)
    # Rebuild and load the trained adapter: its base weights must be the file's, bit for bit.
    model, _ = build_model(config)
    names = {n.replace(".base_layer", "").replace("base_model.model.", ""): p
             for n, p in model.named_parameters()}
    for key, value in before.items():
        assert torch.equal(names[key].detach(), value), key


def test_response_only_labels_and_no_system_prompt(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    ids, labels = encode_example(tokenizer, "Q: 2+2?", "4", 64)
    kept = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
    assert kept == tokenizer.convert_tokens_to_ids(["4", "</s>"])
    assert ids[:7] == tokenizer.convert_tokens_to_ids(list("Q: 2+2?"))


def test_lbc_shifts_routing_by_sample_type(tiny_model_dir, tiny_train_file, tmp_path):
    """Compare the type-aligned share of router weight with and without the LBC.

    What the LBC does to routing is measured, not assumed: see docs/method.md.
    """
    from loramoe.adapter import load_adapter
    from loramoe.data import read_records
    from loramoe.data.collate import Collator, encode_records
    from loramoe.injection import collect_router_probs
    from loramoe.model import load_base_model

    shares = {}
    for name, beta, form in (("off", 0.0, "paper"), ("paper", 1.0, "paper"),
                             ("aligned", 1.0, "aligned")):
        config = config_for(tiny_model_dir, tiny_train_file, tmp_path / name,
                            method="loramoe", max_steps=30, lr=3e-2, batch_size=16,
                            loramoe={"lbc_beta": beta, "lbc_delta": 0.5, "dropout": 0.0,
                                     "lbc_form": form})
        result = train(config, progress=False)
        model, tokenizer = load_base_model(str(tiny_model_dir))
        load_adapter(model, result.artifact).eval()
        frame = read_records(tiny_train_file)
        data = encode_records(tokenizer, frame["prompt"], frame["response"], frame["task_type"],
                              config.loramoe.type_names, 128)
        batch = Collator(0)([data[i] for i in range(len(data))])
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        probs = torch.stack(collect_router_probs(model)).mean(0)  # (B, T, N)
        mask = batch["attention_mask"].unsqueeze(-1)
        per_sample = (probs * mask).sum(1) / mask.sum(1)  # (B, N)
        own = torch.tensor(config.loramoe.expert_type_ids()) == batch["sample_types"][:, None]
        shares[name] = (per_sample * own).sum(1).mean().item()
    # The paper's LBC drives a sample's weight *away* from experts of its own type
    # (minimum at (1-δ)/(1+δ) of the other type's share), the aligned form towards them:
    # both shifts must be measurable.
    assert shares["paper"] < shares["off"] - 0.02, shares
    assert shares["aligned"] > shares["off"] + 0.02, shares


class Crash(Exception):
    pass


class CrashAtStep:
    """A metrics sink that kills the run at a given step, like a pre-empted worker."""

    def __init__(self, step: int) -> None:
        self.step = step

    def log_metrics(self, metrics, step):
        if step == self.step:
            raise Crash


def test_resume_matches_uninterrupted_run(tiny_model_dir, tiny_train_file, tmp_path):
    common = dict(method="loramoe", max_steps=8, save_every=3, batch_size=8)
    straight = train(config_for(tiny_model_dir, tiny_train_file, tmp_path / "a", **common),
                     progress=False)
    config = config_for(tiny_model_dir, tiny_train_file, tmp_path / "b", **common)
    with pytest.raises(Crash):  # dies after step 4; the last checkpoint is step 3
        train(config, sink=CrashAtStep(4), progress=False)
    result = train(config, resume=True, progress=False)
    a = load_file(straight.artifact / WEIGHTS_NAME)
    b = load_file(result.artifact / WEIGHTS_NAME)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert result.steps == 8
    # 48 examples / batch 8 = 6 batches per epoch: the resumed run also crossed an epoch.
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # step 4 was never logged before the crash


def test_snapshot_under_constant_lr_is_the_shorter_run(tiny_model_dir, tiny_train_file,
                                                        tmp_path):
    """The nested-prefix design: with a constant lr, the snapshot after 3 of 6 steps is the
    adapter a 3-step run writes (same seed, same batches); with cosine it is not."""
    from loramoe.evaluate.run import load_for_eval

    def adapter(folder):
        return load_file(folder / "adapter" / WEIGHTS_NAME)

    common = dict(method="loramoe", lr=2e-2, warmup_ratio=0.0)
    runs = {}
    for schedule in ("constant", "cosine"):
        long = train(config_for(tiny_model_dir, tiny_train_file, tmp_path / f"{schedule}6",
                                max_steps=6, snapshot_steps=[3, 6], lr_schedule=schedule,
                                **common), progress=False)
        short = train(config_for(tiny_model_dir, tiny_train_file, tmp_path / f"{schedule}3",
                                 max_steps=3, lr_schedule=schedule, **common), progress=False)
        runs[schedule] = (long.output_dir / "snapshots", short.output_dir, long.output_dir)
    snaps, short, long = runs["constant"]
    for key, value in adapter(short).items():
        torch.testing.assert_close(adapter(snaps / "step-00003")[key], value, rtol=0, atol=0)
    for key, value in adapter(long).items():
        torch.testing.assert_close(adapter(snaps / "step-00006")[key], value, rtol=0, atol=0)
    snaps, short, _ = runs["cosine"]
    assert any(not torch.equal(adapter(snaps / "step-00003")[k], v)
               for k, v in adapter(short).items())
    model, _, config = load_for_eval(run=runs["constant"][0] / "step-00003", device="cpu")
    assert config["snapshot_steps"] == [3, 6] and model.training is False


def test_snapshot_steps_past_the_run_name_the_field(tiny_model_dir, tiny_train_file, tmp_path,
                                                   monkeypatch):
    # Before: both were found in train() after the model had loaded and the data were encoded.
    with pytest.raises(TrainConfigError, match=r"TrainConfig\.snapshot_steps: .*<= max_steps "
                                               r"\(4\)"):
        config_for(tiny_model_dir, tiny_train_file, tmp_path, max_steps=4, snapshot_steps=[2, 9])
    import loramoe.train.builders as builders

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(builders, "build_model", no_model)
    # 48 rows, batch 8, 2 epochs: at most 12 steps
    config = config_for(tiny_model_dir, tiny_train_file, tmp_path, max_steps=None, epochs=2,
                        snapshot_steps=[2, 13])
    with pytest.raises(TrainConfigError, match=r"TrainConfig\.snapshot_steps: \[13\] lie past "
                                               r"the run's at most 12 optimizer steps \(48 "):
        train(config, progress=False)
    assert not (tmp_path / "run" / "snapshots").exists()
    with pytest.raises(TrainConfigError, match=r"TrainConfig\.snapshot_steps"):
        TrainConfig(snapshot_steps=[0])
    with pytest.raises(TrainConfigError, match=r"TrainConfig\.lr_schedule"):
        TrainConfig(lr_schedule="linear")


def test_nan_loss_stops_with_last_checkpoint(tiny_model_dir, tiny_train_file, tmp_path,
                                             monkeypatch):
    import loramoe.train.loop as train_module

    real = train_module.response_loss
    calls = {"n": 0}

    def poisoned(model, batch, *rest):
        calls["n"] += 1
        loss = real(model, batch, *rest)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(train_module, "response_loss", poisoned)
    config = config_for(tiny_model_dir, tiny_train_file, tmp_path, max_steps=10, save_every=2)
    with pytest.raises(TrainingDiverged, match=r"non-finite loss at step 4.*step_4"):
        train(config, progress=False)
    assert (tmp_path / "run" / "checkpoints" / "step_4").is_dir()


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(TrainConfigError, match=r"TrainConfig\.method"):
        TrainConfig(method="qlora")
    with pytest.raises(TrainConfigError, match=r"TrainConfig\.batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(TrainConfigError, match=r"TrainConfig\.router_lr_scale: must be > 0"):
        TrainConfig(router_lr_scale=0)
    with pytest.raises(TrainConfigError, match=r"router_lr_scale.*1 for method 'lora'.*routers"):
        TrainConfig(method="lora", router_lr_scale=10)
    with pytest.raises(TrainConfigError, match="unknown field"):
        TrainConfig.from_dict({"learning_rat": 1})
    path = tmp_path / "c.toml"
    path.write_text('method = "lora"\n[loramoe]\nrank = 8\n')
    config = TrainConfig.from_file(path, ["loramoe.lbc_beta=0", "batch_size=4"])
    assert config.loramoe.rank == 8 and config.loramoe.lbc_beta == 0 and config.batch_size == 4
    assert config.learning_rate == 2e-4 and TrainConfig(method="sft").learning_rate == 2e-5


def test_two_process_ddp_run_completes(tiny_model_dir, tiny_train_file, tmp_path):
    config = tmp_path / "ddp.json"
    config.write_text(json.dumps({"model": str(tiny_model_dir),
                                  "train_file": str(tiny_train_file),
                                  "output_dir": str(tmp_path / "ddp"), "max_steps": 3,
                                  "batch_size": 4, "method": "loramoe"}))
    # Before the fix this test ran `accelerate launch --num_processes 2 --cpu`, which starts
    # ONE process: it passed without any data parallelism. torchrun + ACCELERATE_USE_CPU
    # gives two gloo processes (checked: final_metrics.json records the process count).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "loramoe.train", "--config", str(config)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ACCELERATE_USE_CPU": "true"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "ddp" / "adapter" / WEIGHTS_NAME).is_file()
    final = json.loads((tmp_path / "ddp" / "final_metrics.json").read_text())
    assert final["steps"] == 3 and final["processes"] == 2 and final["device"] == "cpu"
    from loramoe.precision import cpu_kernels

    assert final["hardware"] == cpu_kernels()  # which CPU: bf16 rounds per kind (§3)


def test_resume_on_another_number_of_processes_is_refused(tiny_model_dir, tiny_train_file,
                                                          tmp_path):
    """Each process counts the batches it has read, so one process's checkpoint resumed on
    two would skip other data than it read and double the global batch (before: it trained
    on, silently). Named before the model loads; the run stays as it was."""
    settings = {"model": str(tiny_model_dir), "train_file": str(tiny_train_file),
                "output_dir": str(tmp_path / "run"), "max_steps": 2, "save_every": 1,
                "batch_size": 4, "method": "loramoe"}
    train(TrainConfig(**settings), progress=False)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text()
    config = tmp_path / "resume.json"
    config.write_text(json.dumps({**settings, "max_steps": 3}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "loramoe.train", "--config", str(config), "--resume"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "ACCELERATE_USE_CPU": "true"})
    assert done.returncode != 0
    assert "on 2 process(es), but its checkpoint was written by 1" in done.stderr, \
        done.stderr[-3000:]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == metrics
    assert json.loads((tmp_path / "run" / "final_metrics.json").read_text())["steps"] == 2


@pytest.mark.parametrize("method", ["lora", "loramoe"])
def test_adapter_init_depends_on_the_seed_not_on_what_loading_drew(method, tiny_model_dir):
    """A model built the first time (the tiny one, from a config) draws random numbers, one
    read from a cache does not: the adapters must start the same either way (seen: a first
    run on a fresh machine trained other adapters than every later run)."""
    from loramoe.train.builders import build_model

    config = TrainConfig(method=method, model=str(tiny_model_dir), seed=3)
    starts = []
    for draws in (0, 7):
        torch.manual_seed(0)
        torch.rand(draws)  # what loading might have consumed
        model, _ = build_model(config)
        starts.append({k: v.clone() for k, v in model.state_dict().items()
                       if "lora_A" in k or "router" in k})
    assert starts[0] and starts[0].keys() == starts[1].keys()
    for key, value in starts[0].items():
        assert torch.equal(value, starts[1][key]), key


def test_fused_adamw_steps_like_the_plain_one():
    """The CPU trainer's fused AdamW (one kernel) against torch's plain for-loop AdamW, fp64,
    random non-zero gradients, three steps through warm-up and decay."""
    from loramoe.train.builders import build_optimizer

    torch.manual_seed(0)
    start = [torch.randn(5, 7, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    grads = [[torch.randn_like(p) for p in start] for _ in range(3)]
    config = TrainConfig(model="m", train_file="t", output_dir="o", lr=1e-2, weight_decay=0.1,
                         warmup_ratio=0.4)
    finals = []
    for fused in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer, scheduler = build_optimizer(params, config, total_steps=3, fused=fused)
        assert optimizer.defaults["fused"] is (True if fused else None)
        for step_grads in grads:
            for p, g in zip(params, step_grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
            scheduler.step()
        finals.append([p.detach() for p in params])
    for before, plain, fused in zip(start, *finals, strict=True):
        assert (plain - before).abs().min() > 1e-6  # every weight moved
        torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)


def test_cpu_training_uses_fused_adamw(tiny_model_dir, tiny_train_file, tmp_path):
    from loramoe.train.builders import build_training

    config = TrainConfig(model=str(tiny_model_dir), train_file=str(tiny_train_file),
                         output_dir=str(tmp_path / "run"), method="loramoe", max_steps=1)
    training = build_training(config, resume=False)
    assert training.optimizer.optimizer.defaults["fused"] is True


def test_router_lr_scale_moves_only_the_routers_faster(tiny_model_dir, tiny_train_file,
                                                        tmp_path):
    """router_lr_scale = 10 puts every LoRAMoE router (and nothing else) in an AdamW group at
    10× the lr: after one step from the same start the routers moved 10× as far (AdamW's
    first step is ~lr·sign(g)), the experts exactly as far as with one lr."""
    from safetensors.torch import load_file

    from loramoe.adapter import WEIGHTS_NAME
    from loramoe.layer import LoRAMoELinear
    from loramoe.train import train
    from loramoe.train.builders import build_training

    moved = {}
    for scale in (1.0, 10.0):
        config = TrainConfig(model=str(tiny_model_dir), train_file=str(tiny_train_file),
                             output_dir=str(tmp_path / f"x{scale}"), method="loramoe",
                             max_steps=1, warmup_ratio=0.0, router_lr_scale=scale)
        built = build_training(config, resume=False)
        layers = [m for m in built.model.modules() if isinstance(m, LoRAMoELinear)]
        groups = built.optimizer.optimizer.param_groups
        assert [g["lr"] for g in groups] == ([2e-4] if scale == 1 else [2e-4, 2e-3])
        if scale != 1:
            assert {id(p) for p in groups[1]["params"]} == {id(m.router_weight) for m in layers}
        start = {name: p.detach().clone() for name, p in built.model.named_parameters()
                 if p.requires_grad}
        train(config, progress=False)
        after = load_file(str(tmp_path / f"x{scale}" / "adapter" / WEIGHTS_NAME))
        initial = {key: next(v for name, v in start.items() if name.endswith(key))
                   for key in after}  # adapter keys lack the training wrapper's prefix
        moved[scale] = {kind: sum((after[k] - initial[k]).abs().sum().item()
                                  for k in after if k.endswith(kind))
                        for kind in ("router_weight", "lora_B")}
    assert moved[1.0]["router_weight"] > 0 and moved[1.0]["lora_B"] > 0
    assert moved[10.0]["router_weight"] / moved[1.0]["router_weight"] == pytest.approx(10, rel=1e-3)
    assert moved[10.0]["lora_B"] == pytest.approx(moved[1.0]["lora_B"], rel=1e-5)


def test_rows_holding_a_control_tokens_text_are_named(tiny_model_dir, tiny_train_file,
                                                       tmp_path, capfd):
    """A response that mentions '</s>' is encoded with the end-of-sequence token there: the
    model learns to stop mid-answer. It trained so silently before; now a warning names the
    token and the rows."""
    from transformers import AutoTokenizer

    from loramoe.data.records import read_records, write_records

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    eos = tokenizer.eos_token  # '</s>', one of the tokenizer's control tokens
    frame = read_records(tiny_train_file)
    frame.loc[[3, 7], "response"] = [f"42{eos} and more", f"in HTML {eos} ends"]
    ids, _ = encode_example(tokenizer, frame["prompt"][3], frame["response"][3], 128)
    assert ids.count(tokenizer.eos_token_id) == 2  # the text became the token, then the end
    frame.loc[9, "prompt"] = f"What does {tokenizer.unk_token} mean?"  # another token
    path = write_records(frame, tmp_path / "train.jsonl")
    result = train(config_for(tiny_model_dir, path, tmp_path, max_steps=1), progress=False)
    err = capfd.readouterr().err
    assert (f"warning: 2 of {len(frame)} examples hold the text '{eos}', which the tokenizer "
            f"reads as its control token, not as text ({path}: line 4 id="
            f"{frame['id'][3]!r}, line 8 id={frame['id'][7]!r})") in err
    assert f"warning: 1 of {len(frame)} examples hold the text '{tokenizer.unk_token}'" in err
    # counted for the report and MLflow: rows, not tokens (before: in the log alone)
    final = json.loads((result.output_dir / "final_metrics.json").read_text())
    assert final["examples_with_control_text"] == 3
    clean = train(config_for(tiny_model_dir, tiny_train_file, tmp_path / "clean", max_steps=1),
                  progress=False)
    assert "control token" not in capfd.readouterr().err
    final = json.loads((clean.output_dir / "final_metrics.json").read_text())
    assert final["examples_with_control_text"] == 0


def test_control_text_is_what_this_tokenizer_reads_as_the_token(tiny_model_dir):
    """A tokenizer told to split special tokens reads '</s>' as characters: nothing to warn
    of (before: every such row was named). A special token whose text is empty would have
    matched every row."""
    from transformers import AutoTokenizer

    from loramoe.data.collate import control_token_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    texts = ["plain", "ends</s> here", "<unk>"]
    assert control_token_rows(tokenizer, texts) == {"</s>": [1], "<unk>": [2]}
    tokenizer.split_special_tokens = True
    assert control_token_rows(tokenizer, texts) == {}

    class EmptyToken:  # a special token whose text is '' encodes to no id
        all_special_tokens = [""]

        def __call__(self, text, add_special_tokens):
            return {"input_ids": []}

        def convert_tokens_to_ids(self, token):
            return 0

    assert control_token_rows(EmptyToken(), texts) == {}


def test_examples_cut_away_by_max_length_are_counted_and_said(tiny_model_dir, tiny_train_file,
                                                              tmp_path, capfd):
    # Before: dropped silently, so a branch labelled with its scale trained on fewer.
    from transformers import AutoTokenizer

    from loramoe.data.collate import prompt_ids
    from loramoe.data.records import read_records

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    frame = read_records(tiny_train_file)
    prompts = [len(prompt_ids(tokenizer, p)) for p in frame["prompt"]]
    whole = [len(encode_example(tokenizer, p, r, 10**6)[0])  # uncut
             for p, r in zip(frame["prompt"], frame["response"], strict=True)]
    max_length = sorted(whole)[len(whole) // 4]  # a quarter of the rows fit whole
    dropped = sum(n >= max_length for n in prompts)  # their prompt fills it: no response
    assert 0 < dropped < len(frame)
    # kept rows cut short: trained without their end-of-turn marker (before: not counted)
    short = sum(p < max_length < n for p, n in zip(prompts, whole, strict=True))
    assert 0 < short < len(frame) - dropped
    result = train(config_for(tiny_model_dir, tiny_train_file, tmp_path, max_steps=1,
                              max_length=max_length), progress=False)
    final = json.loads((result.output_dir / "final_metrics.json").read_text())
    assert (final["examples"], final["examples_dropped"], final["examples_truncated"]) == (
        len(frame) - dropped, dropped, short)
    err = capfd.readouterr().err
    assert (f"warning: {dropped} of {len(frame)} examples dropped: their response lies past "
            f"max_length ({max_length}) tokens") in err
    assert (f"warning: {short} of {len(frame) - dropped} examples lose their response's end to "
            f"max_length ({max_length}) tokens: they train without their end-of-turn "
            f"marker") in err
