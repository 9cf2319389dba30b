"""The distillation phase on real DeepSpeed (CPU, gloo): ZeRO 1-3 x full/LoRA students at two ranks (built under
zero.Init for ZeRO-3, no teacher weights loaded), NaN guard, SIGKILL then resume, and SDTT runs whose resume lands
in the right round.

Two-rank runs start `torchrun` on `distill_worker.py` (one invocation, the session fixture `two_ranks` in conftest.py,
runs every ZeRO stage x student kind, the NaN phase and the uninterrupted reference of the resume test); SDTT runs
happen in the pytest process (a world of one).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel

from distill.distill import SDTT_ROUNDS_DIR, distill_student, prune_stale_rounds
from distill.recipe import validate_tree
from distill.trainer import checkpoint_tag, list_checkpoints
from teachers.interface import load_teacher
from teachers.manifest import write_manifest
from tests.distill.distill_worker import COMBOS, RESUMABLE_STEPS, worker_command
from tests.launch import REPO, child_env, run_launched


def run_workers(command: list[str], out: Path) -> None:
    run_launched(command, out, timeout=600)


def losses(phase_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (phase_dir / "metrics.jsonl").read_text().splitlines()]


def max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max((first[name].float() - second[name].float()).abs().max().item() for name in first)


# ----------------------------------------------------------------------------------------------------------------
# Two ranks, ZeRO 1-3


@pytest.mark.parametrize("combo", COMBOS)
def test_two_ranks_distill_each_zero_stage_and_student_kind(combo, two_ranks, teacher_dir):
    stage, kind = int(combo[4]), combo.split("-")[1]
    for rank in (0, 1):
        result = json.loads((two_ranks / f"result-{combo}-rank{rank}.json").read_text())
        assert result["world_size"] == 2 and result["summary"]["step"] == 2
        # A trajectory run loads no teacher weights (no teacher forward); the student comes from the checkpoint.
        assert result["teacher_weights_loaded"] is False
        assert result["student_partitioned"] is (stage == 3)
        if stage == 3:
            # Built under zero.Init: every parameter partitioned from creation, and equal to the checkpoint.
            assert result["built_partitioned"]["partitioned"] is True
            assert result["built_partitioned"]["equal_to_checkpoint"] is True
            assert result["built_partitioned"]["parameters"] > 0
    values = losses(two_ranks / combo / "distill")
    assert len(values) == 2 and all(math.isfinite(value) for value in values)
    same_kind = f"zero1-{kind}"
    assert values == pytest.approx(losses(two_ranks / same_kind / "distill"), abs=1e-5)
    full = torch.load(two_ranks / f"full-{combo}.pt")
    assert max_difference(full, torch.load(two_ranks / f"full-{same_kind}.pt")) < 1e-5
    student = AutoModel.from_pretrained(two_ranks / combo / "student")
    teacher = load_teacher(None, teacher_dir).model
    assert student.state_dict().keys() == teacher.state_dict().keys()  # LoRA merged into plain weights
    assert any(not torch.equal(value, teacher.state_dict()[name]) for name, value in student.state_dict().items())


def test_two_ranks_nan_in_a_distillation_loss_stops_every_rank(two_ranks):
    for rank in (0, 1):
        error = json.loads((two_ranks / f"result-nan-rank{rank}.json").read_text())["error"]
        assert error is not None and "loss is nan at step 3" in error and checkpoint_tag(2) in error
    steps = [(step, complete) for step, _, complete in list_checkpoints(two_ranks / "nan" / "distill" / "checkpoints")]
    assert steps == [(2, True)]


def test_sigkill_mid_distillation_then_resume_reproduces_the_uninterrupted_run(two_ranks, teacher_dir, tmp_path):
    command = worker_command(teacher_dir, tmp_path, "--resumable", "killed")
    checkpoints = tmp_path / "killed" / "distill" / "checkpoints"
    # A second per micro-batch leaves several seconds between the step-2 checkpoint and the end of the run.
    workers = subprocess.Popen(
        command + ["--step-delay", "1.0"],
        cwd=REPO,
        env=child_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while not (checkpoints / checkpoint_tag(2) / "COMPLETE").is_file():
            assert workers.poll() is None and time.monotonic() < deadline, "the run ended before its step-2 checkpoint"
            time.sleep(0.1)
    finally:
        os.killpg(workers.pid, signal.SIGKILL)  # the launcher and both ranks, mid-run
        workers.wait()
    assert not (checkpoints / checkpoint_tag(RESUMABLE_STEPS)).exists()

    run_workers(command, tmp_path)
    for rank in (0, 1):
        summary = json.loads((tmp_path / f"result-killed-rank{rank}.json").read_text())["summary"]
        assert summary["resumed_from"] >= 2 and summary["step"] == RESUMABLE_STEPS
    resumed, reference = torch.load(tmp_path / "full-killed.pt"), torch.load(two_ranks / "full-reference.pt")
    assert max_difference(resumed, reference) <= 1e-6
    assert losses(tmp_path / "killed" / "distill") == pytest.approx(losses(two_ranks / "reference" / "distill"))


# ----------------------------------------------------------------------------------------------------------------
# SDTT through the real trainer (one rank)


def task_records(count: int = 8) -> list[dict]:
    return [
        {"id": f"a{index}", "task": "addition", "prompt": f"{index}+{index}=", "response": str(2 * index)}
        for index in range(count)
    ]


def sdtt_recipe(teacher_dir: Path, out: Path, kind: str = "full", **train):
    return validate_tree(
        {
            "run": {"name": "sdtt", "output_dir": str(out)},
            "teacher": {"path": str(teacher_dir)},
            "data": {"tasks": [{"name": "addition"}], "max_response_tokens": 8},
            "student": {"kind": kind, "lora": {"r": 4, "alpha": 8}},
            # Round r's teacher takes 8 / 2**r steps; a new round every optimizer step, the last one holding.
            "targets": {"teacher_steps": 8, "rounds": 2, "steps_per_round": 1},
            "distill": {"losses": [{"kind": "sdtt"}]},
            "train": {"micro_batch_size": 2, "lr": 1e-2, "lr_schedule": "constant", "log_every": 1, **train},
            "logging": {"wandb": {"mode": "disabled"}, "progress": False},
        }
    )


def metrics(phase_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (phase_dir / "metrics.jsonl").read_text().splitlines()]


def test_sdtt_distillation_crosses_a_round_boundary_and_resumes_in_its_round(teacher_dir, tmp_path):
    records = task_records()
    whole = tmp_path / "whole"
    distill_student(sdtt_recipe(teacher_dir, whole, max_steps=3), teacher_dir, records, whole)
    lines = metrics(whole / "distill")
    assert [line["sdtt_round"] for line in lines] == [0, 1, 1]
    assert [line["sdtt_teacher_steps"] for line in lines] == [8, 4, 4]
    assert all(math.isfinite(line["sdtt"]) for line in lines)
    saved_round = json.loads((whole / "distill" / SDTT_ROUNDS_DIR / "round-01" / "round.json").read_text())
    assert saved_round["first_step"] == 1 and saved_round["teacher_steps"] == 4

    # Stopped after step 2, then resumed at step 3: past round 1's first step, so its saved teacher must be loaded
    # (copying the student of step 2 instead would change the targets and the weights).
    split = tmp_path / "split"
    distill_student(sdtt_recipe(teacher_dir, split, max_steps=2, checkpoint_every=1), teacher_dir, records, split)
    recipe = sdtt_recipe(teacher_dir, split, max_steps=3, checkpoint_every=1)
    distill_student(recipe, teacher_dir, records, split)
    assert [line["sdtt_round"] for line in metrics(split / "distill")] == [0, 1, 1]
    assert (
        max_difference(
            load_file(split / "student" / "model.safetensors"), load_file(whole / "student" / "model.safetensors")
        )
        <= 1e-6
    )


def test_sdtt_with_a_lora_student_hands_the_merged_student_to_the_next_round(teacher_dir, tmp_path):
    distill_student(sdtt_recipe(teacher_dir, tmp_path, "lora", max_steps=2), teacher_dir, task_records(), tmp_path)
    round_teacher = AutoModel.from_pretrained(tmp_path / "distill" / SDTT_ROUNDS_DIR / "round-01")
    initial = load_teacher(None, teacher_dir).model.state_dict()
    assert round_teacher.state_dict().keys() == initial.keys()
    assert any(not torch.equal(value, initial[name]) for name, value in round_teacher.state_dict().items())
    assert [line["sdtt_round"] for line in metrics(tmp_path / "distill")] == [0, 1]


def test_stale_round_teachers_are_pruned_before_a_run(tmp_path):
    rounds, checkpoints = tmp_path / "rounds", tmp_path / "checkpoints"
    for index in (1, 2, 3):
        (rounds / f"round-{index:02d}").mkdir(parents=True)
        (rounds / f"round-{index:02d}" / "round.json").write_text(json.dumps({"first_step": 10 * index}))
    (rounds / "round-04").mkdir()  # an interrupted save
    (checkpoints / checkpoint_tag(20)).mkdir(parents=True)
    write_manifest(checkpoints / checkpoint_tag(20))  # an (empty) intact checkpoint of step 20
    (checkpoints / checkpoint_tag(20) / "COMPLETE").write_text(json.dumps({"world_size": 1}))
    prune_stale_rounds(rounds, checkpoints, "auto")
    assert sorted(path.name for path in rounds.iterdir()) == ["round-01", "round-02"]
    prune_stale_rounds(rounds, checkpoints, "never")
    assert not any(rounds.iterdir())
