"""Adapter files: exact round trip, and clean failures with no partial load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import VOCAB, fill_adapters, make_tiny_gpt2, make_tiny_llama
from safetensors.torch import load_file, save_file

from loramoe import AdapterError, LoRAMoEConfig, apply_loramoe, load_adapter, save_adapter
from loramoe.adapter import CONFIG_NAME, WEIGHTS_NAME
from loramoe.injection import loramoe_layers

CONFIG = LoRAMoEConfig(rank=2, expert_types={"knowledge": 2, "downstream": 2},
                       top_k=3)


@pytest.fixture
def saved(tmp_path):
    model = apply_loramoe(make_tiny_llama(), CONFIG)
    fill_adapters(model)
    save_adapter(model, tmp_path / "adapter")
    return model, tmp_path / "adapter"


def logits(model, seed=0):
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids).logits


def assert_untouched(model):
    assert not loramoe_layers(model), "a failed load must leave the model unchanged"


@pytest.mark.parametrize("make", [make_tiny_llama, make_tiny_gpt2])
def test_round_trip_gives_identical_logits(tmp_path, make):
    model = apply_loramoe(make(), CONFIG)
    fill_adapters(model)
    save_adapter(model, tmp_path)
    restored = load_adapter(make(), tmp_path).eval()
    assert restored.loramoe_config == CONFIG
    assert torch.equal(logits(model.eval()), logits(restored))


def test_folder_holds_only_safetensors_and_json(saved):
    _, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    meta = json.loads((folder / CONFIG_NAME).read_text())
    assert meta["loramoe_config"]["expert_types"] == {"knowledge": 2, "downstream": 2}
    assert meta["library_version"]
    assert meta["base_fingerprint"]["model_type"] == "llama"
    tensors = load_file(folder / WEIGHTS_NAME)
    assert all(k.rsplit(".", 1)[-1] in {"router_weight", "lora_A", "lora_B"} for k in tensors)
    assert len(tensors) == 3 * 6


def test_bf16_base_matches_fingerprint_of_fp32_base(saved):
    _, folder = saved
    model = load_adapter(make_tiny_llama().to(torch.bfloat16), folder)
    assert len(loramoe_layers(model)) == 6


def test_wrong_base_weights_fail_cleanly(saved):
    _, folder = saved
    other = make_tiny_llama(seed=123)
    with pytest.raises(AdapterError, match="same architecture but different weights"):
        load_adapter(other, folder)
    assert_untouched(other)
    assert loramoe_layers(load_adapter(other, folder, check_base=False))


def test_wrong_architecture_fails_cleanly(saved):
    _, folder = saved
    other = make_tiny_gpt2()
    with pytest.raises(AdapterError, match=r"architecture differs \(gpt2"):
        load_adapter(other, folder)
    assert_untouched(other)


def test_corrupt_weights_fail_cleanly(saved):
    _, folder = saved
    path = folder / WEIGHTS_NAME
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))
    base = make_tiny_llama()
    with pytest.raises(AdapterError, match="does not match the checksum"):
        load_adapter(base, folder)
    assert_untouched(base)


def test_truncated_weights_fail_cleanly(saved):
    _, folder = saved
    path = folder / WEIGHTS_NAME
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AdapterError, match="checksum"):
        load_adapter(make_tiny_llama(), folder)


def test_unreadable_safetensors_with_matching_checksum_fails_cleanly(saved):
    _, folder = saved
    path = folder / WEIGHTS_NAME
    path.write_bytes(b"not a safetensors file")
    _rewrite_checksum(folder)
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        load_adapter(make_tiny_llama(), folder)


def _rewrite_checksum(folder):
    import hashlib

    meta = json.loads((folder / CONFIG_NAME).read_text())
    meta["weights_sha256"] = hashlib.sha256((folder / WEIGHTS_NAME).read_bytes()).hexdigest()
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


@pytest.mark.parametrize("change", ["missing", "extra", "shape", "nan"])
def test_tensor_mismatch_fails_before_touching_model(saved, change):
    _, folder = saved
    path = folder / WEIGHTS_NAME
    tensors = load_file(path)
    key = sorted(tensors)[0]
    if change == "missing":
        del tensors[key]
    elif change == "extra":
        tensors["model.layers.9.mlp.up_proj.lora_A"] = torch.zeros(1)
    elif change == "shape":
        tensors[key] = torch.zeros(1, 1)
    else:
        tensors[key] = torch.full_like(tensors[key], float("nan"))
    save_file(tensors, path)
    _rewrite_checksum(folder)
    base = make_tiny_llama()
    expected = {"missing": "missing", "extra": "unexpected", "shape": "has shape",
                "nan": "NaN"}[change]
    with pytest.raises(AdapterError, match=expected):
        load_adapter(base, folder)
    assert_untouched(base)


def test_bad_config_json_fails_cleanly(saved):
    _, folder = saved
    (folder / CONFIG_NAME).write_text("{not json")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(make_tiny_llama(), folder)
    (folder / CONFIG_NAME).write_text(json.dumps({"loramoe_config": {"rank": 0},
                                                  "base_fingerprint": {}, "layers": [],
                                                  "weights_sha256": ""}))
    with pytest.raises(AdapterError, match=r"LoRAMoEConfig\.rank"):
        load_adapter(make_tiny_llama(), folder)


def test_missing_folder_and_double_load(saved, tmp_path):
    model, folder = saved
    with pytest.raises(AdapterError, match="not a LoRAMoE adapter folder"):
        load_adapter(make_tiny_llama(), tmp_path / "nope")
    with pytest.raises(AdapterError, match="already has LoRAMoE layers"):
        load_adapter(model, folder)


def test_save_without_adapters_is_refused(tmp_path):
    with pytest.raises(AdapterError, match="no LoRAMoE layers"):
        save_adapter(make_tiny_llama(), tmp_path)


# ---- file names of our own, not PEFT's --------------------------------------------------

LEGACY = Path(__file__).parent / "data" / "adapter_v0_1_0"


def test_adapter_written_by_0_1_0_still_loads():
    expected = json.loads((LEGACY / "expected.json").read_text())
    model = load_adapter(make_tiny_llama(0), LEGACY).eval()
    with torch.no_grad():
        out = model(input_ids=torch.tensor(expected["input_ids"])).logits
    # Reference logits were written by loramoe 0.1.0 when it saved the fixture.
    assert out.double().sum().item() == pytest.approx(expected["logits_sum"], rel=1e-5)
    torch.testing.assert_close(out[0, -1, :8], torch.tensor(expected["logits_first"]))
    base = make_tiny_llama(0).eval()
    with torch.no_grad():
        assert not torch.allclose(base(input_ids=torch.tensor(expected["input_ids"])).logits,
                                  out)


def test_new_adapters_do_not_use_peft_file_names(saved):
    from peft import PeftModel

    _, folder = saved
    assert not (folder / "adapter_config.json").exists()
    assert not (folder / "adapter_model.safetensors").exists()
    with pytest.raises(ValueError, match="adapter_config.json"):  # PEFT: not one of ours
        PeftModel.from_pretrained(make_tiny_llama(), folder)


def test_loading_a_peft_folder_says_what_it_is(tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(make_tiny_llama(), LoraConfig(r=2, target_modules=["up_proj"]))
    peft_model.save_pretrained(tmp_path / "peft")
    model = make_tiny_llama()
    with pytest.raises(AdapterError, match=r"is a PEFT adapter \(peft_type LORA\).*"
                                           r"PeftModel\.from_pretrained"):
        load_adapter(model, tmp_path / "peft")
    assert_untouched(model)


@pytest.mark.parametrize("method", ["loramoe", "lora"])
def test_an_adapter_written_from_a_gathered_state_equals_one_written_from_the_model(
        method, tiny_model_dir, tmp_path):
    """Under FSDP the trainer writes adapters from the gathered full state: the parameters
    are shards (seen on an H200: safetensors hit an invalid storage), and the blocks sit in
    activation-checkpoint wrappers whose names the gathered keys leave out (LoRAMoE's writer
    then raised a KeyError and PEFT's silently wrote an empty adapter). Here the blocks get
    torch's checkpoint wrapper, the state is gathered by torch's get_model_state_dict, and
    the model is zeroed after the gather, so only the state can give the right files."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        apply_activation_checkpointing,
    )
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from loramoe.train import TrainConfig
    from loramoe.train.builders import build_model, save_artifact
    from loramoe.train.objective import ResponseLM

    config = TrainConfig(method=method, model=str(tiny_model_dir))
    model, tokenizer = build_model(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    save_artifact(model, tokenizer, config, tmp_path / "from_model")
    trained = ResponseLM(model)  # as the trainer holds it
    apply_activation_checkpointing(trained, check_fn=lambda m: isinstance(m, LlamaDecoderLayer))
    state = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True))
    state = {k.removeprefix("lm."): v.clone() for k, v in state.items()}
    with torch.no_grad():
        for param in trained.parameters():
            param.zero_()
    save_artifact(trained.lm, tokenizer, config, tmp_path / "from_state", state)
    written = sorted((tmp_path / "from_model" / "adapter").iterdir())
    assert any(f.suffix == ".safetensors" and f.stat().st_size > 1000 for f in written)
    for a in written:
        b = tmp_path / "from_state" / "adapter" / a.name
        assert a.read_bytes() == b.read_bytes(), a.name


def test_the_demo_runs_on_a_base_model_without_a_chat_template(tiny_model_dir, tmp_path):
    # Before: the demo formatted with apply_chat_template itself, so a base model (the paper's
    # Llama-2-7B, or this tiny one) ended in transformers' "chat_template is not set" error.
    import subprocess
    import sys

    from transformers import AutoTokenizer

    assert not AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    done = subprocess.run([sys.executable, "-m", "loramoe.demo", "--model", str(tiny_model_dir),
                           "--out", str(tmp_path / "adapter"), "--steps", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reloaded model answers identically: True" in done.stdout
