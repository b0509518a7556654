"""A batch in two length pieces is the same step: same loss, LBC and gradient, less padding."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from loramoe.data.collate import IGNORE_INDEX, Collator, encode_records
from loramoe.train import TrainConfig, train
from loramoe.train.builders import build_model
from loramoe.train.loop import forward_batch, lbc_term
from loramoe.train.objective import ResponseLM
from loramoe.train.pieces import length_pieces


def ragged_batch(lengths: list[int]) -> dict[str, torch.Tensor]:
    """Right-padded rows whose tokens are (row + 1) * 100 + position, so rows can be traced."""
    items = [{"input_ids": [(r + 1) * 100 + t for t in range(n)],
              "labels": [IGNORE_INDEX] + [(r + 1) * 100 + t for t in range(1, n)],
              "sample_type": r % 2} for r, n in enumerate(lengths)]
    return Collator(pad_token_id=0)(items)


def test_pieces_hold_every_row_once_cut_to_their_longest():
    batch = ragged_batch([21, 3, 22, 4, 3, 20, 4, 22])
    short, long = length_pieces(batch)
    assert short["input_ids"].shape == (4, 4) and long["input_ids"].shape == (4, 22)
    seen = {}
    for piece in (short, long):
        for ids, labels, mask, kind in zip(piece["input_ids"], piece["labels"],
                                           piece["attention_mask"], piece["sample_types"],
                                           strict=True):
            row = int(ids[0]) // 100 - 1
            n = int(mask.sum())
            assert torch.equal(ids[:n], batch["input_ids"][row, :n])
            assert torch.equal(labels, batch["labels"][row, :len(labels)])
            assert int(kind) == int(batch["sample_types"][row])
            seen[row] = n
    assert sorted(seen) == list(range(8))
    assert seen == {r: int(n) for r, n in enumerate(batch["attention_mask"].sum(-1))}


def test_even_lengths_or_small_savings_stay_one_batch():
    even = ragged_batch([10] * 8)
    assert length_pieces(even) == [even]
    close = ragged_batch([9, 10, 10, 10, 10, 10, 10, 10])  # a cut would save 1 token in 80
    assert length_pieces(close) == [close]
    one = ragged_batch([5])  # one row: nothing to cut
    assert length_pieces(one) == [one]


def tiny_batch(tokenizer, frame, rows: int = 8) -> dict[str, torch.Tensor]:
    """The train file's shortest and longest rows, so that the batch is cut in two."""
    data = encode_records(tokenizer, frame["prompt"].tolist(), frame["response"].tolist(),
                          frame["task_type"].tolist(), ["knowledge", "downstream"], 128)
    by_length = sorted(range(len(data)), key=lambda i: len(data[i]["input_ids"]))
    picked = by_length[: rows // 2] + by_length[-rows // 2:]  # short ones and long ones
    return Collator(tokenizer.pad_token_id or 0)([data[i] for i in picked])


def step_gradient(model, batch, config, split: bool):
    lm_loss, routed = forward_batch(model, batch, config, split=split)
    lbc, _ = lbc_term(routed, config)
    loss = lm_loss if lbc is None else lm_loss + config.loramoe.lbc_beta * lbc
    model.zero_grad(set_to_none=True)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return lm_loss.item(), None if lbc is None else lbc.item(), grads


@pytest.mark.parametrize("method", ["sft", "lora", "loramoe"])
def test_pieces_give_the_whole_batch_loss_lbc_and_gradient(method, tiny_model_dir,
                                                           tiny_train_file):
    from loramoe.data import read_records

    config = TrainConfig(model=str(tiny_model_dir), method=method, lora_dropout=0.0,
                         loramoe={"dropout": 0.0})
    model, tokenizer = build_model(config)
    torch.manual_seed(1)
    for name, param in model.named_parameters():  # B = 0 at init would hide the adapters
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    model = ResponseLM(model).train()
    batch = tiny_batch(tokenizer, read_records(tiny_train_file))
    assert len(length_pieces(batch)) == 2
    lm_whole, lbc_whole, whole = step_gradient(model, batch, config, split=False)
    lm_split, lbc_split, split = step_gradient(model, batch, config, split=True)
    assert lm_split == pytest.approx(lm_whole, rel=1e-5)
    if method == "loramoe":
        assert lbc_split == pytest.approx(lbc_whole, rel=1e-5)
    assert whole.keys() == split.keys() and whole
    for name, grad in whole.items():
        torch.testing.assert_close(split[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_split_and_whole_batch_training_write_the_same_adapter(tiny_model_dir, tiny_train_file,
                                                               tmp_path):
    written = {}
    for split in (False, True):
        config = TrainConfig(model=str(tiny_model_dir), train_file=str(tiny_train_file),
                             output_dir=str(tmp_path / f"split-{split}"), method="loramoe",
                             batch_size=8, max_steps=4, lr=1e-2, max_length=128,
                             warmup_ratio=0.0, split_by_length=split, loramoe={"dropout": 0.0})
        result = train(config, progress=False)
        written[split] = load_file(next(result.artifact.glob("*.safetensors")))
    assert written[True].keys() == written[False].keys()
    for key, value in written[False].items():
        torch.testing.assert_close(written[True][key], value, rtol=1e-3, atol=1e-5, msg=key)
