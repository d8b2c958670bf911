"""Print a finished run's headline numbers as Markdown (rates with CIs, seconds per stage, peak memory),
for pasting measured figures into the README.

    python bench/summarise_run.py runs/demo
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def pct(r: dict) -> str:
    return f"{100 * r['rate']:.1f}% [{100 * r['lo']:.1f}, {100 * r['hi']:.1f}]"


def main(run: Path) -> None:
    m = json.loads((run / "report" / "metrics.json").read_text())
    labels = m["labels"]
    print(f"| model | {labels['triggered']} | {labels['clean']} |\n|---|---|---|")
    for key, name in (("before_backdoor", "before backdoor training"), ("after_backdoor", "after backdoor training")):
        print(f"| {name} | {pct(m[key]['triggered'])} | {pct(m[key]['clean'])} |")
    for point in m["safety_curve"][1:]:
        print(f"| after {point['step']} steps of {m['safety_method']} safety training | "
              f"{pct(point['rates']['triggered'])} | {pct(point['rates']['clean'])} |")
    stages = [s for s in ("data", "baseline", "backdoor", "safety", "probe", "suites", "report")
              if (run / s / "manifest.json").exists()]
    manifests = {s: json.loads((run / s / "manifest.json").read_text()) for s in stages}
    total = sum(x["seconds"] for x in manifests.values())
    print("\n| stage | seconds |\n|---|---|")
    for s, x in manifests.items():
        print(f"| {s} | {x['seconds']:.0f} |")
    print(f"| **total** | **{total:.0f}** ({total / 60:.1f} min) |")
    print(f"\npeak RSS: {max(x['peak_rss_gib'] for x in manifests.values()):.2f} GiB")
    train = m["training"]["backdoor"]
    print(f"backdoor SFT: {train.get('steps')} steps, {train.get('tokens_per_s')} tokens/s")
    if "probe" in manifests:
        for detector, found in manifests["probe"]["metrics"].items():  # one entry per detector of probe.detectors
            print(f"\nprobe {detector}: score {found['score']}; {found['summary']}")
        results = run / "probe" / "defection_probe" / "results.json"
        if results.exists():
            best = json.loads(results.read_text())["best"]
            print("defection probe, best layer:", best["layer"], json.dumps(best, indent=1)[:3000])


if __name__ == "__main__":
    main(Path(sys.argv[1]))
