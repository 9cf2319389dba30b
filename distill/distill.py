"""Distillation of a student from its teacher on the one DeepSpeed trainer: d3LLM pseudo-trajectories or SDTT.

load the frozen teacher -> build the student (full copy or LoRA) -> the run's batches and loss -> train -> save
the student (LoRA merged) beside the teacher's tokenizer, so it loads like any checkpoint.

`distill.losses` chooses the kind of run:
- trajectory terms (d3LLM): `TrajectoryBatches` built from a trajectory set (the run refuses one whose manifest
  does not match), loss the weighted terms of `distillation_loss`. The teacher only lends its tokenizer, mask id
  and logit convention (`Teacher.with_model`): pseudo-trajectory terms need no teacher forward.
- `sdtt` (alone): the task training sequences (`SequencePool`, as teacher pretraining draws them: prompt,
  reference response, answer padding) with the optimizer `step` added to each batch; the frozen teacher takes two
  decoding steps per student forward (`distill.sdtt`) and `TeacherRounds` copies the student into it at each
  round boundary, saving each round's teacher under `<out_dir>/distill/sdtt-rounds/` so a resume gets the
  teacher of its round back.

The teacher is a separate module that is never passed to `deepspeed.initialize`: only the student enters the
engine, so under ZeRO-3 the student's parameters are partitioned and the teacher's stay ordinary full tensors
on every rank. (SDTT, which copies the student into the teacher, refuses ZeRO-3 in the recipe.)
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import torch
import torch.distributed as dist
from peft import PeftModel

from distill.d3llm import Curriculum, TrajectoryBatches
from distill.data import SequencePool, encode_records
from distill.losses import (
    certainty_forcing_loss,
    loss_start,
    mask_for_diffusion,
    masked_ce,
    masked_diffusion_loss,
    next_token_loss,
)
from distill.pretrain import ar_loss, diffusion_loss
from distill.ranks import current_rank
from distill.recipe import LossTerm, Recipe
from distill.sdtt import SDTT_ROUNDS_DIR, TeacherRounds, sdtt_loss_fn
from distill.trainer import BatchFn, LossFn, Trainer, build_deepspeed_config, latest_complete_checkpoint
from distill.trajectories import data_hash
from students.build import freeze, load_student, merged_model, trainable_parameters
from teachers.fingerprint import checkpoint_fingerprint
from teachers.interface import Teacher, load_teacher, save_teacher
from teachers.vision import vision_of

# Lower bound of t for the `masked_diffusion` regulariser (as in teacher pretraining's default).
MASK_EPS = 1e-3
# Prefix of the keys of a trajectory micro-batch that hold its task rows (`source: task` regularisers).
TASK_PREFIX = "task_"


# ----------------------------------------------------------------------------------------------------------------
# Pseudo-trajectory runs (d3LLM)


def distillation_loss(teacher: Teacher, terms: list[LossTerm]) -> LossFn:
    """The weighted sum of the recipe's loss terms; each term's value is logged under its kind.

    A regulariser with `source: task` is the teacher's own pretraining loss (`pretrain.ar_loss` for `next_token`,
    `pretrain.diffusion_loss` for `masked_diffusion`) on the batch's task rows (`TASK_PREFIX` keys, `with_task_rows`).
    """
    on_task = {term.kind: term for term in terms if term.source == "task"}
    weights = {term.kind: term for term in terms if term.source == "trajectories"}
    task_losses = {
        kind: ar_loss(teacher)
        if kind == "next_token"
        else diffusion_loss(teacher, MASK_EPS, "uniform", 0.0, term.prefix_fraction, term.prefix_block)
        for kind, term in on_task.items()  # TASK_SOURCE_KINDS: the recipe refuses `source: task` on any other kind
    }

    def loss_fn(model, batch, generator):
        student = teacher.with_model(model)
        attention, vision = batch["attention_mask"], vision_of(batch)
        # Every loss position lies on the canvas, the last L columns (left padding): only those are scored.
        start = loss_start(batch["canvas_mask"])
        targets, canvas = batch["targets"][:, start:], batch["canvas_mask"][:, start:]
        masked, complement_masked = batch["masked"][:, start:], batch["complement_masked"][:, start:]
        logits = student.forward(batch["input_ids"], attention, start=start, **vision)
        values: dict[str, torch.Tensor] = {}
        if "trajectory_ce" in weights:
            values["trajectory_ce"] = masked_ce(logits, targets, masked)
        complement_logits = None
        if "complementary_ce" in weights:
            complement_logits = student.forward(batch["complement_ids"], attention, start=start, **vision)
            values["complementary_ce"] = masked_ce(complement_logits, targets, complement_masked)
        if "certainty_forcing" in weights:
            temperature = weights["certainty_forcing"].temperature
            certainty = certainty_forcing_loss(logits, targets, masked, temperature)
            if complement_logits is not None:
                complement = certainty_forcing_loss(complement_logits, targets, complement_masked, temperature)
                certainty = certainty + complement
            values["certainty_forcing"] = certainty
        if "masked_diffusion" in weights:
            # Noised at full width, so a generator draws what it drew before the forward was cut to the canvas.
            term = weights["masked_diffusion"]
            noisy, _, scored, t = mask_for_diffusion(
                batch["targets"],
                batch["canvas_mask"],
                teacher.mask_token_id,
                MASK_EPS,
                generator,
                term.prefix_fraction,
                term.prefix_block,
            )
            diffusion_logits = student.forward(noisy, attention, start=start, **vision)
            values["masked_diffusion"] = masked_diffusion_loss(
                diffusion_logits, targets, scored[:, start:], t, canvas, "uniform"
            )
        if "next_token" in weights:
            causal_logits = student.forward(batch["targets"], attention, causal=True, start=start, **vision)
            values["next_token"] = next_token_loss(causal_logits, targets, canvas)
        if on_task:
            task_batch = {key[len(TASK_PREFIX) :]: value for key, value in batch.items() if key.startswith(TASK_PREFIX)}
            for kind, task_loss in task_losses.items():
                values[kind], _ = task_loss(model, task_batch, generator)
        weights_of = weights | on_task
        loss = sum(weights_of[kind].weight * value for kind, value in values.items())
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


def trajectory_batches(recipe: Recipe, teacher: Teacher, records: list[dict]) -> TrajectoryBatches:
    """d3LLM's curriculum batches over the trajectory `records` for this rank."""
    config, curriculum = recipe.train, recipe.distill.curriculum
    return TrajectoryBatches(
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
        rank=current_rank(),
        vision_fn=teacher.vision_inputs,
    )


