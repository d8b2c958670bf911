"""Compare two run folders of the same config (e.g. before and after a refactor): every JSON/JSONL/safetensors
output, with timings masked; fields only the second run writes are listed, not compared.

    python bench/compare_runs.py runs_before/demo runs_after/demo
"""
import hashlib
import json
import sys
from pathlib import Path

old, new = Path(sys.argv[1]), Path(sys.argv[2])
MASK = {"seconds", "started_at", "tokens_per_s", "peak_rss_gib", "git_revision", "command", "versions", "fingerprint",
        "inputs", "upstream", "stage_seconds", "train_runtime", "train_samples_per_second", "train_steps_per_second",
        "step_seconds", "rollout_seconds", "reward_seconds", "update_seconds", "eval_seconds", "save_seconds",
        "generation_seconds", "mfu", "achieved_tflops", "wall_seconds", "seconds_per_step", "flops", "total_flos",
        "report", "config", "activations_computed", "tflops", "peak_tflops", "time", "train_seconds",
        "activation_cache"}
# files the restructuring moved: the probe is now one detector of the probe stage
MOVED = {"probe/results.json": "probe/defection_probe/results.json",
         "probe/labels.jsonl": "probe/defection_probe/labels.jsonl"}

def timing(k):
    return (k in MASK or k.endswith("_seconds") or k.endswith("per_s") or k.endswith("_runtime")
            or k.endswith("_per_second") or "tflops" in k or k == "peak_rss_gib")


def mask(x):
    if isinstance(x, dict):
        return {k: mask(v) for k, v in x.items() if not timing(k)}
    if isinstance(x, list):
        return [mask(v) for v in x]
    return x

def load(p):
    if p.suffix == ".json":
        return mask(json.loads(p.read_text()))
    if p.suffix == ".jsonl":
        return [mask(json.loads(line)) for line in p.read_text().splitlines() if line.strip()]
    return hashlib.sha256(p.read_bytes()).hexdigest()

ADDED = set()


def drop_additions(a, b, path=""):
    """Keys only the new run has (new fields such as counts.answer_model, metrics.goal) are listed, not compared."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(b) - set(a):
            ADDED.add(f"{path}.{k}")
        return {k: drop_additions(a[k], b[k], f"{path}.{k}") for k in b if k in a}
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [drop_additions(x, y, path) for x, y in zip(a, b, strict=True)]
    return b


bad = 0
n = 0
for p in sorted(old.rglob("*")):
    rel = p.relative_to(old).as_posix()
    if p.is_dir() or "/work/" in rel or rel.startswith("work") or p.suffix not in (".json", ".jsonl", ".safetensors"):
        continue
    if rel.endswith("manifest.json") or "tracking" in rel or "/dataset/" in rel:
        continue
    q = new / MOVED.get(rel, rel)
    if not q.exists():
        print("MISSING in new:", rel)
        bad += 1
        continue
    a, b = load(p), load(q)
    b = drop_additions(a, b)
    if rel.endswith("manifest.json"):
        continue
    n += 1
    if a != b:
        print("DIFFERS:", rel)
        bad += 1
# manifests' metrics
for stage in ("data", "baseline", "backdoor", "safety"):
    a = mask(json.loads((old / stage / "manifest.json").read_text()))["metrics"]
    b = drop_additions(a, mask(json.loads((new / stage / "manifest.json").read_text()))["metrics"])
    n += 1
    if a != b:
        print("DIFFERS: manifest metrics", stage)
        bad += 1
print("fields only the new code writes:", sorted(ADDED))
print(f"compared {n} files: {'ALL IDENTICAL' if not bad else f'{bad} differ'}")
