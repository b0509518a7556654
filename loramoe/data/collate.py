"""Turn records into token batches: chat template, loss only on the response, dynamic padding."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


def _render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                        tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return list(ids)


def _apply_template(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool
                    ) -> list[int]:
    if getattr(tokenizer, "chat_template", None):
        # Templates such as SmolLM2's insert a default system prompt (~20 tokens) when the
        # conversation has none: render with an empty system turn and cut that turn off.
        try:
            system = [{"role": "system", "content": ""}]
            head = _render(tokenizer, system, False)
            ids = _render(tokenizer, system + messages, add_generation_prompt)
            if ids[: len(head)] == head:
                return ids[len(head):]
        except Exception:  # templates that reject a system role
            pass
        return _render(tokenizer, messages, add_generation_prompt)
    # No chat template (base models): "prompt\n" then the response and EOS.
    text = messages[0]["content"] + "\n"
    if len(messages) > 1:
        text += messages[1]["content"]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt, ready for generation. No default system prompt is added."""
    return _apply_template(tokenizer, [{"role": "user", "content": prompt}], True)


def literal_prompt_ids(tokenizer, prompt: str) -> list[int] | None:
    """prompt_ids with the prompt read as characters only: a control token's text in it (a
    user quoting '<|im_end|>') becomes ordinary tokens, so the message can neither close the
    user's turn nor open another role's. The template is rendered around a user message that
    is one control token absent from the template itself, and the prompt's own tokens
    (split_special_tokens) replace it. A prompt without such text: prompt_ids, unchanged.
    None if every control token also occurs in the template (nothing marks the message)."""
    tokens = control_tokens(tokenizer)  # encodes each candidate: once a prompt, not twice
    if not any(token in prompt for token in tokens):
        return prompt_ids(tokenizer, prompt)
    for token in tokens:
        marker = tokenizer.convert_tokens_to_ids(token)
        framed = prompt_ids(tokenizer, token)
        if framed.count(marker) == 1:
            at = framed.index(marker)
            text = tokenizer(prompt, add_special_tokens=False, split_special_tokens=True)
            return framed[:at] + list(text["input_ids"]) + framed[at + 1:]
    return None


def _conversation_ids(tokenizer, prompt: str, response: str) -> tuple[list[int], int]:
    """The whole example's ids, its end-of-turn marker last, and the prompt's length."""
    prefix = prompt_ids(tokenizer, prompt)
    full = _apply_template(tokenizer, [{"role": "user", "content": prompt},
                                       {"role": "assistant", "content": response}], False)
    if full[: len(prefix)] != prefix:  # templates that rewrite the prefix: fall back to concat
        full = prefix + tokenizer(response, add_special_tokens=False)["input_ids"]
    if not getattr(tokenizer, "chat_template", None) and tokenizer.eos_token_id is not None:
        full = full + [tokenizer.eos_token_id]
    # Drop trailing newline tokens after the end-of-turn marker: they carry no signal.
    while len(full) > len(prefix) + 1 and tokenizer.decode(full[-1:]).strip() == "":
        full = full[:-1]
    return full, len(prefix)


def _cut(full: list[int], prompt_length: int, max_length: int) -> tuple[list[int], list[int]]:
    full = full[:max_length]
    labels = [IGNORE_INDEX] * min(prompt_length, len(full)) + full[prompt_length:]
    return full, labels


