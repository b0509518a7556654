"""Evaluate a base model or a trained run: generation, metrics, knowledge retention, routing.

    python -m loramoe.evaluate --eval-file EVAL.jsonl --out DIR (--model NAME | --run RUN_DIR)
                               [--base DIR_OF_BASE_EVAL]

Batched greedy generation (left padding, KV cache, stop at EOS). Knowledge retention is the
share of items the *base* model answered correctly that the fine-tuned model still answers
correctly; the base model is evaluated once and its predictions reused. For LoRAMoE models the
router weights on the prompt tokens are averaged per task, per expert and per expert type
(the paper's Fig. 7), overall and per layer.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from loramoe.collate import prompt_ids
from loramoe.metrics import score

MAX_NEW_TOKENS = {"contains": 24, "exact_match": 24, "f1": 16, "accuracy": 8, "rouge_l": 64,
                  "chrf": 32}
CORRECT = 0.5  # a binary metric's item counts as correct at score >= 0.5


@dataclass
class RouterRecorder:
    """Keeps per-sample mean router weights over the prompt tokens of each prefill."""

    layers: list = field(default_factory=list)
    per_sample: list[torch.Tensor] = field(default_factory=list)  # each (L, B, N)
    _mask: torch.Tensor | None = None
    _current: list[torch.Tensor] = field(default_factory=list)
    _handles: list = field(default_factory=list)

    def attach(self, model) -> RouterRecorder:
        from loramoe.injection import loramoe_layers

        self.layers = [name for name, _ in loramoe_layers(model)]
        for _, layer in loramoe_layers(model):
            self._handles.append(layer.register_forward_hook(self._hook))
        return self

    def _hook(self, module, inputs, output) -> None:
        probs = module.router_probs  # (B, T, N)
        if self._mask is not None and probs.dim() == 3 and probs.shape[1] > 1:  # prefill only
            mask = self._mask.to(probs.dtype).unsqueeze(-1)  # (B, T, 1)
            self._current.append(((probs * mask).sum(1) / mask.sum(1)).cpu())  # (B, N)

    def start_batch(self, attention_mask: torch.Tensor) -> None:
        self._mask, self._current = attention_mask, []

    def end_batch(self) -> None:
        if self._current:
            self.per_sample.append(torch.stack(self._current))  # (L, B, N)
        self._mask, self._current = None, []

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()


def _left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, width - len(seq):] = torch.tensor(seq)
        mask[row, width - len(seq):] = 1
    return ids, mask


def generate_predictions(model, tokenizer, frame: pd.DataFrame, batch_size: int = 16,
                         max_prompt_tokens: int = 768, recorder: RouterRecorder | None = None,
                         progress: bool = False, max_new_tokens: int | None = None) -> list[str]:
    """Greedy answers for every prompt, in the frame's order.

    New tokens per batch: max_new_tokens if given, else by the items' metrics (short for QA).
    """
    from tqdm.auto import tqdm

    encoded = [prompt_ids(tokenizer, p) for p in frame["prompt"]]
    cut = sum(len(e) > max_prompt_tokens for e in encoded)
    if cut:
        warnings.warn(f"{cut} prompt(s) longer than {max_prompt_tokens} tokens keep only their "
                      f"last {max_prompt_tokens} tokens", stacklevel=2)
        encoded = [e[-max_prompt_tokens:] for e in encoded]
    # Batches of similar length waste less compute on padding.
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    predictions: dict[int, str] = {}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = model.generation_config.eos_token_id or tokenizer.eos_token_id
    model.eval()
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="generate", disable=not progress):
        ids, mask = _left_pad([encoded[i] for i in batch], pad_id)
        max_new = max_new_tokens or max(MAX_NEW_TOKENS.get(frame["metric"].iloc[i], 24)
                                        for i in batch)
        if recorder is not None:
            recorder.start_batch(mask)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new,
                                 do_sample=False, pad_token_id=pad_id, eos_token_id=eos)
        if recorder is not None:
            recorder.end_batch()
        for row, index in enumerate(batch):
            text = tokenizer.decode(out[row, ids.shape[1]:], skip_special_tokens=True)
            predictions[index] = text.strip()
    if recorder is not None:  # re-order recorded samples to the frame's order
        recorder.per_sample = [torch.cat(recorder.per_sample, dim=1)[:, _inverse(order)]]
    return [predictions[i] for i in range(len(encoded))]


def _inverse(order: list[int]) -> list[int]:
    inverse = [0] * len(order)
    for position, index in enumerate(order):
        inverse[index] = position
    return inverse


def score_predictions(frame: pd.DataFrame, predictions: list[str]) -> pd.DataFrame:
    """Score each prediction against its item's answers (a list of strings, as read_records
    and the task builders give them; a bare string would be scored per character)."""
    from loramoe.data.records import RecordsError

    scored = frame.copy()
    scored["prediction"] = predictions
    for row, answers in enumerate(scored["answers"]):
        if not (isinstance(answers, list) and all(isinstance(a, str) for a in answers)):
            raise RecordsError(f"answers of item {scored['id'].iloc[row]!r} (row {row}) must be "
                               f"a list of strings, got {answers!r}; read eval files with "
                               f"loramoe.data.read_records, which normalises them")
    scored["score"] = [score(m, p, a) for m, p, a in
                       zip(scored["metric"], predictions, scored["answers"], strict=True)]
    return scored


def summarize(scored: pd.DataFrame) -> dict[str, Any]:
    per_task = {
        task: {"task_type": group["task_type"].iloc[0], "metric": group["metric"].iloc[0],
               "score": float(group["score"].mean()), "n": int(len(group))}
        for task, group in scored.groupby("task", sort=True)
    }
    out: dict[str, Any] = {"per_task": per_task}
    for task_type in sorted(scored["task_type"].unique()):
        tasks = [t for t, v in per_task.items() if v["task_type"] == task_type]
        # Macro average over tasks, so a large task does not drown the others.
        out[f"{task_type}_score"] = sum(per_task[t]["score"] for t in tasks) / len(tasks)
    return out


def retention(base: pd.DataFrame, tuned: pd.DataFrame, task_type: str = "knowledge"
              ) -> dict[str, Any]:
    """Share of base-correct items still correct, per task and overall (items joined on id)."""
    joined = base[base["task_type"] == task_type][["id", "task", "score"]].merge(
        tuned[["id", "score"]], on="id", suffixes=("_base", "_tuned"))
    known = joined[joined["score_base"] >= CORRECT]
    kept = known["score_tuned"] >= CORRECT

    def share(mask: pd.Series) -> float | None:
        return float(mask.mean()) if len(mask) else None

    return {
        "overall": share(kept),
        "base_correct": int(len(known)),
        "per_task": {task: share(kept[known["task"] == task])
                     for task in sorted(joined["task"].unique())},
    }


def router_analysis(recorder: RouterRecorder, scored: pd.DataFrame, expert_type_ids: list[int],
                    type_names: list[str]) -> dict[str, Any]:
    """Mean router weight per task: per expert type (averaged over layers and tokens), per
    expert, and per layer per type."""
    weights = recorder.per_sample[0]  # (L, S, N), S = eval items in frame order
    types = torch.tensor(expert_type_ids)
    result: dict[str, Any] = {"layers": recorder.layers, "type_names": type_names, "tasks": {}}
    for task, group in scored.groupby("task", sort=True):
        idx = torch.tensor(group.index.to_numpy())
        per_layer = weights[:, idx].mean(1)  # (L, N)
        by_type_layer = torch.stack([per_layer[:, types == i].sum(1)
                                     for i in range(len(type_names))], dim=1)  # (L, K)
        result["tasks"][task] = {
            "task_type": group["task_type"].iloc[0],
            "type_weights": dict(zip(type_names, by_type_layer.mean(0).tolist(), strict=True)),
            "expert_weights": per_layer.mean(0).tolist(),
            "per_layer_type_weights": by_type_layer.tolist(),
        }
    return result


def plot_router(analysis: dict[str, Any], path: Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(analysis["tasks"])
    names = analysis["type_names"]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(tasks) + 2), 4))
    width = 0.8 / len(names)
    for k, name in enumerate(names):
        values = [analysis["tasks"][t]["type_weights"][name] for t in tasks]
        ax.bar([i + k * width for i in range(len(tasks))], values, width, label=f"{name} experts")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(tasks))])
    ax.set_xticklabels([f"{t}\n({analysis['tasks'][t]['task_type']})" for t in tasks],
                       rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("mean router weight")
    ax.axhline(1 / len(names), color="grey", linewidth=0.8, linestyle="--")
    ax.set_title(title or "Router weight per expert type, by eval task")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def load_for_eval(model: str | None = None, run: str | Path | None = None):
    """(model, tokenizer, train config dict or None) for a base name or a trained run dir."""
    from loramoe.model import load_base_model

    if run is None:
        m, tok = load_base_model(model)
        return m, tok, None
    run = Path(run)
    config = json.loads((run / "train_config.json").read_text())
    if config["method"] == "sft":
        m, tok = load_base_model(str(run / "model"))
    else:
        m, tok = load_base_model(config["model"])
        if config["method"] == "loramoe":
            from loramoe.adapter import load_adapter

            load_adapter(m, run / "adapter")
        else:
            from peft import PeftModel

            m = PeftModel.from_pretrained(m, run / "adapter")
    return m.eval(), tok, config


def evaluate(eval_file: str | Path, out_dir: str | Path, model: str | None = None,
             run: str | Path | None = None, base_dir: str | Path | None = None,
             batch_size: int = 16, progress: bool = True) -> dict[str, Any]:
    """Evaluate and write predictions.jsonl, metrics.json (and router.json/.png)."""
    from loramoe.data.records import check_records, read_records, write_records

    frame = read_records(Path(eval_file)).reset_index(drop=True)
    check_records(frame, "eval", eval_file)  # before any model is loaded
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_model, tokenizer, config = load_for_eval(model, run)
    recorder = None
    if config is not None and config["method"] == "loramoe":
        recorder = RouterRecorder().attach(hf_model)
    predictions = generate_predictions(hf_model, tokenizer, frame, batch_size,
                                       recorder=recorder, progress=progress)
    scored = score_predictions(frame, predictions)
    write_records(scored, out / "predictions.jsonl")
    metrics = summarize(scored)
    if base_dir is not None:
        base = read_records(Path(base_dir) / "predictions.jsonl")
        metrics["retention"] = retention(base, scored)
    if recorder is not None:
        from loramoe.config import LoRAMoEConfig

        moe = LoRAMoEConfig.from_dict(config["loramoe"])
        analysis = router_analysis(recorder, scored, moe.expert_type_ids(), moe.type_names)
        (out / "router.json").write_text(json.dumps(analysis, indent=2))
        plot_router(analysis, out / "router.png", title=f"Router weight per expert type "
                    f"({Path(run).name})")
        metrics["router_type_weights"] = {t: v["type_weights"]
                                          for t, v in analysis["tasks"].items()}
        recorder.detach()
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loramoe.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval-file", required=True)
    parser.add_argument("--out", required=True)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="evaluate a base model (name, hub id or folder)")
    source.add_argument("--run", help="evaluate a trained run folder (python -m loramoe.train)")
    parser.add_argument("--base", help="folder of the base model's evaluation, for retention")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args(argv)
    from loramoe.data.records import RecordsError

    try:
        metrics = evaluate(args.eval_file, args.out, model=args.model, run=args.run,
                           base_dir=args.base, batch_size=args.batch_size)
    except (RecordsError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({k: v for k, v in metrics.items() if k != "per_task"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
