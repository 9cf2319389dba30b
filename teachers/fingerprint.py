"""The identity of a checkpoint folder without reading its weights: `checkpoint_fingerprint`.

Trajectory sets (`distill.trajectories`) and SDTT runs (`distill.distill`) record which teacher made them. Hashing
every weight byte for that costs ~15 GB of reads per rank per start on a 7B model, so the default fingerprint
reads only what is small and stats the rest: config.json, the tokenizer files, the sharded index, and for each
`*.safetensors` file its name, header (tensor names, dtypes, shapes, data offsets, `__metadata__`), byte size and
mtime. Another architecture, config, tokenizer or tensor layout changes it; so does rewriting the weights, which
moves the mtime. A copy that keeps mtimes (`cp -p`, `rsync -a`, `shutil.copytree`) keeps it.

`strict` replaces each mtime by the sha256 of the file's bytes (reading every weight, as the old `teacher_hash`
did): for copies that do not keep mtimes (`cp` without `-p`, some downloaders), or ranks on several machines that
each read their own copy. The result is prefixed with its mode (`stat:` / `sha256:`), so a mismatch message shows
which mode wrote each side.

A module of its own rather than part of `teachers.manifest`: a manifest checks the bytes of folders fewstep wrote,
while a fingerprint identifies any checkpoint folder, published ones included; it uses the manifest helpers.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

from teachers.manifest import check_manifest, sha256_of

# The chat template lives in chat_template.jinja (transformers >= 4.47) or inside tokenizer_config.json.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")
# The largest header the safetensors library accepts; a larger length is not a safetensors file.
MAX_HEADER_BYTES = 100_000_000


def safetensors_header(path: Path) -> dict:
    """The JSON header of a safetensors file (every tensor's dtype, shape and data offsets, and `__metadata__`),
    read without its tensor data; a file that is not one is a one-line ValueError naming it."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path}: not a safetensors file (header length {length}, file of {size} bytes)")
        raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise ValueError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is not a JSON object)")
    return header


def checkpoint_fingerprint(folder: Path, strict: bool = False) -> str:
    """`stat:<sha256>` of the folder's config.json, tokenizer files, `*.safetensors.index.json` and, per
    `*.safetensors` file in name order, its name, header, size and mtime; with `strict`, `sha256:<sha256>` with
    each weight file's content sha256 in place of its mtime (see the module docstring).

    A folder fewstep wrote is checked against its manifest first (ManifestError naming a corrupt file); a folder
    without weights is a FileNotFoundError naming it.
    """
    folder = Path(folder)
    check_manifest(folder)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        raise FileNotFoundError(f"{folder}: no *.safetensors weights to fingerprint")
    config = folder / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{folder}: no config.json to fingerprint")
    digest = hashlib.sha256()

    def part(label: str, data: bytes) -> None:
        # Label and length first: no two different folders can feed the digest the same byte stream.
        digest.update(f"{label}\0{len(data)}\0".encode() + data)

    part("config.json", config.read_bytes())
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            part(name, (folder / name).read_bytes())
    for index in sorted(folder.glob("*.safetensors.index.json")):
        part(index.name, index.read_bytes())
    for path in weights:
        # Canonical JSON: the same tensors with the header's keys in another order are the same checkpoint.
        part(path.name, json.dumps(safetensors_header(path), sort_keys=True).encode())
        stat = path.stat()
        # Strict reads every byte and skips the manifest's stat cache: it is the mode for when stat is not trusted.
        stamp = sha256_of([path]) if strict else str(stat.st_mtime_ns)
        part(f"{path.name}:size", str(stat.st_size).encode())
        part(f"{path.name}:{'sha256' if strict else 'mtime_ns'}", stamp.encode())
    return f"{'sha256' if strict else 'stat'}:{digest.hexdigest()}"
