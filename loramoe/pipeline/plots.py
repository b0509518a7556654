"""The compare step's figures: retention and downstream score vs scale (the paper's Fig. 1/2),
router weight per expert type (Fig. 7), router CV during training (Fig. 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from loramoe.pipeline.numbers import with_interval


def comparison_plots(table: pd.DataFrame, branches: list[dict[str, Any]], out: Path
                     ) -> list[Path]:
    """Retention and downstream score vs scale per method (Fig. 1/2), router type weights per
    task (Fig. 7), router CV over steps (Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    paths = [scale_plot(table, out / "retention_downstream_vs_scale.png", plt)]
    moe = [b for b in branches if not b.get("error") and b["metrics"].get("router_type_weights")]
    if moe:
        paths.append(router_types_plot(moe, out / "router_type_weights.png", plt))
        paths.append(router_cv_plot(moe, out / "router_cv.png", plt))
    return paths


def scale_plot(table: pd.DataFrame, path: Path, plt) -> Path:
    """Retention and downstream score vs scale per method, with 95% error bars."""
    ok = table[(table["status"] == "ok") & (table["method"] != "base")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    panels = ((axes[0], "retention"), (axes[2], "downstream_score"),
              (axes[1], "untrained_retention"))
    seeds = ok["seed"] if "seed" in ok else pd.Series(None, index=ok.index)
    for (method, seed), group in ok.groupby([ok["method"], seeds.fillna(-1)]):
        label = method if seed < 0 else f"{method} (seed {int(seed)})"  # a line per replicate
        group = group.sort_values("scale")
        for ax, column in panels:
            if group[column].isna().all():
                continue
            # 95% interval as error bars (Wilson for retention, bootstrap for the score)
            values = group[column].astype(float)
            low = (values - group[f"{column}_lo"].astype(float)).clip(lower=0)
            high = (group[f"{column}_hi"].astype(float) - values).clip(lower=0)
            ax.errorbar(group["scale"], values, yerr=[low.fillna(0), high.fillna(0)],
                        marker="o", capsize=3, label=label)
    base = table[table["method"] == "base"].iloc[0]
    axes[2].axhline(base["downstream_score"], color="grey", linestyle="--", label="base")
    axes[0].set(title="Knowledge retention (generation)", xlabel="training examples",
                ylabel="share of base-known facts kept", ylim=(0, 1.05))
    axes[1].set(title="Retention, untrained relations (probe)", xlabel="training examples",
                ylabel="base-known facts kept (multiple choice)", ylim=(0, 1.05))
    axes[2].set(title="Downstream score vs data scale", xlabel="training examples",
                ylabel="macro score")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.set_xticks(sorted(set(ok["scale"])))  # linear: NaN retention must not break it
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _type_blind_share(branch: dict[str, Any], type_names: list[str]) -> float:
    """The first type's share of the experts: its router weight if routing ignored type."""
    from loramoe.config import LoRAMoEConfig

    moe = branch.get("trained", {}).get("train_config", {}).get("loramoe")
    if moe is None:
        return 1 / len(type_names)
    types = LoRAMoEConfig.from_dict(moe).expert_type_ids()
    return types.count(0) / len(types)


def router_panels(moe: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What the Fig. 7 plot draws: one panel for every LoRAMoE branch at the largest scale
    (not only the first: a run compares LBC variants there), each with the router weight on
    the first type's experts per eval task, that type's tasks first, and the share a
    type-blind router would give."""
    largest = max(b["scale"] for b in moe)
    panels = []
    for branch in (b for b in moe if b["scale"] == largest):
        weights, per_task = branch["metrics"]["router_type_weights"], branch["metrics"]["per_task"]
        type_names = list(next(iter(weights.values())))
        first = type_names[0]
        tasks = sorted(weights, key=lambda t: (per_task[t]["task_type"] != first, t))
        panels.append({"name": branch["name"], "type": first, "tasks": tasks,
                       "values": [weights[t][first] for t in tasks],
                       "of_type": [per_task[t]["task_type"] == first for t in tasks],
                       "type_blind": _type_blind_share(branch, type_names),
                       "separation": branch["metrics"].get("router_separation") or {}})
    return panels


def router_types_plot(moe: list[dict[str, Any]], path: Path, plt) -> Path:
    """The paper's Fig. 7, a row per panel of `router_panels`: bars from the type-blind share
    (dashed) to each task's weight, the branch's separation with its 95% interval in the
    title, one shared and zoomed y axis (the differences are small)."""
    panels = router_panels(moe)
    fig, axes = plt.subplots(len(panels), 1, sharex=True, sharey=True, squeeze=False,
                             figsize=(10, 1.0 + 2.0 * len(panels)))
    for ax, panel in zip(axes[:, 0], panels, strict=True):
        # bars from the type-blind share: the y axis is zoomed, so a bar's length is the
        # deviation, not the weight
        ax.bar(range(len(panel["tasks"])), [v - panel["type_blind"] for v in panel["values"]],
               bottom=panel["type_blind"],
               color=["tab:blue" if mine else "tab:orange" for mine in panel["of_type"]])
        ax.axhline(panel["type_blind"], color="grey", linewidth=0.8, linestyle="--")
        sep = panel["separation"]
        value = with_interval(sep.get("value"), *(sep.get("ci") or (None, None)), signed=True)
        ax.set_title(f"{panel['name']}: separation {value}", fontsize=9)
        ax.set_ylabel(f"{panel['type']} experts", fontsize=8)
    shown = [v for p in panels for v in (*p["values"], p["type_blind"])]
    pad = max(0.01, 0.15 * (max(shown) - min(shown)))
    axes[0, 0].set_ylim(min(shown) - pad, max(shown) + pad)
    axes[-1, 0].set_xticks(range(len(panels[-1]["tasks"])))
    axes[-1, 0].set_xticklabels(panels[-1]["tasks"], rotation=45, ha="right", fontsize=8)
    first = panels[0]["type"]
    fig.suptitle(f"Router weight on the {first} experts per eval task (blue: {first} tasks, "
                 f"orange: the others; dashed: type-blind)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def router_cv_plot(moe: list[dict[str, Any]], path: Path, plt) -> Path:
    """Router CV over training steps, one line per LoRAMoE branch (the paper's Fig. 5)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for b in moe:
        if b["router_cv"]:
            steps, cvs = zip(*b["router_cv"], strict=True)
            ax.plot(steps, cvs, label=b["name"])
    ax.set(title="Router coefficient of variation during training", xlabel="step",
           ylabel="CV of expert importance")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
