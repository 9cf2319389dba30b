"""The distillation job: composed loss terms against direct formulas, and a few real DeepSpeed steps."""

import math

import pytest
import torch
import yaml
from transformers import AutoModel

from distill.d3llm import Curriculum, TrajectoryBatches
from distill.distill import distill_student, distillation_loss
from distill.losses import certainty_forcing_loss, masked_ce, next_token_loss
from distill.recipe import LossTerm, load_recipe
from teachers.interface import load_teacher, save_teacher
from tests.builders import tiny_teacher


def records(teacher, count=6, canvas=8):
    out = []
    for index in range(count):
        prompt = teacher.encode_prompt(f"{index}+{index}=").ids
        answer = teacher.encode_response(str(2 * index))
        targets = answer + [teacher.pad_token_id] * (canvas - len(answer))
        out.append(
            {"sample_id": f"s{index}", "prompt_ids": prompt, "target_ids": targets, "order": list(range(canvas))}
        )
    return out


@pytest.fixture(scope="module")
def saved_teacher(tmp_path_factory):
    torch.manual_seed(0)
    teacher = tiny_teacher(32, 64, 1, 2, 1, 64)
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    save_teacher(teacher, path)
    return load_teacher(None, path), path


def test_loss_is_the_weighted_sum_of_its_terms(saved_teacher):
    teacher, _ = saved_teacher
    batch = TrajectoryBatches(
        records(teacher), 4, 10, Curriculum(windows=(4,)), teacher.mask_token_id, teacher.pad_token_id, seed=0
    ).batch(5)
    terms = [
        LossTerm(kind="trajectory_ce", weight=0.25),
        LossTerm(kind="complementary_ce", weight=0.5),
        LossTerm(kind="certainty_forcing", weight=2.0, temperature=0.5),
    ]
    loss, metrics = distillation_loss(teacher, terms)(teacher.model, batch, torch.Generator().manual_seed(0))
    logits = teacher.forward(batch["input_ids"], batch["attention_mask"])
    comp = teacher.forward(batch["complement_ids"], batch["attention_mask"])
    targets = batch["targets"]
    expected = (
        0.25 * masked_ce(logits, targets, batch["masked"])
        + 0.5 * masked_ce(comp, targets, batch["complement_masked"])
        + 2.0
        * (
            certainty_forcing_loss(logits, targets, batch["masked"])
            + certainty_forcing_loss(comp, targets, batch["complement_masked"])
        )
    )
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)
    assert {"trajectory_ce", "complementary_ce", "certainty_forcing", "mask_floor", "window"} <= set(metrics)


def test_next_token_term_is_the_causal_next_token_loss_on_the_trajectory_tokens(saved_teacher):
    teacher, _ = saved_teacher
    batch = TrajectoryBatches(
        records(teacher), 4, 10, Curriculum(windows=(4,)), teacher.mask_token_id, teacher.pad_token_id, seed=0
    ).batch(2)
    terms = [LossTerm(kind="trajectory_ce", weight=1.0), LossTerm(kind="next_token", weight=0.5)]
    loss, metrics = distillation_loss(teacher, terms)(teacher.model, batch, torch.Generator().manual_seed(0))
    targets, attention = batch["targets"], batch["attention_mask"]
    causal = next_token_loss(teacher.forward(targets, attention, causal=True), targets, batch["canvas_mask"])
    bidirectional = next_token_loss(teacher.forward(targets, attention), targets, batch["canvas_mask"])
    assert abs(causal.item() - bidirectional.item()) > 1e-6  # the term really is causal
    trajectory = masked_ce(teacher.forward(batch["input_ids"], attention), targets, batch["masked"])
    assert math.isclose(metrics["next_token"], causal.item(), rel_tol=1e-5)
    assert math.isclose(loss.item(), trajectory.item() + 0.5 * causal.item(), rel_tol=1e-5)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_distill_student_trains_and_saves_a_loadable_student(saved_teacher, tmp_path, kind):
    teacher, path = saved_teacher
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(
        yaml.safe_dump(
            {
                "run": {"name": "d", "output_dir": str(tmp_path / "out")},
                "teacher": {"path": str(path)},
                "data": {"tasks": [{"name": "addition"}], "max_response_tokens": 8},
                "student": {"kind": kind, "lora": {"r": 4, "alpha": 8}},
                "train": {"max_steps": 3, "micro_batch_size": 4, "lr": 1e-2, "log_every": 1},
                "distill": {
                    "curriculum": {"windows": [4, 8]},
                    "losses": [
                        {"kind": "trajectory_ce", "weight": 0.25},
                        {"kind": "complementary_ce", "weight": 0.25},
                        {"kind": "certainty_forcing", "weight": 0.25},
                        {"kind": "masked_diffusion", "weight": 0.1},
                    ],
                },
                "logging": {"wandb": {"mode": "disabled"}, "progress": False},
            }
        )
    )
    recipe = load_recipe(recipe_file)
    student_dir = distill_student(recipe, path, records(teacher), tmp_path / "out")
    student = AutoModel.from_pretrained(student_dir)
    assert type(student).__name__ == "DreamModel"  # LoRA merged into plain weights
    changed = any(
        not torch.equal(value, teacher.model.state_dict()[name]) for name, value in student.state_dict().items()
    )
    assert changed
    lines = (tmp_path / "out" / "distill" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "masked_diffusion" in lines[-1] and "window" in lines[-1]
