"""Data-parallel train branches on CPU (torchrun, gloo): the pipeline's train step on 2
processes gives the adapter of 1 process with the same global batch, LBC included."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd
import pytest
import tomllib
import torch
from safetensors.torch import load_file

from loramoe.pipeline import PipelineConfig, PipelineConfigError, run_branch_training

SMOKE = Path(__file__).resolve().parents[1] / "flows" / "configs" / "smoke.toml"


def branch_config(processes: int, batch_size: int, method: str = "loramoe",
                  strategy: str = "ddp", dtype: str = "fp32", **loramoe) -> PipelineConfig:
    data = tomllib.loads(SMOKE.read_text())
    data["local_parallel_branches"] = 1
    data["launch"] = {"processes": processes, "strategy": strategy,
                      "full_model_strategy": strategy}
    # dropout 0: each process draws its own masks, so only a deterministic step can match;
    # fp32: a bf16 base rounds differently for a batch of 4 and one of 8 (~1e-3 relative)
    data["train"].update(batch_size=batch_size, max_steps=4, lr=0.01, warmup_ratio=0.25,
                         dtype=dtype)
    own = {"loramoe": {"loramoe": {"dropout": 0.0, "lbc_beta": 0.5, **loramoe}},
           "lora": {"lora_dropout": 0.0}, "sft": {}}[method]
    data["methods"] = {method: {"method": method, **own}}
    return PipelineConfig.from_dict(data)


def train_branch(config: PipelineConfig, frame: pd.DataFrame, workdir: Path) -> dict:
    method = next(iter(config.methods))
    return run_branch_training(config, {"method": method, "scale": 16}, frame, workdir,
                               mlflow_run_id=None)


@pytest.fixture(scope="module")
def frame(tiny_train_file) -> pd.DataFrame:
    return pd.read_json(tiny_train_file, lines=True).head(32)


def written_weights(trained: dict) -> dict[str, torch.Tensor]:
    """Every tensor the branch wrote: its adapter (either format) or its full model."""
    folder = Path(trained["store"]["local_dir"])
    return {key: value for file in sorted(folder.glob("*/*.safetensors"))
            for key, value in load_file(file).items()}


def relative_differences(a: dict, b: dict) -> dict[str, float]:
    assert a.keys() == b.keys() and len(a) > 0
    return {key: ((b[key].float() - a[key].float()).norm() / a[key].float().norm()).item()
            for key in a if a[key].float().norm() > 0}


def test_two_processes_give_the_one_process_adapter(frame, tmp_path, monkeypatch):
    one = train_branch(branch_config(1, batch_size=8), frame, tmp_path / "one")
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    two = train_branch(branch_config(2, batch_size=4), frame, tmp_path / "two")
    assert not list((tmp_path / "tmp").glob("loramoe-launch-*"))  # the launch config's folder
    assert (one["processes"], two["processes"]) == (1, 2)
    assert one["steps"] == two["steps"] == 4
    a, b = written_weights(one), written_weights(two)
    moved = max((a[k]).abs().max().item() for k in a if "lora_B" in k)
    assert moved > 1e-3
    # Measured: 7e-5 when right; 5e-2 with a per-process LBC, 2e-1 with per-process token
    # means (fp32 rounding of a batch of 4 vs 8, amplified by Adam over 4 steps)
    assert max(relative_differences(a, b).values()) < 1e-3
    logged = [[json.loads(line) for line in (Path(run["store"]["local_dir"]) / "metrics.jsonl")
               .read_text().splitlines()] for run in (one, two)]
    # the schedule advances once per global step (accelerate's default: once per process)
    assert [m["lr"] for m in logged[0]] == [m["lr"] for m in logged[1]]
    # the global batch's LBC, LM loss and router CV, as one process logs them (the LM loss
    # and the CV were rank 0's own shard's until 2026-12-04: 4.06 logged for 4.62)
    for m1, m2 in zip(*logged, strict=True):
        for name in ("lbc_loss", "lm_loss", "router_cv"):
            assert m2[name] == pytest.approx(m1[name], rel=1e-4), (m1["step"], name)


def test_top_k_routing_trains_under_ddp(frame, tmp_path):
    # DDP (find_unused_parameters=False) raises on the step after one in which a parameter
    # got no gradient: top-k must still give every expert one.
    two = train_branch(branch_config(2, batch_size=4, top_k=2), frame, tmp_path / "topk")
    assert two["processes"] == 2 and two["steps"] == 4


def test_sharded_strategies_need_gpus(frame, tmp_path):
    data = tomllib.loads(SMOKE.read_text())
    data["launch"] = {"processes": 2}  # sft: full_model_strategy, FSDP by default
    with pytest.raises(PipelineConfigError, match="config.launch.full_model_strategy"):
        run_branch_training(PipelineConfig.from_dict(data), {"method": "sft", "scale": 16},
                            frame, tmp_path, mlflow_run_id=None)
    data["launch"] = {"processes": -1}
    with pytest.raises(PipelineConfigError, match=r"config.launch.processes: must be >= 0"):
        PipelineConfig.from_dict(data)


def test_fsdp_auto_wrap_finds_the_lm_blocks_through_the_trainer_wrapper(tiny_llama):
    """accelerate's transformer auto-wrap reads `_no_split_modules` off the module it is
    given, the trainer's ResponseLM: without them it wraps no block, and FSDP shards the
    whole model as one unit (a 7B model's weights all gathered at once)."""
    from types import SimpleNamespace

    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    from loramoe.train.objective import ResponseLM

    model = ResponseLM(tiny_llama)
    plugin = SimpleNamespace(auto_wrap_policy=transformer_auto_wrap_policy,
                             transformer_cls_names_to_wrap=None)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    wrapped = [type(m).__name__ for m in model.modules() if policy(m)]
    assert wrapped == ["LlamaDecoderLayer"] * tiny_llama.config.num_hidden_layers


def test_the_train_forward_runs_under_fsdp_style_activation_checkpointing(tiny_llama):
    """accelerate's fsdp_activation_checkpointing wraps each block in torch's checkpoint
    wrapper; a forward that builds a KV cache then appends to it again in the backward's
    recompute (seen on an H200: keys of 40 positions against a mask of 20). The train
    forward builds none."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from loramoe.train.objective import ResponseLM

    model = ResponseLM(tiny_llama).train()
    ids = torch.randint(3, 90, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # padding: a real mask (without one, sdpa's causal path hid the bug)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    want = model(ids, mask, labels)
    grads_want = torch.autograd.grad(want, tiny_llama.model.embed_tokens.weight)
    apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    loss = model(ids, mask, labels)
    (grads,) = torch.autograd.grad(loss, tiny_llama.model.embed_tokens.weight)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(grads, grads_want[0])


def test_a_finished_worker_exits_0_with_its_output_and_without_the_teardown():
    """A rank that finished can still abort in the interpreter's teardown (gloo, seen under
    ZeRO-3 in CI): the worker ends without it, its buffered output flushed. The atexit abort
    stands in for that teardown."""
    import subprocess
    import sys

    script = ("import atexit, os, sys\n"
              "from loramoe.pipeline.worker import exit_without_teardown\n"
              "atexit.register(os.abort)\n"
              "sys.stdout.write('trained, no newline')\n"
              "exit_without_teardown()\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "trained, no newline"


def test_a_failed_launch_names_the_workers_exception():
    from loramoe.pipeline.launch import root_cause

    stderr = """[rank0]: Traceback (most recent call last):
