"""Atomic file writes: the bytes go to a temp file beside the target, which is then renamed over it.

A run killed mid-write therefore leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path`, creating its parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    os.replace(tmp, path)


def write_json(path: Path, payload: dict) -> None:
    """Indented JSON with a trailing newline, written atomically."""
    write_atomically(path, json.dumps(payload, indent=2) + "\n")
