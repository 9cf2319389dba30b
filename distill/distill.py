"""Distillation of a student from pseudo-trajectories (d3LLM) on the one DeepSpeed trainer.

load the frozen teacher -> load the trajectory set (refused unless its manifest matches) -> build the student
(full copy or LoRA) -> train with the weighted loss terms of `distill.losses` on `TrajectoryBatches` -> save the
student (LoRA merged) beside the teacher's tokenizer, so it loads like any checkpoint.

The teacher here only lends its tokenizer, mask id and logit convention (`Teacher.with_model`): pseudo-trajectory
terms need no teacher forward. It is never given to the student's DeepSpeed engine, so under ZeRO-3 it is not
partitioned with the student.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

from distill.d3llm import Curriculum, TrajectoryBatches
from distill.losses import certainty_forcing_loss, mask_tokens, masked_ce, masked_diffusion_loss
from distill.recipe import LossTerm, Recipe
from distill.trainer import LossFn, Trainer
from students.build import build_student, freeze, merged_model, trainable_parameters
from teachers.interface import Teacher, load_teacher, save_teacher

# Lower bound of t for the `masked_diffusion` regulariser (as in teacher pretraining's default).
MASK_EPS = 1e-3


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def distillation_loss(teacher: Teacher, terms: list[LossTerm]) -> LossFn:
    """The weighted sum of the recipe's loss terms; each term's value is logged under its kind."""
    weights = {term.kind: term for term in terms}

    def loss_fn(model, batch, generator):
        student = teacher.with_model(model)
        targets, attention = batch["targets"], batch["attention_mask"]
        logits = student.forward(batch["input_ids"], attention)
        values: dict[str, torch.Tensor] = {}
        if "trajectory_ce" in weights:
            values["trajectory_ce"] = masked_ce(logits, targets, batch["masked"])
        complement_logits = None
        if "complementary_ce" in weights:
            complement_logits = student.forward(batch["complement_ids"], attention)
            values["complementary_ce"] = masked_ce(complement_logits, targets, batch["complement_masked"])
        if "certainty_forcing" in weights:
            temperature = weights["certainty_forcing"].temperature
            certainty = certainty_forcing_loss(logits, targets, batch["masked"], temperature)
            if complement_logits is not None:
                complement = certainty_forcing_loss(complement_logits, targets, batch["complement_masked"], temperature)
                certainty = certainty + complement
            values["certainty_forcing"] = certainty
        if "masked_diffusion" in weights:
            noisy, masked, t = mask_tokens(targets, batch["canvas_mask"], teacher.mask_token_id, MASK_EPS, generator)
            diffusion_logits = student.forward(noisy, attention)
            values["masked_diffusion"] = masked_diffusion_loss(
                diffusion_logits, targets, masked, t, batch["canvas_mask"], "uniform"
            )
        loss = sum(weights[kind].weight * value for kind, value in values.items())
        metrics = {kind: value.item() for kind, value in values.items()}
        metrics.update(mask_floor=float(batch["floor"]), window=float(batch["window"]))
        return loss, metrics

    return loss_fn


def records_digest(records: list[dict]) -> str:
    """sha256 of what training reads from each trajectory record, in order."""
    digest = hashlib.sha256()
    for record in records:
        digest.update(json.dumps([record["sample_id"], record["target_ids"], record["order"]]).encode())
    return digest.hexdigest()


def distill_student(recipe: Recipe, teacher_dir: Path, records: list[dict], out_dir: Path) -> Path:
    """Train the student on trajectory `records`; returns the saved student directory (`out_dir/student`)."""
    teacher = load_teacher(recipe.teacher.name, teacher_dir, recipe.teacher.dtype)
    freeze(teacher.model)
    student = build_student(teacher, recipe.student)
    trainable, total = trainable_parameters(student)
    if _rank() == 0:
        print(f"[distill] student '{recipe.student.kind}': {trainable:,} of {total:,} parameters train")

    config = recipe.train
    curriculum = recipe.distill.curriculum
    batches = TrajectoryBatches(
        records,
        micro_batch_size=config.micro_batch_size,
        total_batches=config.max_steps * config.gradient_accumulation_steps,
        curriculum=Curriculum(
            floor_start=curriculum.floor_start,
            floor_end=curriculum.floor_end,
            t_max=curriculum.t_max,
            windows=tuple(curriculum.windows),
        ),
        mask_token_id=teacher.mask_token_id,
        pad_token_id=teacher.pad_token_id,
        seed=recipe.run.seed,
        rank=_rank(),
    )
    trainer = Trainer(
        student,
        config,
        out_dir / "distill",
        distillation_loss(teacher, recipe.distill.losses),
        batches.batch,
        run_name=f"{recipe.run.name}-distill",
        logging=recipe.logging,
        seed=recipe.run.seed,
        phase="distill",
        fingerprint=json.dumps(
            {
                # The trajectories themselves (not their path): another teacher gives other orders.
                "trajectories": records_digest(records),
                "student": recipe.student.model_dump(mode="json"),
                "distill": recipe.distill.model_dump(mode="json"),
                "seed": recipe.run.seed,
            },
            sort_keys=True,
        ),
    )
    trainer.train()
    state = trainer.full_state_dict()
    student_dir = out_dir / "student"
    if _rank() == 0:
        student.load_state_dict(state)
        student = merged_model(student)
        student.eval()
        save_teacher(teacher.with_model(student), student_dir)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return student_dir
