"""What the pipeline checks before the base evaluation, on the tokenizers and the
architectures alone (no weights): every method's target modules, its max_length against each
train set, and control-token text in its rows. A fault found here used to fail, or silently
skew, each branch after the base evaluation's work."""

from __future__ import annotations

import sys

import pandas as pd

from loramoe.pipeline.config import PipelineConfig, PipelineConfigError


def check_method_targets(config: PipelineConfig) -> None:
    """Every adapter method's target modules exist in the base model (its architecture,
    no weights), before the base evaluation: a wrong name failed each of that method's
    branches in its train step, after this step's work."""
    from loramoe.train.config import TrainConfigError
    from loramoe.train.preflight import check_targets

    for name, train in config.methods.items():
        try:
            check_targets(train)
        except TrainConfigError as err:
            raise PipelineConfigError(f"config.methods.{name}: {err}") from None


def check_rows(config: PipelineConfig, train_sets: dict[int, pd.DataFrame] | None) -> None:
    """check_train_lengths and check_control_text (when the train sets are given), on each
    method's tokenizer, loaded once."""
    from loramoe.model import load_tokenizer

    if train_sets is None:
        return
    tokenizers = {model: load_tokenizer(model)
                  for model in dict.fromkeys(t.model for t in config.methods.values())}
    check_train_lengths(config, train_sets, tokenizers)
    check_control_text(tokenizers, train_sets)


def check_train_lengths(config: PipelineConfig, train_sets: dict[int, pd.DataFrame],
                        tokenizers: dict) -> None:
    """Every method's max_length leaves each train set examples to learn from (its
    tokenizer, model -> tokenizer in `tokenizers`), before the base evaluation: a train set
    cut away whole failed each of its branches after this step's work. Rows cut from a set,
    and rows whose response it cuts short, are counted in warnings; the report counts each
    branch's."""
    from loramoe.train.preflight import count_cut

    counted = {}
    for name, train in config.methods.items():
        for scale, frame in sorted(train_sets.items()):
            key = (train.model, train.max_length, scale)
            if key not in counted:
                counted[key] = count_cut(tokenizers[train.model], frame, train.max_length)
            cut, short, checked = counted[key]
            rows = f"{checked} rows" if checked == len(frame) else \
                f"the first {checked} of {len(frame)} rows"
            if cut == checked:
                raise PipelineConfigError(
                    f"config.methods.{name}.max_length: {train.max_length} tokens cut away "
                    f"every one of {rows} at scale {scale} (each prompt is that long or "
                    f"longer, chat template included); raise max_length")
            if cut:
                print(f"warning: config.methods.{name}.max_length {train.max_length} cuts "
                      f"{cut} of {rows} at scale {scale} away; its branches train without "
                      f"them", file=sys.stderr)
            if short:
                print(f"warning: config.methods.{name}.max_length {train.max_length} cuts "
                      f"the response of {short} of {rows} at scale {scale} short; its "
                      f"branches train on them without their end-of-turn marker",
                      file=sys.stderr)


def check_control_text(tokenizers: dict, train_sets: dict[int, pd.DataFrame]) -> None:
    """A warning per model (-> tokenizer in `tokenizers`) and control token whose text the
    train sets' rows hold, with the first rows' ids, once for all scales (the trainer says
    it again per branch, and the evaluation for the eval set's items): such a row learns to
    end its turn (or change role) where the text mentions the token."""
    from loramoe.data.collate import warn_control_text

    if not train_sets:
        return
    rows = pd.concat(list(train_sets.values()), ignore_index=True)  # nested: overlapping
    rows = rows.drop_duplicates("id", ignore_index=True) if "id" in rows else rows
    for model, tokenizer in tokenizers.items():
        warn_control_text(tokenizer, rows, ("prompt", "response"),
                          f"rows of the train sets (model {model!r})")
