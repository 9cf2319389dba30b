"""`checkpoint_fingerprint` on a tiny saved teacher: what keeps it (copies that keep mtimes; plain copies in strict
mode), what changes it (config, tensor shapes, rewritten weights; weight values in strict mode), that the default
mode never reads the tensor data, the manifest check it keeps, and the `--strict-hash` flag of `distill run`."""

import json
import os
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from distill.cli import _load, parse_args
from teachers.fingerprint import checkpoint_fingerprint, safetensors_header
from teachers.interface import save_teacher
from teachers.manifest import MANIFEST_FILE, ManifestError, write_manifest
from tests.builders import saved_tiny_teacher, tiny_teacher

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return saved_tiny_teacher(tmp_path_factory.mktemp("fingerprint"))


def both(folder: Path) -> tuple[str, str]:
    return checkpoint_fingerprint(folder), checkpoint_fingerprint(folder, strict=True)


def rewrite_tensors(path: Path, change) -> None:
    """Save `change(tensors)` over the safetensors file at `path` with its metadata, then give the file its old
    mtime back: only what `change` did tells the new file from the old one."""
    stat = path.stat()
    with safe_open(path, "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(path)
    save_file(change(tensors), path, metadata=metadata)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_modes_are_named_and_a_copy_that_keeps_mtimes_is_the_same_teacher(teacher_dir, tmp_path):
    stat, strict = both(teacher_dir)
    assert stat.startswith("stat:") and strict.startswith("sha256:") and len(stat) == 5 + 64
    shutil.copytree(teacher_dir, tmp_path / "copy")  # copy2: mtimes kept
    assert both(tmp_path / "copy") == (stat, strict)


def test_a_plain_copy_is_the_same_teacher_only_in_strict_mode(teacher_dir, tmp_path):
    stat, strict = both(teacher_dir)
    shutil.copytree(teacher_dir, tmp_path / "copy", copy_function=shutil.copyfile)  # new mtimes
    assert checkpoint_fingerprint(tmp_path / "copy", strict=True) == strict
    assert checkpoint_fingerprint(tmp_path / "copy") != stat


def test_a_config_value_changes_it(teacher_dir, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(teacher_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["rms_norm_eps"] = config["rms_norm_eps"] * 10  # a value, no shape
    (other / "config.json").write_text(json.dumps(config))
    write_manifest(other)  # a folder written so, not one changed behind its manifest's back
    assert checkpoint_fingerprint(other) != checkpoint_fingerprint(teacher_dir)
    assert checkpoint_fingerprint(other, strict=True) != checkpoint_fingerprint(teacher_dir, strict=True)


def test_tensor_shapes_change_it(teacher_dir, tmp_path):
    # Another model size: another header (and config).
    torch.manual_seed(0)
    save_teacher(tiny_teacher(48, 64, 1, 2, 1, 64), tmp_path / "wider")
    assert checkpoint_fingerprint(tmp_path / "wider") != checkpoint_fingerprint(teacher_dir)
    # Only a shape: one matrix transposed in the header, the same bytes, size, config and mtime.
    reshaped = tmp_path / "reshaped"
    shutil.copytree(teacher_dir, reshaped)
    name = next(key for key, value in load_file(reshaped / WEIGHTS).items() if value.ndim == 2)
    rewrite_tensors(reshaped / WEIGHTS, lambda tensors: {**tensors, name: tensors[name].reshape(tensors[name].T.shape)})
    write_manifest(reshaped)
    assert (reshaped / WEIGHTS).stat().st_size == (teacher_dir / WEIGHTS).stat().st_size
    assert checkpoint_fingerprint(reshaped) != checkpoint_fingerprint(teacher_dir)


def test_weights_rewritten_in_place_change_it_unless_strict_and_the_same_bytes(teacher_dir, tmp_path):
    stat, strict = both(teacher_dir)
    rewritten = tmp_path / "rewritten"
    shutil.copytree(teacher_dir, rewritten)
    weights = rewritten / WEIGHTS
    before = weights.stat()
    weights.write_bytes(weights.read_bytes())
    # A second on, whatever the file system's timestamp granularity: the write moved the mtime.
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    assert checkpoint_fingerprint(rewritten) != stat
    assert checkpoint_fingerprint(rewritten, strict=True) == strict


def test_strict_mode_sees_one_weight_value(teacher_dir, tmp_path):
    stat, strict = both(teacher_dir)
    changed = tmp_path / "changed"
    shutil.copytree(teacher_dir, changed)
    name = sorted(load_file(changed / WEIGHTS))[0]

    def bump(tensors: dict) -> dict:
        tensor = tensors[name].clone()
        tensor.view(-1)[0] += 1.0
        return {**tensors, name: tensor}

    rewrite_tensors(changed / WEIGHTS, bump)
    write_manifest(changed)
    assert checkpoint_fingerprint(changed, strict=True) != strict
    assert checkpoint_fingerprint(changed) == stat  # same header, size and mtime: the default mode cannot tell


def test_the_default_mode_never_reads_the_tensor_data(teacher_dir, tmp_path):
    # A published-style folder (no manifest) whose tensor data is garbage of the same length, its mtime restored.
    published = tmp_path / "published"
    shutil.copytree(teacher_dir, published)
    (published / MANIFEST_FILE).unlink()
    stat, strict = both(published)
    weights = published / WEIGHTS
    before = weights.stat()
    with open(weights, "r+b") as handle:
        start = 8 + struct.unpack("<Q", handle.read(8))[0]
        handle.seek(start)
        handle.write(b"\xff" * (before.st_size - start))
    os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert checkpoint_fingerprint(published) == stat
    assert checkpoint_fingerprint(published, strict=True) != strict


def test_the_manifest_is_still_checked_and_bad_folders_are_named(teacher_dir, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(teacher_dir, tampered)
    (tampered / "config.json").write_text((tampered / "config.json").read_text().replace("}", " }", 1))
    with pytest.raises(ManifestError, match="config.json"):
        checkpoint_fingerprint(tampered)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"{empty}: no \\*.safetensors"):
        checkpoint_fingerprint(empty)
    fake = tmp_path / "fake"
    shutil.copytree(teacher_dir, fake)
    (fake / MANIFEST_FILE).unlink()
    (fake / WEIGHTS).write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match=f"{fake / WEIGHTS}: not a safetensors file"):
        checkpoint_fingerprint(fake)
    header = safetensors_header(teacher_dir / WEIGHTS)
    assert "__metadata__" in header and all("data_offsets" in v for k, v in header.items() if k != "__metadata__")


def test_strict_hash_flag_is_the_run_strict_hash_override():
    recipe = "recipes/quickstart.yaml"
    for verb in ("run", "trajectories"):
        args = parse_args([verb, recipe, "--strict-hash", "run.seed=3"])
        assert args.strict_hash and args.overrides == ["run.seed=3"]
        assert _load(args).run.strict_hash is True
    assert _load(parse_args(["run", recipe])).run.strict_hash is False
    with pytest.raises(SystemExit):
        parse_args(["validate", recipe, "--strict-hash"])
