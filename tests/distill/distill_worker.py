"""Runs d3LLM distillation phases (`distill.distill`) on a tiny teacher for the DeepSpeed tests, under torchrun.

`torchrun --nproc_per_node 2 -m tests.distill.distill_worker --teacher T --out O ...` builds tiny trajectory
records itself and, in one process group:
- `--combos zero1-full zero3-lora ...`: one phase per combination of ZeRO stage (the shipped profile; for ZeRO-3
  with `stage3_param_persistence_threshold: 0`, so even the tiny model's parameters are really partitioned) and
  student kind, `--max-steps` steps each, in `O/<combo>`. It checks that no teacher weights are loaded (a
  trajectory run needs no teacher forward), that under ZeRO-3 `load_student` builds the student already
  partitioned (each rank holds its share of every parameter before DeepSpeed's engine exists, and the gathered
  weights equal the checkpoint's), and that after the engine is built the student is partitioned under ZeRO-3.
  Writes `result-<combo>-rank<r>.json` (summary, those checks) and `full-<combo>.pt` (rank 0's gathered
  weights); the student is saved in `O/<combo>/student` and the resolved recipe in `O/<combo>/recipe.yaml`, so
  `O/<combo>` is a run directory `distill export` reads.
- `--nan-on-rank R`: a phase `O/nan` (ZeRO-2, checkpoint every 2 steps) whose loss is NaN at step 3 on rank R
  only; writes `result-nan-rank<r>.json` with the `TrainingDiverged` message of each rank.
- `--resumable NAME`: one resumable phase `O/NAME` (ZeRO-2 with CPU optimizer offload, LoRA, a checkpoint every step,
  constant learning rate) of `RESUMABLE_STEPS` steps; `--step-delay` seconds of sleep per micro-batch give a test
  time to kill it. Writes `full-NAME.pt` and `result-NAME-rank<r>.json` when it finishes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import deepspeed  # noqa: E402

from distill.distill import build_distillation, save_student  # noqa: E402
from distill.recipe import Recipe, dump_recipe, load_deepspeed_file, validate_tree  # noqa: E402
from distill.trainer import build_deepspeed_config, init_distributed  # noqa: E402
from students.build import load_student  # noqa: E402
from teachers.interface import load_teacher  # noqa: E402
from tests.distill.trainer_worker import divergence_message, nan_at_call  # noqa: E402

CANVAS = 8
RESUMABLE_STEPS = 6
COMBOS = [f"zero{stage}-{kind}" for kind in ("full", "lora") for stage in (1, 2, 3)]


def worker_command(teacher_dir: Path, out: Path, *args: str) -> list[str]:
    """The torchrun command (two ranks) that runs this worker with `args`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    return command + ["-m", "tests.distill.distill_worker", "--teacher", str(teacher_dir), "--out", str(out), *args]


def trajectory_records(teacher_dir: Path, count: int = 8) -> list[dict]:
    """Trajectory records of `count` additions: reference answers pad-filled to the canvas, left-to-right order."""
    teacher = load_teacher(None, teacher_dir)
    records = []
    for index in range(count):
        answer = teacher.encode_response(str(2 * index))
        records.append(
            {
                "sample_id": f"s{index}",
                "prompt_ids": teacher.encode_prompt(f"{index}+{index}=").ids,
                "target_ids": answer + [teacher.pad_token_id] * (CANVAS - len(answer)),
                "order": list(range(CANVAS)),
            }
        )
    return records


def distill_recipe(teacher_dir: Path, out: Path, kind: str, train: dict) -> Recipe:
    return validate_tree(
        {
            "run": {"name": "worker", "output_dir": str(out)},
            "teacher": {"path": str(teacher_dir)},
            "data": {"tasks": [{"name": "addition"}], "max_response_tokens": CANVAS},
            "student": {"kind": kind, "lora": {"r": 4, "alpha": 8}},
            "distill": {"curriculum": {"windows": [4, 8]}},
            "train": {"micro_batch_size": 2, "lr": 1e-2, "lr_schedule": "constant", "log_every": 1, **train},
            "logging": {"wandb": {"mode": "disabled"}, "progress": False},
        }
    )