def with_task_rows(recipe: Recipe, teacher: Teacher, batch_fn: BatchFn, task_records: list[dict]) -> BatchFn:
    """`batch_fn` with a micro-batch of the task training records added under `TASK_PREFIX` keys: rows drawn as
    teacher pretraining draws them (`SequencePool`: prompt, reference response, answer padding), for the
    `source: task` regularisers."""
    pool = SequencePool(
        encode_records(teacher, task_records, recipe.data.max_response_tokens),
        micro_batch_size=recipe.train.micro_batch_size,
        max_response_tokens=recipe.data.max_response_tokens,
        pad_id=teacher.pad_token_id,
        # Both streams seed `random.Random` with "seed-rank-index": another seed keeps their draws independent.
        seed=recipe.run.seed + 1,
        rank=current_rank(),
        vision_fn=teacher.vision_inputs,
    )

    def batch(index: int) -> dict:
        return batch_fn(index) | {TASK_PREFIX + key: value for key, value in pool.batch(index).items()}

    return batch


# ----------------------------------------------------------------------------------------------------------------
# SDTT runs


def sdtt_batches(recipe: Recipe, teacher: Teacher, records: list[dict]) -> BatchFn:
    """Micro-batch `m` of the task training `records` (`SequencePool`) plus the optimizer `step` it belongs to,
    `m // gradient_accumulation_steps` (the trainer's global micro-batch index), which picks the SDTT round."""
    config = recipe.train
    pool = SequencePool(
        encode_records(teacher, records, recipe.data.max_response_tokens),
        micro_batch_size=config.micro_batch_size,
        max_response_tokens=recipe.data.max_response_tokens,
        pad_id=teacher.pad_token_id,
        seed=recipe.run.seed,
        rank=current_rank(),
        vision_fn=teacher.vision_inputs,
    )

    def batch(index: int) -> dict:
        return pool.batch(index) | {"step": index // config.gradient_accumulation_steps}

    return batch


def sdtt_distillation_loss(teacher: Teacher, rounds: TeacherRounds, weight: float) -> LossFn:
    """`sdtt_loss_fn` times the term's weight, its unweighted value logged as `sdtt`.

    `TeacherRounds` copies a plain state dict into the teacher at a round boundary, so a LoRA student is first
    merged into a throwaway copy (the student itself keeps training its adapters)."""
    loss_fn = sdtt_loss_fn(teacher, rounds)

    def weighted(model, batch, generator):
        step = int(batch["step"])
        module = getattr(model, "module", model)  # a DeepSpeed engine wraps the model
        if isinstance(module, PeftModel) and rounds.schedule(step).round not in (rounds.round, 0):
            rounds.update(step, merged_model(copy.deepcopy(module)))
        loss, metrics = loss_fn(model, batch, generator)
        return weight * loss, {"sdtt": loss.item(), **metrics}

    return weighted


def prune_stale_rounds(rounds_dir: Path, checkpoint_dir: Path, resume: str) -> None:
    """Delete saved round teachers the coming run must not reuse: those of rounds starting after the checkpoint it
    resumes from (all of them on a fresh start), so the student reaching that boundary is copied anew."""
    latest = latest_complete_checkpoint(checkpoint_dir) if resume == "auto" else None
    resumed_step = latest[0] if latest else 0
    for saved in sorted(Path(rounds_dir).glob("round-*")):
        try:
            first_step = json.loads((saved / "round.json").read_text())["first_step"]
        except (OSError, ValueError, KeyError):
            first_step = None  # an interrupted save
        if first_step is None or first_step > resumed_step:
            shutil.rmtree(saved, ignore_errors=True)


# ----------------------------------------------------------------------------------------------------------------
# The job


def build_distillation(
    recipe: Recipe,
    teacher_dir: Path,
    records: list[dict],
    out_dir: Path,
    task_records: list[dict] | None = None,
) -> tuple[Teacher, Trainer]:
    """The frozen teacher and the student's trainer for the `distill` phase in `out_dir/distill`, not yet run.

    `records` are trajectory records (`prompt_ids`, `target_ids`, `order`) for a trajectory run, or the task
    training records (`id`, `prompt`, `response`) for an `sdtt` run. `task_records` are the task training records
    of a trajectory run whose regularisers train on them (`source: task`); unused otherwise.
    """
    on_task = not recipe.distill.is_sdtt and recipe.distill.reads_task_records
    if on_task and not task_records:
        raise ValueError("distill.losses: a term with source: task needs the task training records; none were given")
    if recipe.distill.is_sdtt:
        # SDTT's targets are the teacher's own two decoding steps: a frozen copy on every rank, in the recipe's
        # dtype on the rank's device (bf16 for a 7B teacher: ~15 GB per GPU beside the student, docs/scale.md).
        teacher = load_teacher(recipe.teacher.name, teacher_dir, recipe.teacher.dtype)
        freeze(teacher.model)
    else:
        # Pseudo-trajectories carry the teacher's signal: no teacher forward, so no teacher weights in memory.
        teacher = load_teacher(recipe.teacher.name, teacher_dir, weights=False)
    # LoRA adapters are drawn from the global RNG: seed it so every rank and every rerun builds the same student.
    torch.manual_seed(recipe.run.seed)
    # Under ZeRO-3 the student is partitioned as it is built (zero.Init): no rank holds a full copy.
    deepspeed_config = build_deepspeed_config(recipe.train)
    student = load_student(teacher, teacher_dir, recipe.student, recipe.teacher.dtype, deepspeed_config)
    trainable, total = trainable_parameters(student)
    if current_rank() == 0:
        print(f"[distill] student '{recipe.student.kind}': {trainable:,} of {total:,} parameters train")

    phase_dir = out_dir / "distill"
    identity = {
        "student": recipe.student.model_dump(mode="json"),
        "distill": recipe.distill.model_dump(mode="json"),
        "seed": recipe.run.seed,
    }
    rounds = None
    if recipe.distill.is_sdtt:
        batch_fn = sdtt_batches(recipe, teacher, records)
        rounds = TeacherRounds(teacher, recipe.targets, phase_dir / SDTT_ROUNDS_DIR, rank=current_rank())
        (term,) = recipe.distill.losses
        loss_fn = sdtt_distillation_loss(teacher, rounds, term.weight)
        # The teacher's weights and the task sequences, where a trajectory run has the trajectories.
        identity.update(
            teacher=checkpoint_fingerprint(teacher_dir, strict=recipe.run.strict_hash),
            records=data_hash(records),
            targets=recipe.targets.model_dump(mode="json"),
            canvas=recipe.data.max_response_tokens,
        )
    else:
        batch_fn = trajectory_batches(recipe, teacher, records).batch
        loss_fn = distillation_loss(teacher, recipe.distill.losses)
        # The trajectories themselves (not their path): another teacher gives other orders.
        identity["trajectories"] = records_digest(records)
        if on_task:
            batch_fn = with_task_rows(recipe, teacher, batch_fn, task_records)
            identity["task_records"] = data_hash(task_records)
    trainer = Trainer(
        student,
        recipe.train,
        phase_dir,
        loss_fn,
        batch_fn,
        run_name=f"{recipe.run.name}-distill",
        logging=recipe.logging,
        seed=recipe.run.seed,
        phase="distill",
        fingerprint=json.dumps(identity, sort_keys=True),
    )
    if rounds is not None:
        teacher.model.to(trainer.engine.device)  # the teacher runs forwards beside the student
        if trainer.is_main:
            prune_stale_rounds(rounds.rounds_dir, trainer.checkpoint_dir, recipe.train.resume)
        dist.barrier()
    return teacher, trainer


def save_student(recipe: Recipe, teacher: Teacher, trainer: Trainer, out_dir: Path, teacher_dir: Path) -> Path:
    """Gather the trained weights (collective: every rank calls it) and save the student, LoRA merged, as
    `out_dir/student` from rank 0 (`teacher_dir` rebuilds a ZeRO-3 student whole on rank 0)."""
    state = trainer.full_state_dict()
    student_dir = out_dir / "student"
    if trainer.is_main:
        student = trainer.model
        if any(hasattr(parameter, "ds_id") for parameter in student.parameters()):
            # ZeRO-3 leaves the engine's module partitioned: load the gathered weights into a fresh CPU copy.
            student = load_student(teacher, teacher_dir, recipe.student, recipe.teacher.dtype)
        student.load_state_dict(state)
        student = merged_model(student)
        student.eval()
        save_teacher(teacher.with_model(student), student_dir)
    dist.barrier()
    return student_dir


def distill_student(
    recipe: Recipe, teacher_dir: Path, records: list[dict], out_dir: Path, task_records: list[dict] | None = None
) -> Path:
    """Train the student (see `build_distillation` for `records` and `task_records`); returns the saved
    `out_dir/student`."""
    teacher, trainer = build_distillation(recipe, teacher_dir, records, out_dir, task_records)
    trainer.train()
    return save_student(recipe, teacher, trainer, out_dir, teacher_dir)
