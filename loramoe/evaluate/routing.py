"""Which experts the router uses per eval task: per expert, per expert type (the paper's
Fig. 7), overall and per layer, from the router weights on the prompt tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch


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
    result["separation"] = type_separation(weights, scored, types == 0, type_names[0])
    return result


def type_separation(weights: torch.Tensor, scored: pd.DataFrame, first_type: torch.Tensor,
                    type_name: str) -> dict[str, Any]:
    """The paper's Fig. 7 in one number: the weight on the first type's experts (type_name,
    "knowledge") on items of that task type minus on the other items (macro over tasks, 95%
    bootstrap interval); > 0 means the router sends knowledge tasks to knowledge experts."""
    from loramoe.evaluate.stats import group_difference

    per_item = weights[:, :, first_type].sum(-1).mean(0)  # (S,): over its experts, then layers
    tasks = scored["task"].reset_index(drop=True)
    of_type = scored["task_type"].reset_index(drop=True) == type_name
    return group_difference(pd.Series(per_item.double().numpy()), tasks, of_type)


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
