"""Build a student from a teacher: a full trainable copy, or the teacher's weights frozen under LoRA adapters.

The student is always a separate module: the teacher that produces targets keeps its own frozen weights and
never enters the optimizer. Both kinds keep the teacher's architecture, tokenizer and logit convention, so the
student is driven through the same `Teacher` interface (`teacher.with_model(student)`).

Two ways in: `build_student` copies a teacher already in memory (tests, small models); `load_student` reads the
teacher's checkpoint folder, which is what distillation does. Under ZeRO-3 `load_student` builds the model inside
DeepSpeed's `zero.Init` through transformers' own integration (`HfDeepSpeedConfig`, then `from_pretrained`), so
each parameter is partitioned as it is created and filled one at a time from the safetensors files: no rank ever
holds the whole 7B student, and nothing else but the DeepSpeed engine (`deepspeed.initialize`) is needed after.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from distill.recipe import StudentConfig
from teachers.interface import Teacher, read_model


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """Put a module in eval mode with every parameter frozen (the teacher during distillation)."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


# Dimple's vision parts that stay frozen under each `train_vision` setting.
FROZEN_VISION = {"all": (), "projector": ("visual",), "none": ("visual", "img_projector")}


def set_vision_training(model: torch.nn.Module, train_vision: str) -> torch.nn.Module:
    """Freeze the vision parts of a Dimple model that `train_vision` (`all`, `projector`, `none`) keeps fixed; a
    model without them is returned as is."""
    for name in FROZEN_VISION[train_vision]:
        module = getattr(model, name, None)
        for parameter in module.parameters() if module is not None else ():
            parameter.requires_grad_(False)
    return model


def build_student(teacher: Teacher, config: StudentConfig) -> torch.nn.Module:
    """A trainable student initialised from the weights of the teacher in memory, per `student.kind`."""
    return as_student(copy.deepcopy(teacher.model), teacher, config)


@contextmanager
def zero3_construction(deepspeed_config: dict[str, Any] | None) -> Iterator[bool]:
    """While the block runs, models that transformers builds are partitioned by ZeRO-3 as they are created (when
    `deepspeed_config` is a stage-3 config; otherwise nothing changes). Yields whether it is on.

    transformers reads a module-global weak reference to the live `HfDeepSpeedConfig`; it is dropped on exit, so
    no later `from_pretrained` of this process (an eval, a teacher) is partitioned by accident."""
    stage = ((deepspeed_config or {}).get("zero_optimization") or {}).get("stage", 0)
    if stage != 3:
        yield False
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    marker = HfDeepSpeedConfig(deepspeed_config)
    try:
        yield True
    finally:
        del marker
        unset_hf_deepspeed_config()


def load_student(
    teacher: Teacher,
    teacher_dir: Path,
    config: StudentConfig,
    dtype: str = "fp32",
    deepspeed_config: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """A trainable student read from the teacher's checkpoint folder, per `student.kind`, on the CPU in `dtype`
    (DeepSpeed places it); partitioned at construction under a ZeRO-3 `deepspeed_config` (every rank calls it)."""
    with zero3_construction(deepspeed_config):
        model = read_model(Path(teacher_dir), teacher.backbone, dtype)
    return as_student(model, teacher, config)


def as_student(student: torch.nn.Module, teacher: Teacher, config: StudentConfig) -> torch.nn.Module:
    """`student` (a copy of the teacher's weights) made trainable per `student.kind`: every weight (`full`, less
    the vision parts `train_vision` keeps), or frozen under LoRA adapters on the backbone's targets."""
    student.train()
    if config.kind == "full":
        for parameter in student.parameters():
            parameter.requires_grad_(True)
        return set_vision_training(student, config.train_vision)
    targets = config.lora.target_modules
    if targets is not None:
        present = {name.rsplit(".", 1)[-1] for name, _ in student.named_modules()}
        missing = [name for name in targets if name not in present]
        if missing:
            raise ValueError(f"student.lora.target_modules: no module named {', '.join(missing)} in the teacher")
    lora = PeftLoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(targets) if targets is not None else teacher.backbone.lora_targets,
        bias="none",
    )
    return get_peft_model(student, lora)


def trainable_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (whole parameters, also when ZeRO-3 holds only a partition here)."""
    sizes = [
        (getattr(parameter, "ds_numel", parameter.numel()), parameter.requires_grad) for parameter in model.parameters()
    ]
    total = sum(size for size, _ in sizes)
    trainable = sum(size for size, trains in sizes if trains)
    return trainable, total


def merged_model(student: torch.nn.Module) -> torch.nn.Module:
    """The plain model with LoRA folded into its weights (a full student is returned as is)."""
    if isinstance(student, PeftModel):
        return student.merge_and_unload()
    return student
