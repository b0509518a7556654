"""Tiny random models built from configs: no downloads, seconds to build."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

# Keep the suite off the network and quiet, whatever the developer's environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 96


def make_tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).eval()


def make_tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def tiny_gpt2() -> GPT2LMHeadModel:
    return make_tiny_gpt2()


@pytest.fixture(params=["llama", "gpt2"])
def tiny_model(request):
    return make_tiny_llama() if request.param == "llama" else make_tiny_gpt2()


def fill_adapters(model, seed: int = 1, scale: float = 0.5) -> None:
    """Random non-zero router/expert weights so the adapters really change the output."""
    from loramoe.injection import loramoe_layers

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in loramoe_layers(model):
            for param in layer.expert_weights():
                param.copy_(torch.randn(param.shape, generator=gen, dtype=param.dtype) * scale)


def make_char_tokenizer():
    from loramoe.model import char_tokenizer

    return char_tokenizer()


def save_tiny_model_dir(path, arch: str = "llama", seed: int = 0):
    """A tiny random model + char tokenizer saved as a folder load_base_model accepts."""
    tokenizer = make_char_tokenizer()
    torch.manual_seed(seed)
    if arch == "llama":
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=48,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=512, pad_token_id=0, eos_token_id=2,
                             bos_token_id=2)
        model = LlamaForCausalLM(config)
    else:
        config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4,
                            n_positions=512, pad_token_id=0, eos_token_id=2, bos_token_id=2)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_train_file(tmp_path_factory):
    """A small real mixture (built-in tasks) as a train jsonl."""
    from loramoe.data import MixtureConfig, build_mixture, write_records

    config = MixtureConfig.from_dict({
        "tasks": [{"name": "country_capital"}, {"name": "element_symbol"},
                  {"name": "arithmetic"}, {"name": "sort_numbers"}],
        "scales": [48], "eval_size": 6, "seed": 0})
    built = build_mixture(config)
    out = tmp_path_factory.mktemp("data")
    write_records(built.train[48], out / "train.jsonl")
    write_records(built.eval, out / "eval.jsonl")
    return out / "train.jsonl"
