"""Demo: put LoRAMoE into the default model, train it a few steps with the LBC, generate,
save and reload the adapter.

    python -m loramoe.demo [--model smollm2-135m-instruct] [--out outputs/demo-adapter]
"""

from __future__ import annotations

import argparse

import torch

from loramoe import (
    LoRAMoEConfig,
    apply_loramoe,
    collect_router_probs,
    load_adapter,
    load_base_model,
    localized_balancing_loss,
    parameter_summary,
    save_adapter,
)
from loramoe.data.collate import encode_example, prompt_ids
from loramoe.model import contiguous_head_input

# (question, answer, task type): a knowledge fact and a downstream skill.
EXAMPLES = [
    ("What is the capital of Peru?", "The capital of Peru is Lima.", "knowledge"),
    ("Sort these numbers: 9, 2, 7.", "2, 7, 9", "downstream"),
]


def encode(tokenizer, question: str, answer: str | None = None) -> torch.Tensor:
    """(1, T) ids as the trainer formats them: the chat template where the model has one, else
    the question and a newline (a base model, e.g. the paper's Llama-2-7B)."""
    ids = (prompt_ids(tokenizer, question) if answer is None
           else encode_example(tokenizer, question, answer, max_length=256)[0])
    return torch.tensor([ids])  # (1, T)


def answer(model, tokenizer, question: str) -> str:
    ids = encode(tokenizer, question)
    contiguous_head_input(model)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                             do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def type_weights(model, config: LoRAMoEConfig) -> dict[str, float]:
    """Mean router weight per expert type over layers and tokens of the last forward."""
    probs = torch.stack(collect_router_probs(model)).mean(dim=(0, 1, 2))  # (N,)
    ids = torch.tensor(config.expert_type_ids())
    return {name: probs[ids == i].sum().item() for i, name in enumerate(config.type_names)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--out", default="outputs/demo-adapter")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)

    model, tokenizer = load_base_model(args.model)
    config = LoRAMoEConfig()
    apply_loramoe(model, config)
    print(f"LoRAMoE plugged into {args.model}: {parameter_summary(model)}")

    batch = [encode(tokenizer, q, a)[0] for q, a, _ in EXAMPLES]
    width = max(len(ids) for ids in batch)
    pad = tokenizer.pad_token_id
    input_ids = torch.stack([torch.cat([ids, ids.new_full((width - len(ids),), pad)])
                             for ids in batch])  # (B, T)
    mask = torch.stack([torch.arange(width) < len(ids) for ids in batch]).long()  # (B, T)
    labels = input_ids.masked_fill(mask == 0, -100)
    sample_types = torch.tensor([config.type_index(t) for _, _, t in EXAMPLES])
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=2e-4)
    model.train()
    for step in range(args.steps):
        lm_loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        lbc = localized_balancing_loss(collect_router_probs(model), mask, sample_types,
                                       config.expert_type_ids(), config.lbc_delta)
        loss = lm_loss + config.lbc_beta * lbc
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"step {step}: lm loss {lm_loss.item():.4f}  lbc {lbc.item():.4f}")
    model.eval()

    for question, _, _ in EXAMPLES:
        print(f"Q: {question}\nA: {answer(model, tokenizer, question)}")
        print(f"   router weight per expert type: {type_weights(model, config)}")

    save_adapter(model, args.out)
    fresh, _ = load_base_model(args.model)
    restored = load_adapter(fresh, args.out).eval()
    same = answer(restored, tokenizer, EXAMPLES[0][0]) == answer(model, tokenizer, EXAMPLES[0][0])
    print(f"adapter saved to {args.out}; reloaded model answers identically: {same}")


if __name__ == "__main__":
    main()