def zero_profile(stage: int) -> str | dict:
    if stage < 3:
        return f"zero{stage}"
    profile = load_deepspeed_file("zero3")
    profile["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    return profile


def built_partitioned(recipe: Recipe, teacher_dir: Path, checkpoint: dict[str, torch.Tensor]) -> dict:
    """`load_student` under the recipe's ZeRO-3 config, before any engine: whether every parameter was created
    partitioned (this rank holds fewer elements than the parameter has), and whether gathered they equal the
    checkpoint's weights (one parameter at a time, as a 7B model would need)."""
    init_distributed()
    interface = load_teacher(None, teacher_dir, weights=False)
    student = load_student(interface, teacher_dir, recipe.student, "fp32", build_deepspeed_config(recipe.train))
    parameters = dict(student.named_parameters())
    # LoRA adapters (a fraction of a percent of a 7B model) are created by peft after the weights, whole; the
    # engine partitions them. Every weight read from the checkpoint must be partitioned from the start.
    partitioned = all(
        hasattr(parameter, "ds_id") and parameter.ds_tensor.numel() < parameter.ds_numel and parameter.numel() == 0
        for name, parameter in parameters.items()
        if "lora_" not in name
    )
    equal = True
    for name, parameter in parameters.items():
        with deepspeed.zero.GatheredParameters([parameter]):
            key = name.replace("base_model.model.", "").replace(".base_layer", "")
            if key in checkpoint:
                equal &= torch.equal(parameter.data, checkpoint[key])
    return {"partitioned": partitioned, "equal_to_checkpoint": equal, "parameters": len(parameters)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--combos", nargs="*", default=[])
    parser.add_argument("--max-steps", type=int, default=2)
    parser.add_argument("--nan-on-rank", type=int, default=None)
    parser.add_argument("--resumable", default=None)
    parser.add_argument("--step-delay", type=float, default=0.0)
    args = parser.parse_args()
    rank = int(os.environ.get("RANK", "0"))
    records = trajectory_records(args.teacher)
    checkpoint_teacher = load_teacher(None, args.teacher).model.state_dict()

    for combo in args.combos:
        stage, kind = int(combo.split("-")[0].removeprefix("zero")), combo.split("-")[1]
        recipe = distill_recipe(
            args.teacher, args.out / combo, kind, {"max_steps": args.max_steps, "deepspeed": zero_profile(stage)}
        )
        built = built_partitioned(recipe, args.teacher, checkpoint_teacher) if stage == 3 else None
        teacher, trainer = build_distillation(recipe, args.teacher, records, args.out / combo)
        if rank == 0:
            (args.out / combo / "recipe.yaml").write_text(dump_recipe(recipe))
        student_partitioned = any(
            hasattr(parameter, "ds_tensor") and parameter.ds_tensor.numel() < parameter.ds_numel
            for parameter in trainer.model.parameters()
        )
        summary = trainer.train()
        full = trainer.full_state_dict()
        if full is not None:
            torch.save(full, args.out / f"full-{combo}.pt")
        save_student(recipe, teacher, trainer, args.out / combo, args.teacher)
        result = {
            "world_size": trainer.world_size,
            "summary": summary,
            "teacher_weights_loaded": teacher.model is not None,
            "built_partitioned": built,
            "student_partitioned": student_partitioned,
        }
        (args.out / f"result-{combo}-rank{rank}.json").write_text(json.dumps(result) + "\n")

    if args.nan_on_rank is not None:
        train = {"max_steps": 4, "zero_stage": 2, "checkpoint_every": 2}
        recipe = distill_recipe(args.teacher, args.out, "full", train)
        _, trainer = build_distillation(recipe, args.teacher, records, args.out / "nan")
        if rank == args.nan_on_rank:
            trainer.loss_fn = nan_at_call(trainer.loss_fn, 3)
        message = divergence_message(trainer)
        (args.out / f"result-nan-rank{rank}.json").write_text(json.dumps({"error": message}) + "\n")

    if args.resumable is not None:
        train = {"max_steps": RESUMABLE_STEPS, "deepspeed": "zero2_offload", "checkpoint_every": 1}
        recipe = distill_recipe(args.teacher, args.out, "lora", train)
        _, trainer = build_distillation(recipe, args.teacher, records, args.out / args.resumable)
        batch_fn = trainer.batch_fn

        def slow_batch(index: int) -> dict:
            time.sleep(args.step_delay)
            return batch_fn(index)

        trainer.batch_fn = slow_batch
        summary = trainer.train()
        full = trainer.full_state_dict()
        if full is not None:
            torch.save(full, args.out / f"full-{args.resumable}.pt")
        (args.out / f"result-{args.resumable}-rank{rank}.json").write_text(json.dumps({"summary": summary}) + "\n")


if __name__ == "__main__":
    main()
