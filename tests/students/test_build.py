"""Students built from a teacher: full copy and peft LoRA, with the teacher left frozen and untouched."""

import pytest
import torch

from distill.recipe import LoraConfig, StudentConfig
from students.build import build_student, freeze, merged_model, trainable_parameters
from tests.builders import tiny_teacher


def teacher_and_batch():
    torch.manual_seed(0)
    teacher = tiny_teacher(32, 64, 2, 2, 1, 64)
    freeze(teacher.model)
    ids = torch.tensor([teacher.encode_prompt("12+34=").ids + [teacher.mask_token_id] * 4])
    return teacher, ids


def train_one_step(student, teacher, ids):
    optimizer = torch.optim.SGD([p for p in student.parameters() if p.requires_grad], lr=0.5)
    logits = teacher.with_model(student).forward(ids)
    loss = torch.nn.functional.cross_entropy(logits[0], torch.full((ids.shape[1],), 7))
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_student_starts_equal_trains_and_leaves_teacher_untouched(kind):
    teacher, ids = teacher_and_batch()
    before = {name: value.clone() for name, value in teacher.model.state_dict().items()}
    student = build_student(teacher, StudentConfig(kind=kind, lora=LoraConfig(r=4, alpha=8)))
    assert torch.allclose(teacher.with_model(student).forward(ids), teacher.forward(ids), atol=1e-6)
    assert all(not p.requires_grad for p in teacher.model.parameters())
    trainable, total = trainable_parameters(student)
    if kind == "full":
        assert trainable == total
    else:
        assert 0 < trainable < total / 2
    train_one_step(student, teacher, ids)
    assert not torch.allclose(teacher.with_model(student).forward(ids), teacher.forward(ids), atol=1e-4)
    for name, value in teacher.model.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_merged_lora_matches_adapter_outputs():
    teacher, ids = teacher_and_batch()
    student = build_student(teacher, StudentConfig(kind="lora", lora=LoraConfig(r=4, alpha=8)))
    train_one_step(student, teacher, ids)
    student.eval()
    with_adapters = teacher.with_model(student).forward(ids)
    merged = merged_model(student)
    assert type(merged).__name__ == "DreamModel"
    assert torch.allclose(teacher.with_model(merged).forward(ids), with_adapters, atol=1e-5)


def test_unknown_target_module_is_a_clear_error():
    teacher, _ = teacher_and_batch()
    config = StudentConfig(kind="lora", lora=LoraConfig(target_modules=["q_proj", "attn_out"]))
    with pytest.raises(ValueError, match="student.lora.target_modules: no module named attn_out"):
        build_student(teacher, config)
