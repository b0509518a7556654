"""The comparison across methods and scales: the results table and its plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd


def results_table(branches: list[dict[str, Any]], base_metrics: dict[str, Any]) -> pd.DataFrame:
    rows = [{"branch": "base", "method": "base", "scale": 0, "status": "ok",
             "knowledge_score": base_metrics.get("knowledge_score"), "retention": 1.0,
             "downstream_score": base_metrics.get("downstream_score")}]
    for b in branches:
        if b.get("error"):
            rows.append({"branch": b["name"], "method": b["method_name"], "scale": b["scale"],
                         "status": f"failed: {b['error']}"})
            continue
        m = b["metrics"]
        rows.append({"branch": b["name"], "method": b["method_name"], "scale": b["scale"],
                     "status": "ok", "knowledge_score": m.get("knowledge_score"),
                     "retention": m.get("retention", {}).get("overall"),
                     "downstream_score": m.get("downstream_score")})
    return pd.DataFrame(rows)


def comparison_plots(table: pd.DataFrame, branches: list[dict[str, Any]], out: Path
                     ) -> list[Path]:
    """Retention and downstream score vs scale per method (Fig. 1/2), router type weights per
    task (Fig. 7), router CV over steps (Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    ok = table[(table["status"] == "ok") & (table["method"] != "base")]
    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, group in ok.groupby("method"):
        group = group.sort_values("scale")
        axes[0].plot(group["scale"], group["retention"], marker="o", label=method)
        axes[1].plot(group["scale"], group["downstream_score"], marker="o", label=method)
    base = table[table["method"] == "base"].iloc[0]
    axes[1].axhline(base["downstream_score"], color="grey", linestyle="--", label="base")
    axes[0].set(title="Knowledge retention vs data scale", xlabel="training examples",
                ylabel="share of base-known facts kept", ylim=(0, 1.05))
    axes[1].set(title="Downstream score vs data scale", xlabel="training examples",
                ylabel="macro score")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.set_xticks(sorted(set(ok["scale"])))  # linear: NaN retention must not break it
    fig.tight_layout()
    paths.append(out / "retention_downstream_vs_scale.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    moe = [b for b in branches if not b.get("error") and b["metrics"].get("router_type_weights")]
    if moe:
        largest = max(moe, key=lambda b: b["scale"])
        from loramoe.evaluate import plot_router

        analysis = {"type_names": list(next(iter(
            largest["metrics"]["router_type_weights"].values()))),
            "tasks": {t: {"type_weights": w, "task_type":
                          largest["metrics"]["per_task"][t]["task_type"]}
                      for t, w in largest["metrics"]["router_type_weights"].items()}}
        paths.append(plot_router(analysis, out / "router_type_weights.png",
                                 title=f"Router weight per expert type ({largest['name']})"))
        fig, ax = plt.subplots(figsize=(6, 4))
        for b in moe:
            if b["router_cv"]:
                steps, cvs = zip(*b["router_cv"], strict=True)
                ax.plot(steps, cvs, label=b["name"])
        ax.set(title="Router coefficient of variation during training", xlabel="step",
               ylabel="CV of expert importance")
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "router_cv.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def compare_branches(outcomes: list[dict[str, Any]], base_metrics: dict[str, Any],
                     parent_run_id: str, out: Path) -> dict[str, Any]:
    """The comparison step: results table and plots, logged to the MLflow parent run
    (artifacts under compare/, each branch's scores as `branch/metric`)."""
    from loramoe.tracking import log_metrics, store_folder

    table = results_table(outcomes, base_metrics)
    plots = comparison_plots(table, outcomes, out)
    table.to_csv(out / "results.csv", index=False)
    store_folder(parent_run_id, [*plots, out / "results.csv"], "compare")
    rows = table.to_dict(orient="records")
    tuned = [r for r in rows if r["status"] == "ok" and r["method"] != "base"]
    log_metrics(parent_run_id, {f"{r['branch']}/{k}": r[k] for r in tuned
                                for k in ("knowledge_score", "retention", "downstream_score")
                                if r.get(k) is not None})
    return {"rows": rows, "headers": list(table.columns), "plots": plots,
            "failed": [r["branch"] for r in rows if r["status"] != "ok"]}
