"""sha256 manifests of the folders fewstep writes, checked before anything in them is used.

A model folder (`save_teacher`: teachers, students, SDTT round teachers), a distillation checkpoint
(`distill/trainer.py`) and an export (`distill/export.py`) carry `MANIFEST.json`, written last when the folder is
saved:

    {"format": 1, "files": {"model.safetensors": {"size": 103264, "sha256": "..."}, "adapter/...": {...}}}

with every file under the folder (paths relative to it, `/`-separated) but the manifest itself and the names a
writer leaves out. `check_manifest` refuses a listed file that is missing, of another size or of another sha256,
and (`strict`) a file the manifest does not list, with a one-line `ManifestError` naming the file. A folder without
a manifest (a published checkpoint, downloaded) passes unless one is required.

Hashing a large checkpoint takes minutes, so repeat checks take a fast path: a file whose (size, mtime, ctime,
inode) are those recorded when it was last hashed is not read again. The record is a small JSON cache outside
the folders (`$XDG_CACHE_HOME/fewstep/sha256.json`), so a check never writes into the folder it checks. ctime
cannot be set back by a user (unlike mtime, which `touch -d` sets), and any write to a file moves it on.

The module sits with the teachers because `load_teacher` checks the folders it loads; everything above it (the
trajectory sets, checkpoints, exports) uses the same helper, `sha256_of`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

MANIFEST_FILE = "MANIFEST.json"
FORMAT_VERSION = 1
CACHE_ENTRIES = 4096  # files remembered (about 1 MB of JSON); the oldest are dropped first


class ManifestError(ValueError):
    """A folder whose files do not match its manifest; the message is one line naming the file."""


def sha256_of(paths: Iterable[Path], named: bool = False) -> str:
    """sha256 of the files' bytes, in order; with `named` each file's name and a NUL byte go before its bytes (how
    the trajectory sets identify a group of files, e.g. `tokenizer_hash`)."""
    digest = hashlib.sha256()
    for path in paths:
        if named:
            digest.update(Path(path).name.encode() + b"\0")
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# The (size, mtime, ctime, inode) cache


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "fewstep" / "sha256.json"


def _stamp(stat: os.stat_result) -> list[int]:
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


class _Hasher:
    """sha256 of single files through the cache; `save()` records what was hashed (best effort: a cache that cannot
    be read or written only costs a rehash)."""

    def __init__(self) -> None:
        try:
            self.cache = json.loads(_cache_file().read_text())
        except (OSError, ValueError):
            self.cache = {}
        if not isinstance(self.cache, dict):
            self.cache = {}
        self.fresh: dict[str, list] = {}

    def sha256(self, path: Path) -> str:
        key = str(path.resolve())
        stamp = _stamp(path.stat())
        known = self.cache.get(key)
        if isinstance(known, list) and len(known) == 5 and known[:4] == stamp:
            return known[4]
        digest = sha256_of([path])
        if _stamp(path.stat()) == stamp:  # unchanged while it was read
            self.fresh[key] = [*stamp, digest]
        return digest

    def save(self) -> None:
        if not self.fresh:
            return
        # Files since deleted are forgotten; the fresh entries go last, so the trim drops the oldest.
        kept = {key: value for key, value in self.cache.items() if key not in self.fresh and os.path.exists(key)}
        entries = list({**kept, **self.fresh}.items())[-CACHE_ENTRIES:]
        path = _cache_file()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # one per process: ranks save at the same time
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(dict(entries)))
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------
# Writing and checking


def folder_files(folder: Path, exclude: Iterable[str] = ()) -> list[str]:
    """The files under `folder` as sorted relative paths, less the manifest and `exclude`."""
    skipped = {MANIFEST_FILE, *exclude}
    names = (path.relative_to(folder).as_posix() for path in Path(folder).rglob("*") if path.is_file())
    return sorted(name for name in names if name not in skipped)


def hash_files(folder: Path, names: Iterable[str]) -> dict[str, dict]:
    """`{name: {"size", "sha256"}}` of the files `names` under `folder` (what `write_manifest` records)."""
    hasher = _Hasher()
    records = {}
    for name in names:
        path = Path(folder) / name
        records[name] = {"size": path.stat().st_size, "sha256": hasher.sha256(path)}
    hasher.save()
    return records


def write_manifest(folder: Path, exclude: Iterable[str] = (), records: dict[str, dict] | None = None) -> dict:
    """Record every file under `folder` (less `exclude`) in its `MANIFEST.json`; `records` already hashed (by
    `hash_files`, e.g. spread over ranks) are taken as they are. Returns the manifest."""
    folder = Path(folder)
    records = records if records is not None else hash_files(folder, folder_files(folder, exclude))
    manifest = {"format": FORMAT_VERSION, "files": dict(sorted(records.items()))}
    tmp = folder / f".{MANIFEST_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, folder / MANIFEST_FILE)
    return manifest


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, None without one; ManifestError when it is not one."""
    path = Path(folder) / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ManifestError(f"{path}: unreadable ({str(error).splitlines()[0]})") from None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    valid = isinstance(files, dict) and all(
        isinstance(entry, dict) and isinstance(entry.get("size"), int) and isinstance(entry.get("sha256"), str)
        for entry in files.values()
    )
    if not valid or manifest.get("format") != FORMAT_VERSION:
        raise ManifestError(f"{path}: not a fewstep manifest (format {FORMAT_VERSION}, a size and sha256 per file)")
    return manifest


def check_manifest(folder: Path, required: bool = False, strict: bool = False, ignore: Iterable[str] = ()) -> bool:
    """Check the files under `folder` against its manifest; False when it has none (ManifestError if `required`).

    `strict` also refuses files the manifest does not list (but `ignore`): a checkpoint or export holds exactly what
    was written. Sizes are compared first, so a truncated file is named as such without being read.
    """
    folder = Path(folder)
    manifest_path = folder / MANIFEST_FILE
    manifest = read_manifest(folder)
    if manifest is None:
        if required:
            raise ManifestError(f"{manifest_path}: missing, so {folder} was not written by this version of fewstep")
        return False
    files = manifest["files"]
    if strict:
        unlisted = [name for name in folder_files(folder, ignore) if name not in files]
        if unlisted:
            raise ManifestError(f"{folder / unlisted[0]}: not listed in {manifest_path} (added after it was written)")
    for name, entry in files.items():
        path = folder / name
        if not path.is_file():
            raise ManifestError(f"{path}: missing, {manifest_path} lists it")
        size = path.stat().st_size
        if size != entry["size"]:
            what = "truncated or replaced" if size < entry["size"] else "changed since it was written"
            raise ManifestError(f"{path}: {what} ({size} bytes, {manifest_path} records {entry['size']})")
    hasher = _Hasher()
    try:
        for name, entry in files.items():
            if hasher.sha256(folder / name) != entry["sha256"]:
                raise ManifestError(
                    f"{folder / name}: corrupt or changed since it was written (its sha256 differs from "
                    f"{manifest_path})"
                )
    finally:
        hasher.save()
    return True
