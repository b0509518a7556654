"""The forgetting experiment's report: results.csv, retention.png and report.md, from the rows
experiments/forgetting.py measured (nothing typed in by hand)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd

from loramoe.pipeline.markdown import paired_section, setup_section, table, with_ci

ALPHA = 0.05


def verdict(rows: pd.DataFrame) -> str:
    """Last snapshot vs first on the same base-known facts."""
    last = rows.iloc[-1]
    change = (f"{with_ci(last, 'vs_first_diff', signed=True)}; lost "
              f"{last['vs_first_lost']:.0f}, regained {last['vs_first_regained']:.0f}, exact "
              f"McNemar p = {last['vs_first_p']:.2g}")
    if last["vs_first_p"] >= ALPHA:
        return (f"no significant change from {rows['scale'].iloc[0]:.0f} to {last['scale']:.0f} "
                f"examples ({change})")
    way = "falls" if last["vs_first_diff"] < 0 else "rises"
    return (f"retention **{way}** from {rows['scale'].iloc[0]:.0f} to {last['scale']:.0f} "
            f"examples ({change})")


def method_table(rows: pd.DataFrame) -> str:
    return table(
        ["examples", "steps", "train loss", "downstream", "retention (kept/known)",
         "untrained relations", "Δ gold log-prob", "vs first: retention change",
         "lost / regained, p"],
        [[f"{r['scale']:.0f}", f"{r['steps']:.0f}", f"{r['train_loss']:.3f}",
          with_ci(r, "downstream_score"),
          f"{with_ci(r, 'probe_retention')} ({r['kept']:.0f}/{r['probe_base_known']:.0f})",
          with_ci(r, "untrained_retention"), with_ci(r, "logprob_change", signed=True),
          with_ci(r, "vs_first_diff", signed=True),
          f"{r['vs_first_lost']:.0f} / {r['vs_first_regained']:.0f}, "
          f"p = {r['vs_first_p']:.2g}"] for _, r in rows.iterrows()])


def plot(tuned: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, title in ((axes[0], "probe_retention", "all base-known facts"),
                           (axes[1], "untrained_retention", "relations never trained on")):
        for method, rows in tuned.groupby("method", sort=False):
            lo, hi = rows[key] - rows[f"{key}_lo"], rows[f"{key}_hi"] - rows[key]
            ax.errorbar(rows["scale"], rows[key], yerr=[lo, hi], marker="o", capsize=3,
                        label=f"{method} (lr {rows['lr'].iloc[0]:g})")
        ax.set(xscale="log", xlabel="training examples seen", title=title)
    axes[0].set_ylabel("probe retention (95% Wilson)")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def setup_lines(frame: pd.DataFrame, config, command: str) -> list[str]:
    base = frame[frame["method"] == "base"].iloc[0]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    shared = next(iter(config.methods.values()))
    return [f"Command: `{command}` (commit {commit or 'unknown'}).", "",
            setup_section(config, None), "",
            f"{shared.lr_schedule.capitalize()} lr after {shared.warmup_ratio:.0%} warm-up. "
            f"The base model knows **{base['probe_base_known']:.0f} of {base['facts']:.0f}** "
            f"held-out facts (probe, 4-option multiple choice); its downstream score is "
            f"{with_ci(base, 'downstream_score')}.", ""]


def write_report(frame: pd.DataFrame, paired: pd.DataFrame, config, out: Path, command: str
                 ) -> Path:
    frame.to_csv(out / "results.csv", index=False)
    paired.to_csv(out / "paired.csv", index=False)
    tuned = frame[frame["method"] != "base"]
    plot(tuned, out / "retention.png")
    lines = ["# Forgetting with data: nested-prefix runs", "", *setup_lines(frame, config,
                                                                           command)]
    for method, rows in tuned.groupby("method", sort=False):
        lines += [f"## {method} (lr {rows['lr'].iloc[0]:g}, training "
                  f"{rows['train_seconds'].iloc[0]:.0f} s)", "", method_table(rows), "",
                  f"Verdict: {verdict(rows)}.", ""]
    lines += [paired_section(paired), "", "![retention vs examples](retention.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