[rank0]:   File "x.py", line 3, in f
[rank0]: KeyError: 'model.layers.0._checkpoint_wrapped_module.mlp.gate_proj.router_weight'
E1204 01:55:23 torch/distributed/elastic/multiprocessing/api.py:986] failed (exitcode: 1)
Traceback (most recent call last):
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
loramoe.pipeline.worker FAILED"""
    assert root_cause(stderr) == ("KeyError: 'model.layers.0._checkpoint_wrapped_module.mlp."
                                  "gate_proj.router_weight'")
    assert root_cause("Killed") == "no exception in the output (see below)"
    # rank 0 died; rank 1, waiting for it in a collective, raised last (seen under FSDP)
    stderr = """[rank0]: loramoe.train.config.TrainConfigError: TrainConfig.output_dir: out holds an earlier run
[rank1]: RuntimeError: [../gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:44242. This is typically caused by a remote worker crashing.
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:"""  # noqa: E501
    assert root_cause(stderr).startswith("loramoe.train.config.TrainConfigError: TrainConfig.")


SHARDING_ON_CPU = Path(__file__).resolve().parent / "sharding_on_cpu"


@pytest.fixture
def sharded_launch_on_cpu(monkeypatch, tmp_path) -> Path:
    """Branches whose strategy shards the model (FSDP, DeepSpeed ZeRO-3) launch as on a GPU
    worker — `accelerate launch` with infra/accelerate/<strategy>.yaml — but on CPU
    processes over gloo; tests/sharding_on_cpu only lifts accelerate's GPU-only gates (and,
    for bf16, the native-bf16 check). Returns the folder where each rank reports what
    accelerate prepared."""
    from loramoe import precision
    from loramoe.pipeline import launch

    cpu_launcher, report = launch.launcher, tmp_path / "prepared"
    # No C++ compiler, as on a bare CI machine, and a fresh folder for any op torch would
    # build at run time: a launched branch must build nothing (DeepSpeed's CPU backend built
    # its shared-memory op, 50-90 s, and failed without a compiler).
    harness = {"SHARDING_REPORT": str(report), "EMULATE_BF16": "1", "CXX": "false",
               "TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"),
               "PYTHONPATH": os.pathsep.join([str(SHARDING_ON_CPU),
                                              os.environ.get("PYTHONPATH", "")])}

    def launcher(config, method, processes, on_gpu):
        strategy = config.launch.strategy_for(method)
        if strategy == "ddp":
            prefix, env = cpu_launcher(config, method, processes, on_gpu)
            return prefix, {**env, **harness}
        prefix, _ = cpu_launcher(config, method, processes, on_gpu=True)
        assert str(launch.ACCELERATE_CONFIGS / f"{strategy}.yaml") in prefix
        prefix = ["timeout", "240", *prefix]  # a collective only some ranks enter hangs
        # FSDP goes through accelerate's CPU switch; DeepSpeed must not see it (it drops
        # DeepSpeed on CPU), its own CPU accelerator takes the processes
        cpu = {"ACCELERATE_USE_CPU": "true"} if strategy == "fsdp" else {}
        return prefix, {**cpu, **harness}

    monkeypatch.setattr(launch, "launcher", launcher)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)  # 1-process runs
    return report


def sharded_ranks(report: Path, kind: str) -> list[dict]:
    """What each of the 2 ranks' accelerate.prepare returned; asserts every parameter was a
    shard (an FSDP2 DTensor, a ZeRO-3 partition)."""
    ranks = [json.loads((report / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank in ranks:
        assert rank["distributed_type"] == f"DistributedType.{kind}"
        assert rank["sharded"] == rank["parameters"] > 0
    return ranks


@pytest.mark.parametrize(("strategy", "method"), [
    ("fsdp", "loramoe"), ("fsdp", "lora"), ("fsdp", "sft"),
    ("deepspeed_zero3", "loramoe"), ("deepspeed_zero3", "sft")])
def test_sharded_branch_on_two_processes_writes_the_one_process_weights(
        strategy, method, frame, tmp_path, sharded_launch_on_cpu):
    """LoRAMoE's and LoRA's adapters and SFT's model, trained on 2 sharded processes, equal
    one process's with the same global batch, same keys. On an H200 the adapters' writer
    failed under FSDP (docs/benchmarks.md §4; fix 3 was never re-run there); ZeRO-3 first
    ran here: it refused the trainer's late data loader, hung building the writer's skeleton
    on rank 0 alone, and clipped SFT's gradients at 1.0 (accelerate's fill-in)."""
    if strategy == "deepspeed_zero3":
        pytest.importorskip("deepspeed", reason="the dev extra installs deepspeed")
    one = train_branch(branch_config(1, batch_size=8, method=method), frame, tmp_path / "one")
    two = train_branch(branch_config(2, batch_size=4, method=method, strategy=strategy), frame,
                       tmp_path / "two")
    sharded_ranks(sharded_launch_on_cpu, "FSDP" if strategy == "fsdp" else "DEEPSPEED")
    assert not (tmp_path / "torch_extensions").exists()  # nothing compiled
    assert two["processes"] == 2 and one["steps"] == two["steps"] == 4
    a, b = written_weights(one), written_weights(two)
    assert max(relative_differences(a, b).values()) < 1e-4  # fp32: 1e-6 measured
    if method != "sft":
        assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3  # trained


def test_fsdp_keeps_the_bf16_storage_plan_and_trains_as_ddp(frame, tmp_path,
                                                           sharded_launch_on_cpu):
    """The GPU's dtype (bf16 frozen weights, fp32 adapters, one FSDP unit per block holding
    both): FSDP2 shards them without casting the frozen weights up, and LoRAMoE's adapter
    equals DDP's on the same 2 processes bit for bit (measured; vs one process it differs
    by ~3 %: bf16 rounds a batch of 4 unlike one of 8, under DDP exactly as under FSDP)."""
    ddp = train_branch(branch_config(2, 4, strategy="ddp", dtype="bf16"), frame,
                       tmp_path / "ddp")
    fsdp = train_branch(branch_config(2, 4, strategy="fsdp", dtype="bf16"), frame,
                        tmp_path / "fsdp")
    ranks = sharded_ranks(sharded_launch_on_cpu, "FSDP")
    assert ranks[0]["dtypes"] == ["torch.bfloat16", "torch.float32"]
    a, b = written_weights(ddp), written_weights(fsdp)
    assert {str(v.dtype) for v in b.values()} == {"torch.float32"}
    assert max(relative_differences(a, b).values()) < 1e-5


def test_zero3_refuses_adapters_below_fp32_and_keeps_the_trainer_recipe():
    """ZeRO-3 stores every weight in DeepSpeed's dtype: a bf16 LoRAMoE branch on 2 ZeRO-3
    processes kept its frozen base in fp32. build_training calls this right after the
    Accelerator is made, before the model is loaded (seen end to end: the branch stops with
    this message)."""
    from loramoe.train import TrainConfig, TrainConfigError
    from loramoe.train.builders import deepspeed_recipe

    adapters = TrainConfig(model="tiny-random-llama", method="loramoe", dtype="bf16")
    with pytest.raises(TrainConfigError, match=r"TrainConfig.dtype = 'bf16' .* ZeRO-3.* "
                                               r"'ddp' or 'fsdp'"):
        deepspeed_recipe({}, adapters, torch.bfloat16)
    ds_config = {"gradient_clipping": "auto"}
    deepspeed_recipe(ds_config, TrainConfig(model="tiny-random-llama", method="sft",
                                            dtype="bf16", batch_size=4), torch.bfloat16)
    # full SFT keeps fp32 master weights (bf16 autocast), so ZeRO-3 runs its plan; the
    # data loader comes later, and accelerate's clip-at-1.0 fill-in is switched off
    assert ds_config == {"gradient_clipping": 0.0, "train_micro_batch_size_per_gpu": 4}
