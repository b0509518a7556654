"""Tiny random models built from configs: no downloads, seconds to build."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from loramoe.model import save_tiny_random_model, tiny_random_model

# Keep the suite off the network and quiet, whatever the developer's environment says.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 96

# The longest files first (their measured spans, slowest first): `-n 2 --dist loadfile` hands
# whole files to the two workers in collection order, and the flow runs of test_pipeline.py
# (~13 of the suite's minutes on a slow CPU) used to start last, with the other worker idle
# at the end. xdist's own reordering (files with the most tests first) is switched off so
# that this order holds.
LONGEST_FIRST = ["test_pipeline.py", "test_distributed.py", "test_bad_input.py",
                 "test_bare_gpu_machine.py", "test_forgetting.py", "test_progress.py",
                 "test_shards.py", "test_pipeline_runs.py"]


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: a file's own tests keep their order


SESSION_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")  # what the session started with


@pytest.fixture(autouse=True)
def restore_tracking_uri_env():
    """mlflow.set_tracking_uri also sets $MLFLOW_TRACKING_URI, which every later subprocess
    of the worker inherits (a flow run then logs to that test's store, or retries a server
    the test has stopped): put the session's value back after each test. Not the value
    before the test: a module-scoped fixture sets up before this one, so its URI would be
    "restored" for every later test of the worker (test_bad_input's served model leaked
    into test_pipeline's smoke run that way)."""
    yield
    if SESSION_TRACKING_URI is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = SESSION_TRACKING_URI


def make_tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    return tiny_random_model("llama", seed, vocab_size=VOCAB, max_positions=64,
                             bos_token_id=1).eval()


def make_tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    return tiny_random_model("gpt2", seed, vocab_size=VOCAB, max_positions=64,
                             bos_token_id=1).eval()


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
    return save_tiny_random_model(path, arch, seed)


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
