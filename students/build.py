"""Build a student from a teacher: a full trainable copy, or the teacher's weights frozen under LoRA adapters.

The student is always a separate module: the teacher that produces targets keeps its own frozen weights and
never enters the optimizer. Both kinds keep the teacher's architecture, tokenizer and logit convention, so the
student is driven through the same `Teacher` interface (`teacher.with_model(student)`).
"""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

from distill.recipe import StudentConfig
from teachers.interface import Teacher


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
    """A trainable student initialised from the teacher's weights, per `student.kind`."""
    student = copy.deepcopy(teacher.model)
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
    """(trainable, total) parameter counts."""
    total = sum(parameter.numel() for parameter in model.parameters())
    trainable = sum(parameter.numel() for parameter in model.parameters() if parameter.requires_grad)
    return trainable, total


def merged_model(student: torch.nn.Module) -> torch.nn.Module:
    """The plain model with LoRA folded into its weights (a full student is returned as is)."""
    if isinstance(student, PeftModel):
        return student.merge_and_unload()
    return student
