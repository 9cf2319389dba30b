"""Hostile and unlucky inputs to loading: checkpoints, teachers and exports that are corrupt, cut off, replaced or
carry a pickled call, through the real command line (`distill export`, `distill verify`, a resumed `distill run`).

Every refusal is checked the same way (`assert_refused`): the exit code, one `distill:` line naming the file, no
traceback, the run directory byte for byte as it was, and the payload of a pickled call never run (it would
create a marker file). The run is one real `distill run` (trajectories, then two ZeRO-2 distillation steps with a
checkpoint after each) of the shared tiny teacher; every test damages a copy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from distill.cli import main
from distill.export import export_run
from distill.trainer import checkpoint_tag
from teachers.manifest import MANIFEST_FILE, write_manifest
from tests.distill.conftest import teacher_dir  # noqa: F401  (the shared tiny teacher fixture)
from tests.reliability.checks import assert_refused, tree_digest

STEPS = 2


class PickledCall:
    """Unpickling this runs `os.system(command)`."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def flip_byte(path: Path, offset: int = -17) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x55
    path.write_bytes(bytes(data))


def plant_pickled_call(path: Path, marker: Path) -> None:
    torch.save({"optimizer_state_dict": PickledCall(f"touch {marker}")}, path)


def assert_one_warning(caplog: pytest.LogCaptureFixture, names: Path, err: str) -> None:
    """One warning, one line, naming the damaged file (the CLI prints it as is: logging's last-resort handler)."""
    warnings = [record.getMessage() for record in caplog.records if "ignoring damaged checkpoint" in record.message]
    assert len(warnings) == 1 and str(names) in warnings[0] and "\n" not in warnings[0], warnings
    assert "Traceback" not in err


@pytest.fixture(scope="module")
def run_dir(teacher_dir, tmp_path_factory) -> Path:  # noqa: F811
    root = tmp_path_factory.mktemp("loading")
    tree = {
        "run": {"name": "loading", "output_dir": str(root / "run"), "stages": ["trajectories", "distill"]},
        "teacher": {"path": str(teacher_dir)},
        "data": {
            "max_response_tokens": 24,
            "tasks": [{"name": "addition", "train_size": 8, "eval_size": 2, "max_digits": 3}],
        },
        "trajectories": {"block_length": 8, "batch_size": 8, "shards": 1, "temperatures": [0.0], "keep": "all"},
        "distill": {"curriculum": {"windows": [8, 24]}},
        "train": {
            "max_steps": STEPS,
            "micro_batch_size": 4,
            "lr": 1e-2,
            "checkpoint_every": 1,
            "log_every": 1,
            "deepspeed": "zero2",
        },
        "logging": {"progress": False, "wandb": {"mode": "disabled"}},
    }
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    assert main(["run", str(recipe)]) == 0
    return root / "run"


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory) -> Path:
    return export_run(run_dir, tmp_path_factory.mktemp("exported") / "export", verify=False)


