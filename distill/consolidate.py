"""Read a distillation checkpoint back as the student that wrote it: the export's first step (`distill/export.py`).

The checkpoint is one `step-N` directory of `<run>/distill/checkpoints` (layout in `distill/trainer.py`); only one
with its COMPLETE marker counts, and only once its files match its manifest (`latest` falls back past a damaged
newest one, with a warning). Its weights are consolidated to full fp32 tensors on CPU whatever the ZeRO stage
and number of ranks that wrote them, then loaded strictly into the student rebuilt as training built it
(`students.build.build_student` on the run's teacher). A marker, state file or shard that is missing, cut off,
corrupt or not fewstep's, a file that would unpickle more than tensors (`distill.trainer.weights_only_loads`), or
weights whose names or shapes are not the student's, raise `CheckpointError` naming the file; nothing is
unpickled before the manifest check.
"""

from __future__ import annotations

import contextlib
import io
import pickle
from pathlib import Path
from typing import Any

import torch

from distill.recipe import Recipe
from distill.trainer import (
    COMPLETE_MARKER,
    CheckpointError,
    latest_complete_checkpoint,
    list_checkpoints,
    refused_unpickling,
    verify_checkpoint,
    weights_only_loads,
)
from students.build import build_student
from teachers.interface import Teacher, load_teacher


def resolve_checkpoint(run_dir: Path, checkpoint: str | int) -> tuple[int, Path]:
    """`(step, directory)` of the distillation checkpoint to export: the newest complete and intact one, or step
    `checkpoint` (refused when damaged)."""
    checkpoint_dir = Path(run_dir) / "distill" / "checkpoints"
    found = list_checkpoints(checkpoint_dir)
    complete = [step for step, _, done in found if done]
    if checkpoint == "latest":
        latest = latest_complete_checkpoint(checkpoint_dir)
        if latest is None:
            raise CheckpointError(f"{checkpoint_dir}: no complete distillation checkpoint (did the distill stage run?)")
        return latest
    for step, path, done in found:
        if step == checkpoint:
            if not done:
                raise CheckpointError(
                    f"{path / COMPLETE_MARKER}: missing, the save of step {step} was interrupted; complete "
                    f"checkpoints: {', '.join(map(str, complete)) or 'none'}"
                )
            return step, path
    raise CheckpointError(
        f"{checkpoint_dir}: no checkpoint of step {checkpoint}; complete checkpoints: "
        f"{', '.join(map(str, complete)) or 'none'}"
    )


def consolidate(checkpoint: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The full fp32 weights of a complete DeepSpeed checkpoint, and `{"zero_stage", "world_size"}`.

    ZeRO 1-3 weights come from the fp32 master partitions of every rank (`deepspeed.utils.zero_to_fp32`, on CPU);
    ZeRO-0 keeps the whole module in its one model-states file.
    """
    checkpoint = Path(checkpoint)
    marker_file = checkpoint / COMPLETE_MARKER
    if not marker_file.is_file():
        raise CheckpointError(f"{marker_file}: missing, the checkpoint's save did not finish")
    # Every file as written (sizes, then sha256), before anything is unpickled.
    marker = verify_checkpoint(checkpoint)
    world_size, stage = marker["world_size"], marker.get("zero_stage")
    if stage not in (0, 1, 2, 3):
        raise CheckpointError(f"{marker_file}: names no ZeRO stage (not written by this version of fewstep)")
    if stage == 3:  # ZeRO-3 writes one model-states file per rank; stages 0-2 write one for all
        needed = [f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" for rank in range(world_size)]
    else:
        needed = ["mp_rank_00_model_states.pt"]
    for rank in range(world_size if stage > 0 else 0):
        # bf16 training prefixes the optimizer partitions with `bf16_`.
        names = [f"{prefix}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for prefix in ("", "bf16_")]
        if not any((checkpoint / name).is_file() for name in names):
            needed.append(names[0])
    missing = [name for name in needed if not (checkpoint / name).is_file()]
    if missing:
        raise CheckpointError(f"{checkpoint / missing[0]}: missing, ZeRO-{stage} over {world_size} ranks needs it")
    try:
        with weights_only_loads():
            if stage == 0:
                states = torch.load(checkpoint / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=True)
                state = dict(states["module"])
            else:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

                # zero_to_fp32 narrates every file it reads; the export prints its own summary.
                quiet = io.StringIO()
                with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):
                    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name)
    except pickle.UnpicklingError as error:
        raise refused_unpickling(checkpoint, error) from None
    except (RuntimeError, ValueError, KeyError, EOFError, OSError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(f"{checkpoint}: cannot consolidate the ZeRO-{stage} checkpoint: {detail}") from None
    return state, {"zero_stage": stage, "world_size": world_size}


def _check_weights(student: torch.nn.Module, state: dict[str, torch.Tensor], checkpoint: Path, kind: str) -> None:
    expected = {name: tuple(tensor.shape) for name, tensor in student.state_dict().items()}
    got = {name: tuple(tensor.shape) for name, tensor in state.items()}
    problems = [f"missing {name}" for name in sorted(expected.keys() - got.keys())]
    problems += [f"unexpected {name}" for name in sorted(got.keys() - expected.keys())]
    problems += [
        f"{name} is {list(got[name])}, the student's is {list(expected[name])}"
        for name in sorted(expected.keys() & got.keys())
        if got[name] != expected[name]
    ]
    if problems:
        more = f" (and {len(problems) - 2} more)" if len(problems) > 2 else ""
        raise CheckpointError(
            f"{checkpoint}: its weights do not fit the '{kind}' student the recipe builds: "
            f"{'; '.join(problems[:2])}{more}"
        )


def teacher_dir_of(recipe: Recipe, run_dir: Path) -> Path:
    """The teacher the run distilled from: `teacher.path`, else the run's own `teacher/`."""
    teacher_dir = Path(recipe.teacher.path) if recipe.teacher.path is not None else Path(run_dir) / "teacher"
    if not (teacher_dir / "config.json").is_file():
        raise CheckpointError(f"{teacher_dir / 'config.json'}: missing, the student is rebuilt on its teacher")
    return teacher_dir


def load_student(recipe: Recipe, run_dir: Path, checkpoint: Path) -> tuple[Teacher, dict[str, Any]]:
    """The training-side student of `checkpoint` (unmerged, fp32, eval mode) behind the teacher interface, and the
    consolidation facts (`zero_stage`, `world_size`)."""
    state, facts = consolidate(checkpoint)
    # fp32 whatever the recipe's inference dtype: the consolidated weights are the fp32 master copy.
    teacher = load_teacher(recipe.teacher.name, teacher_dir_of(recipe, run_dir), "fp32", "cpu")
    student = build_student(teacher, recipe.student)
    _check_weights(student, state, checkpoint, recipe.student.kind)
    student.load_state_dict(state, strict=True)
    # The student takes the teacher's place: the teacher's own weights are not needed again.
    return teacher.with_model(student.eval()), facts