def encode_example(tokenizer, prompt: str, response: str, max_length: int
                   ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels = IGNORE_INDEX on the prompt; truncated to max_length."""
    return _cut(*_conversation_ids(tokenizer, prompt, response), max_length)


def control_token_rows(tokenizer, texts: Sequence[str]) -> dict[str, list[int]]:
    """Control-token text -> the indexes of `texts` that hold it. The tokenizer reads such
    text as the token itself, not as characters: an end-of-turn marker inside a response
    ends the turn there, and the model learns to stop (or switch roles) mid-answer."""
    found = {}
    for token in control_tokens(tokenizer):
        if rows := [i for i, text in enumerate(texts) if token in text]:
            found[token] = rows
    return found


def control_tokens(tokenizer) -> list[str]:
    """The texts this tokenizer reads as one special token: its special tokens and its special
    added tokens (transformers 5.17 leaves ChatML's '<|im_end|>' out of all_special_tokens;
    SmolLM2 also has '<filename>', '<file_sep>', ...), less those it reads as characters
    (split_special_tokens) or whose text is empty."""
    added = getattr(tokenizer, "added_tokens_decoder", {}).values()
    names = dict.fromkeys([*tokenizer.all_special_tokens, *(t.content for t in added if t.special)])
    return [t for t in names if tokenizer(t, add_special_tokens=False)["input_ids"]
            == [tokenizer.convert_tokens_to_ids(t)]]


def warn_control_text(tokenizer, frame, columns: Sequence[str], what: str,
                      path=None) -> set[int]:
    """A warning per control token whose text the rows of `frame` hold in `columns` (those
    present; lists such as answers read item by item), naming how many of the `what` (e.g.
    "examples") and the first rows: by line and id in `path`, else by id. Returns the rows."""
    import sys

    from loramoe.data.records import row_name

    present = [frame[c].tolist() for c in columns if c in frame]
    texts = ["\n".join(map(cell_text, cells)) for cells in zip(*present, strict=True)]
    found = control_token_rows(tokenizer, texts)
    for token, rows in found.items():
        named = ", ".join(row_name(frame, i, path) for i in rows[:3])
        named = f"{path}: {named}" if path is not None else f"e.g. {named}"
        print(f"warning: {len(rows)} of {len(frame)} {what} hold the text {token!r}, which "
              f"the tokenizer reads as its control token, not as text ({named})",
              file=sys.stderr)
    return {i for rows in found.values() for i in rows}


def cell_text(cell) -> str:
    """A record cell's text, a list's items (answers, choices) one per line."""
    if isinstance(cell, str) or not hasattr(cell, "__iter__"):
        return str(cell)
    return "\n".join(map(str, cell))


@dataclass
class EncodedDataset(torch.utils.data.Dataset):
    input_ids: list[list[int]]
    labels: list[list[int]]
    sample_types: list[int]
    # kept examples whose response max_length cut short: they train without their end-of-turn
    # marker, i.e. on answers that never stop
    truncated: int = 0
    dropped: int = 0  # records whose response lies wholly past max_length: not kept
    # records whose text holds a control token's text (control_token_rows), counted by the
    # trainer: they train a turn that ends or changes role where the text mentions it
    control_text: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index],
                "sample_type": self.sample_types[index]}


def encode_records(tokenizer, prompts: Sequence[str], responses: Sequence[str],
                   task_types: Sequence[str], type_names: Sequence[str], max_length: int
                   ) -> EncodedDataset:
    """Encode records; examples whose response is truncated away entirely are dropped and
    counted (`dropped`), those cut short are kept and counted (`truncated`)."""
    ids, labels, types, truncated = [], [], [], 0
    for prompt, response, task_type in zip(prompts, responses, task_types, strict=True):
        full, prompt_length = _conversation_ids(tokenizer, prompt, response)
        x, y = _cut(full, prompt_length, max_length)
        if any(label != IGNORE_INDEX for label in y):
            ids.append(x)
            labels.append(y)
            types.append(type_names.index(task_type) if task_type in type_names else -1)
            truncated += len(full) > max_length
    return EncodedDataset(ids, labels, types, truncated, len(prompts) - len(ids))


@dataclass
class Collator:
    """Right-pads a batch to its own longest example (dynamic padding)."""

    pad_token_id: int

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in batch)
        input_ids = torch.full((len(batch), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, item in enumerate(batch):
            n = len(item["input_ids"])
            input_ids[row, :n] = torch.tensor(item["input_ids"])
            labels[row, :n] = torch.tensor(item["labels"])
            mask[row, :n] = 1
        sample_types = torch.tensor([item["sample_type"] for item in batch], dtype=torch.long)
        return {"input_ids": input_ids, "labels": labels, "attention_mask": mask,
                "sample_types": sample_types}
