"""Atomic file writes, and the lock that keeps one `distill` process per run directory.

A write goes to a temp file beside the target, which is then renamed over it, so a run killed mid-write leaves
either the old file or the new one, never half of one. Each temp name is unique to its writer (pid and a random
suffix): two processes writing the same file never write into one temp file.

`lock_directory` holds an advisory lock (`fcntl.flock`) on a run directory's `distill.lock`, which names the
holder's pid while it runs; the lock goes with the process, so a killed run never leaves a stale one.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

LOCK_FILE = "distill.lock"


class DirectoryLocked(OSError):
    """Another process holds the directory's lock; the message names its pid."""


def temp_name(path: Path) -> Path:
    """A temp path beside `path`, unique to this process and call: `.<name>.<pid>.<random>.tmp`."""
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to `path`, creating its parent directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        with open(tmp, "xb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, payload: dict) -> None:
    """Indented JSON with a trailing newline, written atomically."""
    write_atomically(path, json.dumps(payload, indent=2) + "\n")


@contextmanager
def lock_directory(directory: Path) -> Iterator[None]:
    """Hold `directory`'s lock for the block: `LOCK_FILE` is created holding this pid, locked, and removed at the
    end (a killed holder leaves the file but not the lock, which goes with the process).

    Raises `DirectoryLocked` naming the holder's pid when another process holds it; nothing is written then.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_FILE
    while True:
        # "a+" creates the file without truncating it: a refused process must not erase the holder's pid.
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise DirectoryLocked(f"{directory} is in use by another distill process (pid {holder})") from None
        try:
            same = os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        handle.close()  # the holder removed the file after we opened it: lock the one now at `path`
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # while still locked: whoever opens it next gets a new file
        handle.close()
