"""Hostile and unlucky runs: an export aimed at a run directory, an export killed or failing half-way, `distill
verify` of code fewstep did not write, training that diverges, and decoding a model whose logits are NaN.

Each refusal is checked as in `test_loading.py` (`assert_refused`): the exit code, one `distill:` line naming
the file or the step, no traceback, and the directory concerned byte for byte as it was. The runs are the
two-rank ZeRO runs of `tests/distill/conftest.py` (`two_ranks`) and small `distill run`s of the shared tiny
teacher that diverge on purpose.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

import distill.distill
from distill.cli import main
from distill.consolidate import consolidate
from distill.decoding import decode
from distill.export import EXPORT_DIR, export_run
from distill.recipe import DecoderConfig
from distill.trainer import WEIGHT_LIMIT, checkpoint_tag, list_checkpoints
from distill.trajectories import SET_DIR
from distill.verify import untrusted_code
from teachers.backbones import diffusion_generation
from teachers.backbones.diffusion_generation import DECODER_NAMES, DecodingError
from teachers.interface import load_teacher, save_teacher
from tests.distill.conftest import teacher_dir, two_ranks  # noqa: F401  (the shared session fixtures)
from tests.distill.test_export import copy_run
from tests.distill.trainer_worker import nan_at_call
from tests.launch import REPO, child_env
from tests.reliability.checks import assert_refused, tree_digest

COMBO = "zero2-full"


def export(run: Path, out: Path, *flags: str) -> int:
    return main(["export", str(run), "--out", str(out), "--no-verify", *flags])


@pytest.fixture(scope="module")
def exported(two_ranks, tmp_path_factory) -> Path:  # noqa: F811
    return export_run(two_ranks / COMBO, tmp_path_factory.mktemp("exported") / "export", verify=False)


def copy_export(exported: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(exported, tmp_path / "export"))


# ----------------------------------------------------------------------------------------------------------------
# distill export: never over a run


def test_export_over_its_own_run_with_overwrite_is_refused(two_ranks, tmp_path, capsys):  # noqa: F811
    run = copy_run(two_ranks, COMBO, tmp_path)
    before = tree_digest(run)
    code = export(run, run, "--overwrite")
    err = capsys.readouterr().err
    assert_refused(code, err, run, run, before, expected=2)
    assert "is the run directory" in err


@pytest.mark.parametrize("inside", ["distill", "student", "distill/checkpoints", "new/folder"])
def test_export_inside_a_run_is_refused(two_ranks, tmp_path, capsys, inside):  # noqa: F811
    run = copy_run(two_ranks, COMBO, tmp_path)
    before = tree_digest(run)
    code = export(run, run / inside, "--overwrite")
    err = capsys.readouterr().err
    assert_refused(code, err, run / inside, run, before, expected=2)
    assert "inside the run directory" in err and str(run / EXPORT_DIR) in err


def test_export_over_the_folder_that_holds_the_run_is_refused(two_ranks, tmp_path, capsys):  # noqa: F811
    run = copy_run(two_ranks, COMBO, tmp_path)
    before = tree_digest(tmp_path)
    code = export(run, tmp_path, "--overwrite")
    err = capsys.readouterr().err
    assert_refused(code, err, tmp_path, tmp_path, before, expected=2)
    assert "holds the run directory" in err


def test_export_over_another_run_or_a_folder_holding_one_is_refused(two_ranks, tmp_path, capsys):  # noqa: F811
    run = copy_run(two_ranks, COMBO, tmp_path)
    other = Path(shutil.copytree(two_ranks / "zero3-full", tmp_path / "archive" / "old" / "zero3-full"))
    before = tree_digest(tmp_path / "archive")
    for out, why in ((other, "is the run directory"), (tmp_path / "archive", f"holds the run directory {other}")):
        code = export(run, out, "--overwrite")
        err = capsys.readouterr().err
        assert_refused(code, err, out, tmp_path / "archive", before, expected=2)
        assert why in err


def test_export_into_the_runs_own_export_folder_is_allowed_and_replaces_only_it(two_ranks, tmp_path, capsys):  # noqa: F811
    run = copy_run(two_ranks, COMBO, tmp_path)
    assert export(run, run / EXPORT_DIR) == 0
    before = tree_digest(run / "distill")
    assert export(run, run / EXPORT_DIR, "--overwrite") == 0
    assert tree_digest(run / "distill") == before and (run / EXPORT_DIR / "export.json").is_file()
    assert sorted(path.name for path in run.iterdir()) == ["distill", EXPORT_DIR, "recipe.yaml", "student"]


# ----------------------------------------------------------------------------------------------------------------
# distill export: interrupted or failing half-way leaves nothing behind


def wait_for(condition, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"exited early: {process.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("sent", [signal.SIGTERM, signal.SIGINT])
def test_export_killed_during_verification_removes_its_staging_folder(two_ranks, tmp_path, sent):  # noqa: F811
    out = tmp_path / "exports" / "export"
    out.mkdir(parents=True)
    (out / "earlier.txt").write_text("the export being replaced")
    scratch = tmp_path / "scratch"  # the verification process's temporary folder
    scratch.mkdir()
    command = [sys.executable, "-m", "distill.cli", "export", str(two_ranks / COMBO), "--out", str(out), "--overwrite"]
    env = child_env(tmp_path) | {"TMPDIR": str(scratch)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # export.json is written last: the folder is whole and its verification process is starting.
        wait_for(lambda: any(out.parent.glob(".export-*/export/export.json")), process)
        process.send_signal(sent)
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + sent, err
    assert err.strip() == f"distill: export interrupted by {sent.name}", err
    assert sorted(path.name for path in out.parent.iterdir()) == ["export"]  # no staging folder
    assert [path.name for path in out.iterdir()] == ["earlier.txt"] and not any(scratch.iterdir())


def test_export_that_fails_while_writing_removes_its_staging_folder(two_ranks, tmp_path, capsys, monkeypatch):  # noqa: F811
    def disk_full(folder, *args):
        (folder / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device", str(folder / "model.safetensors"))

    monkeypatch.setattr("distill.export.write_folder", disk_full)
    out = tmp_path / "exports" / "export"
    code = export(two_ranks / COMBO, out)
    err = capsys.readouterr().err
    assert_refused(code, err, "model.safetensors", None, None)
    assert "No space left on device" in err and list((tmp_path / "exports").iterdir()) == []


def test_export_stopped_while_swapping_folders_puts_the_earlier_export_back(
    two_ranks,  # noqa: F811
    tmp_path,
    capsys,
    monkeypatch,
):
    out = tmp_path / "export"
    assert export(two_ranks / COMBO, out) == 0
    before = tree_digest(out)

    def stopped_after_moving_the_old_one_aside(folder, out, overwrite):
        out.rename(folder.parent / "replaced")
        raise KeyboardInterrupt

    monkeypatch.setattr("distill.export._move_into_place", stopped_after_moving_the_old_one_aside)
    capsys.readouterr()
    assert export(two_ranks / COMBO, out, "--overwrite") == 130
    assert capsys.readouterr().err.strip() == "distill: export interrupted by SIGINT"
    assert tree_digest(out) == before and sorted(path.name for path in tmp_path.iterdir()) == ["export"]


# ----------------------------------------------------------------------------------------------------------------
# distill verify: only fewstep's own code runs without --trust-remote-code


def planted_code(marker: Path) -> str:
    """Python that creates `marker` when it is imported."""
    return f"\nfrom pathlib import Path as _Path\n_Path({str(marker)!r}).write_text('ran')\n"


def test_a_fewstep_export_needs_no_opt_in(exported):
    assert untrusted_code(exported) is None


def test_verify_refuses_a_folder_without_fewsteps_provenance(exported, tmp_path, capsys):
    folder = copy_export(exported, tmp_path)
    provenance = folder / "export.json"
    provenance.unlink()
    before = tree_digest(folder)
    code = main(["verify", str(folder)])
    err = capsys.readouterr().err
    assert_refused(code, err, provenance, folder, before, expected=2)
    assert "--trust-remote-code" in err

    provenance.write_text('{"format": 1}')
    before = tree_digest(folder)
    code = main(["verify", str(folder)])
    err = capsys.readouterr().err
    assert_refused(code, err, provenance, folder, before, expected=2)
    assert "not fewstep's provenance (no fewstep, run_dir" in err


def test_verify_refuses_edited_modeling_code_before_running_it(exported, tmp_path, capsys):
    folder, marker = copy_export(exported, tmp_path), tmp_path / "ran"
    modeling = folder / "modeling_dream.py"
    modeling.write_text(modeling.read_text() + planted_code(marker))
    before = tree_digest(folder)
    code = main(["verify", str(folder)])
    err = capsys.readouterr().err
    assert_refused(code, err, modeling, folder, before, expected=2)
    assert "differs from fewstep's teachers/backbones/modeling_dream.py" in err and not marker.exists()

    # With the opt-in the trust check is passed; the manifest (step 1) still names the edited file.
    code = main(["verify", str(folder), "--trust-remote-code"])
    err = capsys.readouterr().err
    assert code == 1 and "--trust-remote-code" not in err and str(modeling) in err


def test_verify_refuses_a_python_file_fewstep_does_not_ship(exported, tmp_path, capsys):
    folder, marker = copy_export(exported, tmp_path), tmp_path / "ran"
    extra = folder / "sitecustomize.py"
    extra.write_text(planted_code(marker))
    before = tree_digest(folder)
    code = main(["verify", str(folder)])
    err = capsys.readouterr().err
    assert_refused(code, err, extra, folder, before, expected=2)
    assert "not one of fewstep's files" in err and not marker.exists()


def test_verify_refuses_an_auto_map_that_names_another_repository(exported, tmp_path, capsys):
    folder = copy_export(exported, tmp_path)
    config = folder / "config.json"
    config.write_text(config.read_text().replace('"modeling_dream.', '"someone/repo--modeling_dream.'))
    before = tree_digest(folder)
    code = main(["verify", str(folder)])
    err = capsys.readouterr().err
    assert_refused(code, err, config, folder, before, expected=2)
    assert "auto_map names code from another repository" in err


# ----------------------------------------------------------------------------------------------------------------
# distill run: divergence stops before a checkpoint, in one line


def diverging_run(tmp_path: Path, teacher: Path, lr: float) -> Path:
    """A recipe: trajectories of 8 prompts, then 6 distillation steps at `lr`, a checkpoint after each."""
    tree = {
        "run": {"name": "diverge", "output_dir": str(tmp_path / "run"), "stages": ["trajectories", "distill"]},
        "teacher": {"path": str(teacher)},
        "data": {"max_response_tokens": 24, "tasks": [{"name": "addition", "train_size": 8, "eval_size": 2}]},
        "trajectories": {"block_length": 8, "batch_size": 8, "shards": 1, "temperatures": [0.0], "keep": "all"},
        "distill": {"curriculum": {"windows": [8, 24]}},
        "train": {
            "max_steps": 6,
            "micro_batch_size": 4,
            "lr": lr,
            "lr_schedule": "constant",
            "checkpoint_every": 1,
            "log_every": 1,
            "deepspeed": "zero2",
        },
        "logging": {"progress": False, "wandb": {"mode": "disabled"}},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def checkpoints_of(run: Path) -> list[int]:
    return [step for step, _, complete in list_checkpoints(run / "distill" / "checkpoints") if complete]


def test_weights_blown_up_by_the_first_update_stop_the_run_before_any_checkpoint(teacher_dir, tmp_path, capsys):  # noqa: F811
    recipe = diverging_run(tmp_path, teacher_dir, lr=1e30)  # AdamW moves each weight by about lr: 1e30 weights
    code = main(["run", str(recipe)])
    err = capsys.readouterr().err
    assert_refused(code, err, "weights diverged at step 1", None, None)
    assert "largest |w| 1e+30" in err and "left intact: none saved yet" in err
    assert checkpoints_of(tmp_path / "run") == []


def test_weights_that_grow_past_the_limit_name_the_last_finite_checkpoint(teacher_dir, tmp_path, capsys):  # noqa: F811
    recipe = diverging_run(tmp_path, teacher_dir, lr=5e5)  # a few steps to pass WEIGHT_LIMIT
    code = main(["run", str(recipe)])
    err = capsys.readouterr().err
    step = int(re.search(r"weights diverged at step (\d+)", err).group(1))
    last = tmp_path / "run" / "distill" / "checkpoints" / checkpoint_tag(step - 1)
    assert_refused(code, err, f"left intact: {last} (step {step - 1})", None, None)
    assert step >= 2 and checkpoints_of(tmp_path / "run") == list(range(max(1, step - 2), step))
    weights, _ = consolidate(last)
    assert all(tensor.isfinite().all() and tensor.abs().max() <= WEIGHT_LIMIT for tensor in weights.values())


def test_a_nan_loss_is_one_line_naming_the_step_and_the_last_checkpoint(teacher_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    original = distill.distill.distillation_loss
    monkeypatch.setattr(distill.distill, "distillation_loss", lambda *args: nan_at_call(original(*args), 3))
    recipe = diverging_run(tmp_path, teacher_dir, lr=1e-2)
    code = main(["run", str(recipe)])
    err = capsys.readouterr().err
    last = tmp_path / "run" / "distill" / "checkpoints" / checkpoint_tag(2)
    assert_refused(code, err, f"left intact: {last} (step 2)", None, None)
    assert "loss is nan at step 3" in err and checkpoints_of(tmp_path / "run") == [1, 2]


# ----------------------------------------------------------------------------------------------------------------
# Decoding: bounded by the canvas, NaN logits an error


@pytest.fixture(scope="module")
def nan_teacher(teacher_dir, tmp_path_factory) -> Path:  # noqa: F811
    """The tiny teacher with one NaN in its last norm: every logit is NaN, as after a diverged update."""
    teacher = load_teacher(None, teacher_dir)
    with torch.no_grad():
        teacher.model.model.norm.weight[0] = torch.nan
    path = tmp_path_factory.mktemp("nan_teacher") / "teacher"
    save_teacher(teacher, path)
    return path


@pytest.mark.parametrize("decoder", DECODER_NAMES)
def test_every_decoder_stops_on_nan_logits_at_the_first_step(nan_teacher, decoder):
    teacher = load_teacher(None, nan_teacher)
    config = DecoderConfig(name=decoder, block_length=8, threshold=None if decoder == "low_confidence" else 0.9)
    began = time.perf_counter()
    with pytest.raises(DecodingError, match=r"^decoding: the model's logits are NaN or infinite at step 1 \(of"):
        decode(teacher, [teacher.encode_prompt("12+34=").ids], config, 24)
    assert time.perf_counter() - began < 30


def test_diffusion_generate_stops_on_nan_logits_instead_of_committing_the_mask(nan_teacher):
    teacher = load_teacher(None, nan_teacher)
    ids = torch.tensor([teacher.encode_prompt("12+34=").ids])
    with pytest.raises(DecodingError, match="NaN or infinite at step 1 "):
        teacher.model.diffusion_generate(ids, gen_length=24, mask_token_id=teacher.mask_token_id)


def test_a_decoder_that_commits_only_the_mask_token_is_stopped_at_once(teacher_dir, monkeypatch):  # noqa: F811
    teacher = load_teacher(None, teacher_dir)

    def commits_the_mask(state, settings):
        return torch.full_like(state.masked, teacher.mask_token_id, dtype=torch.long), state.masked

    monkeypatch.setitem(diffusion_generation.DECODERS, "low_confidence", commits_the_mask)
    with pytest.raises(DecodingError, match="^decoding: decoder 'low_confidence' committed no token at step 1$"):
        decode(teacher, [teacher.encode_prompt("1+1=").ids], DecoderConfig(name="low_confidence"), 24)


def test_trajectories_from_a_nan_teacher_fail_in_one_line_writing_no_set(nan_teacher, tmp_path, capsys):
    recipe = diverging_run(tmp_path, nan_teacher, lr=1e-2)
    code = main(["trajectories", str(recipe)])
    err = capsys.readouterr().err
    assert_refused(code, err, "NaN or infinite at step 1", None, None)
    assert not (tmp_path / "run" / "trajectories" / SET_DIR).exists()
