"""What every hostile-input test asserts: the exit code, one `distill:` line naming the field or file, no
traceback, and the directory it must not touch unchanged (a sha256 over its tree)."""

from __future__ import annotations

import hashlib
from pathlib import Path


def tree_digest(root: Path) -> str:
    """sha256 over every file's relative path and bytes under `root`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def assert_refused(
    code: int, err: str, names: Path | str, run: Path | None = None, before: str | None = None, expected: int = 1
) -> None:
    """Exit code `expected`, one `distill:` line naming `names`, no traceback, and `run` as it was (`before`)."""
    assert code == expected, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("distill:")]
    assert len(lines) == 1 and str(names) in lines[0], err
    if run is not None:
        assert tree_digest(run) == before, "the refused command changed the directory"