def copy_run(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the run whose recipe.yaml names the copy, so rerunning it rewrites recipe.yaml unchanged."""
    run = Path(shutil.copytree(run_dir, tmp_path / "run"))
    recipe = run / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace(str(run_dir), str(run)))
    return run


def checkpoint(run: Path, step: int) -> Path:
    return run / "distill" / "checkpoints" / checkpoint_tag(step)


def export(run: Path, out: Path, *flags: str) -> int:
    return main(["export", str(run), "--out", str(out), "--no-verify", *flags])


# ----------------------------------------------------------------------------------------------------------------
# distill export: the checkpoint


def test_export_refuses_a_checkpoint_file_that_carries_a_pickled_call(run_dir, tmp_path, capsys):
    run, marker = copy_run(run_dir, tmp_path), tmp_path / "pwned"
    planted = checkpoint(run, STEPS) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    plant_pickled_call(planted, marker)
    before = tree_digest(run)
    code = export(run, tmp_path / "out", "--checkpoint", str(STEPS))
    assert_refused(code, capsys.readouterr().err, planted, run, before)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_export_refuses_a_pickled_call_even_when_the_manifest_was_rewritten_for_it(run_dir, tmp_path, capsys):
    run, marker = copy_run(run_dir, tmp_path), tmp_path / "pwned"
    step = checkpoint(run, STEPS)
    plant_pickled_call(step / "zero_pp_rank_0_mp_rank_00_optim_states.pt", marker)
    write_manifest(step, exclude={"COMPLETE"})  # the manifest now vouches for the planted file
    before = tree_digest(run)
    code = export(run, tmp_path / "out", "--checkpoint", str(STEPS))
    err = capsys.readouterr().err
    assert_refused(code, err, step, run, before)  # weights-only unpickling refuses it
    assert "refused to unpickle" in err and "posix.system" in err and not marker.exists()


def test_export_refuses_a_file_added_to_a_checkpoint(run_dir, tmp_path, capsys):
    # zero_to_fp32 globs the optimizer partitions: an added one would be read, so it is refused.
    run, marker = copy_run(run_dir, tmp_path), tmp_path / "pwned"
    added = checkpoint(run, STEPS) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    plant_pickled_call(added, marker)
    before = tree_digest(run)
    code = export(run, tmp_path / "out", "--checkpoint", str(STEPS))
    err = capsys.readouterr().err
    assert_refused(code, err, added, run, before)
    assert "not listed in" in err and not marker.exists()


def test_export_refuses_a_checkpoint_with_flipped_bytes(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    states = checkpoint(run, STEPS) / "mp_rank_00_model_states.pt"
    flip_byte(states, states.stat().st_size // 2)
    before = tree_digest(run)
    code = export(run, tmp_path / "out", "--checkpoint", str(STEPS))
    err = capsys.readouterr().err
    assert_refused(code, err, states, run, before)
    assert "corrupt or changed since it was written" in err


def test_export_refuses_a_truncated_checkpoint_file(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    rng = checkpoint(run, STEPS) / "rng-rank0000.pt"
    rng.write_bytes(rng.read_bytes()[:100])
    before = tree_digest(run)
    code = export(run, tmp_path / "out", "--checkpoint", str(STEPS))
    err = capsys.readouterr().err
    assert_refused(code, err, rng, run, before)
    assert "truncated or replaced (100 bytes" in err


def test_export_refuses_a_checkpoint_without_its_manifest(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    manifest = checkpoint(run, STEPS) / MANIFEST_FILE
    manifest.unlink()
    before = tree_digest(run)
    code = export(run, tmp_path / "out", "--checkpoint", str(STEPS))
    err = capsys.readouterr().err
    assert_refused(code, err, manifest, run, before)
    assert "missing, so" in err and "was not written by this version of fewstep" in err


def test_export_refuses_a_manifest_that_is_not_one(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    manifest = checkpoint(run, STEPS) / MANIFEST_FILE
    manifest.write_bytes(b"\xff\xfe not json")
    before = tree_digest(run)
    code = export(run, tmp_path / "out", "--checkpoint", str(STEPS))
    assert_refused(code, capsys.readouterr().err, manifest, run, before)


def test_export_of_latest_refuses_when_every_checkpoint_is_damaged(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    for step in (1, STEPS):
        flip_byte(checkpoint(run, step) / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    before = tree_digest(run)
    code = export(run, tmp_path / "out")
    err = capsys.readouterr().err
    newest = checkpoint(run, STEPS) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    assert_refused(code, err, newest, run, before)
    assert "no intact checkpoint is left" in err


def test_export_of_latest_falls_back_past_a_damaged_newest_checkpoint(run_dir, tmp_path, capsys, caplog):
    run, marker = copy_run(run_dir, tmp_path), tmp_path / "pwned"
    planted = checkpoint(run, STEPS) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    plant_pickled_call(planted, marker)
    before = tree_digest(run)
    assert export(run, tmp_path / "out") == 0
    assert_one_warning(caplog, planted, capsys.readouterr().err)
    assert json.loads((tmp_path / "out" / "export.json").read_text())["checkpoint"]["step"] == 1
    assert tree_digest(run) == before and not marker.exists()


# ----------------------------------------------------------------------------------------------------------------
# distill export: the teacher


@pytest.mark.parametrize("damage", ["flipped", "truncated"])
def test_export_refuses_a_damaged_teacher(run_dir, teacher_dir, tmp_path, capsys, damage):  # noqa: F811
    run = copy_run(run_dir, tmp_path)
    teacher = Path(shutil.copytree(teacher_dir, tmp_path / "teacher"))
    recipe = run / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace(str(teacher_dir), str(teacher)))
    weights = teacher / "model.safetensors"
    if damage == "flipped":
        flip_byte(weights)
    else:
        weights.write_bytes(weights.read_bytes()[:-1000])
    before = tree_digest(run)
    code = export(run, tmp_path / "out")
    err = capsys.readouterr().err
    assert_refused(code, err, weights, run, before)
    assert ("corrupt" if damage == "flipped" else "truncated") in err


# ----------------------------------------------------------------------------------------------------------------
# distill verify: the export


def copy_export(exported: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "export"))


def test_verify_refuses_an_export_with_flipped_weights(exported, tmp_path, capsys):
    folder = copy_export(exported, tmp_path)
    weights = folder / "model.safetensors"
    flip_byte(weights)  # in the tensor data: the safetensors header still parses
    before = tree_digest(folder)
    code = main(["verify", str(folder)])
    err = capsys.readouterr().err
    assert_refused(code, err, weights, folder, before)
    assert "corrupt or changed since it was written" in err


def test_verify_refuses_an_export_with_a_changed_tokenizer(exported, tmp_path, capsys):
    folder = copy_export(exported, tmp_path)
    tokenizer = folder / "tokenizer.json"
    tokenizer.write_text(tokenizer.read_text().replace('"<|mask|>"', '"<|MASK|>"'))
    before = tree_digest(folder)
    code = main(["verify", str(folder)])
    assert_refused(code, capsys.readouterr().err, tokenizer, folder, before)


def test_verify_refuses_a_file_added_to_an_export(exported, tmp_path, capsys):
    # A chat template beside the tokenizer would change every prompt the export encodes.
    folder = copy_export(exported, tmp_path)
    added = folder / "chat_template.json"
    added.write_text(json.dumps({"chat_template": "{{ messages }}"}))
    before = tree_digest(folder)
    code = main(["verify", str(folder)])
    err = capsys.readouterr().err
    assert_refused(code, err, added, folder, before)
    assert "not listed in" in err


# ----------------------------------------------------------------------------------------------------------------
# distill run: resuming the distillation phase


def rerun(run: Path) -> int:
    return main(["run", str(run / "recipe.yaml")])


def test_resume_refuses_a_pickled_call_when_no_intact_checkpoint_is_left(run_dir, tmp_path, capsys):
    run, marker = copy_run(run_dir, tmp_path), tmp_path / "pwned"
    for step in (1, STEPS):
        plant_pickled_call(checkpoint(run, step) / "rng-rank0000.pt", marker)
    before = tree_digest(run)
    code = rerun(run)
    err = capsys.readouterr().err
    assert_refused(code, err, checkpoint(run, STEPS) / "rng-rank0000.pt", run, before)
    assert "no intact checkpoint is left" in err and not marker.exists()


def test_resume_refuses_a_pickled_rng_file_under_a_rewritten_manifest(run_dir, tmp_path, capsys):
    run, marker = copy_run(run_dir, tmp_path), tmp_path / "pwned"
    step = checkpoint(run, STEPS)
    plant_pickled_call(step / "rng-rank0000.pt", marker)
    write_manifest(step, exclude={"COMPLETE"})
    before = tree_digest(run)
    code = rerun(run)
    err = capsys.readouterr().err
    assert_refused(code, err, step / "rng-rank0000.pt", run, before)
    assert "refused to unpickle" in err and not marker.exists()


@pytest.mark.parametrize("damage", ["pickled call", "flipped byte", "truncated"])
def test_resume_falls_back_past_a_damaged_newest_checkpoint_and_ends_where_it_would_have(
    run_dir, tmp_path, capsys, caplog, damage
):
    run, marker = copy_run(run_dir, tmp_path), tmp_path / "pwned"
    damaged = checkpoint(run, STEPS) / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    if damage == "pickled call":
        plant_pickled_call(damaged, marker)
    elif damage == "flipped byte":
        flip_byte(damaged)
    else:
        damaged.write_bytes(damaged.read_bytes()[:-4096])
    assert rerun(run) == 0
    assert_one_warning(caplog, damaged, capsys.readouterr().err)
    assert not marker.exists()
    # Step 2 trained again from step 1: the same student, bit for bit, and an intact step-2 checkpoint.
    assert tree_digest(run / "student") == tree_digest(run_dir / "student")
    assert export(run, tmp_path / "out", "--checkpoint", str(STEPS)) == 0
