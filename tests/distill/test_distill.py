"""The distillation job: composed loss terms against direct formulas, and a few real DeepSpeed steps."""

import math

import pytest
import torch
import yaml
from transformers import AutoModel

from distill.d3llm import Curriculum, TrajectoryBatches
from distill.data import SequencePool, encode_records
from distill.distill import MASK_EPS, TASK_PREFIX, distill_student, distillation_loss
from distill.losses import (
    certainty_forcing_loss,
    loss_start,
    mask_for_diffusion,
    mask_tokens,
    masked_ce,
    next_token_loss,
)
from distill.pretrain import ar_loss, diffusion_loss
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


def task_records(count=12):
    return [
        {"id": f"t{index}", "prompt": f"{index}+{index + 1}=", "response": str(2 * index + 1)} for index in range(count)
    ]


def test_task_source_terms_are_the_pretraining_losses_on_the_task_rows(saved_teacher):
    teacher, _ = saved_teacher
    trajectory = TrajectoryBatches(
        records(teacher), 4, 10, Curriculum(windows=(4,)), teacher.mask_token_id, teacher.pad_token_id, seed=0
    ).batch(2)
    task = SequencePool(encode_records(teacher, task_records(), 8), 3, 8, teacher.pad_token_id, seed=1).batch(2)
    batch = trajectory | {TASK_PREFIX + key: value for key, value in task.items()}
    terms = [
        LossTerm(kind="trajectory_ce", weight=1.0),
        LossTerm(kind="next_token", weight=0.5, source="task"),
        LossTerm(kind="masked_diffusion", weight=0.25, source="task"),
    ]
    loss, metrics = distillation_loss(teacher, terms)(teacher.model, batch, torch.Generator().manual_seed(0))
    ar, _ = ar_loss(teacher)(teacher.model, task, torch.Generator().manual_seed(0))
    diffusion, _ = diffusion_loss(teacher, MASK_EPS, "uniform")(teacher.model, task, torch.Generator().manual_seed(0))
    on_trajectory, _ = distillation_loss(teacher, [LossTerm(kind="next_token")])(
        teacher.model, trajectory, torch.Generator().manual_seed(0)
    )
    assert abs(ar.item() - on_trajectory.item()) > 1e-4  # the task rows, not the trajectory's tokens
    assert math.isclose(metrics["next_token"], ar.item(), rel_tol=1e-5)
    assert math.isclose(metrics["masked_diffusion"], diffusion.item(), rel_tol=1e-5)
    ce = masked_ce(
        teacher.forward(trajectory["input_ids"], trajectory["attention_mask"]),
        trajectory["targets"],
        trajectory["masked"],
    )
    assert math.isclose(loss.item(), ce.item() + 0.5 * ar.item() + 0.25 * diffusion.item(), rel_tol=1e-5)


def _full_width(logits, targets, positions, temperature=None):
    """A term as it was computed before the forward was cut to the canvas: float32 over every column, per row.

    `[B]` sums of the CE at `positions` (the entropy at `temperature` on those predicted right, when given) and
    their counts.
    """
    log_probs = torch.log_softmax(logits.float() / (temperature or 1.0), -1)
    if temperature is None:
        values = -log_probs.gather(-1, targets[..., None]).squeeze(-1)
    else:
        values = -(log_probs.exp() * log_probs).sum(-1)
        positions = positions & (logits.argmax(-1) == targets)
    return (values * positions).sum(-1), positions.sum(-1)


def test_every_term_scored_on_the_canvas_equals_its_full_width_value_and_gradient(saved_teacher):
    teacher, _ = saved_teacher
    data = [
        record | {"prompt_ids": teacher.encode_prompt(f"{7**index}+{index}=").ids}
        for index, record in enumerate(records(teacher))
    ]  # prompts of different lengths, left-padded
    batch = TrajectoryBatches(
        data, 4, 10, Curriculum(windows=(4,)), teacher.mask_token_id, teacher.pad_token_id, seed=0
    ).batch(3)
    width = batch["targets"].shape[1]
    assert width > 8 + min(len(record["prompt_ids"]) for record in data)  # some rows are padded
    # Masked positions (their inputs hold the mask id either way) take the model's own predictions as targets, so
    # certainty forcing has right predictions to sharpen.
    predicted = teacher.forward(batch["input_ids"], batch["attention_mask"]).argmax(-1)
    batch["targets"] = torch.where(batch["masked"], predicted, batch["targets"])
    assert loss_start(batch["canvas_mask"]) == width - 8  # the canvas: the last 8 columns
    kinds = ["trajectory_ce", "complementary_ce", "certainty_forcing", "masked_diffusion", "next_token"]
    loss_fn = distillation_loss(teacher, [LossTerm(kind=kind, weight=1.0) for kind in kinds])
    loss, metrics = loss_fn(teacher.model, batch, torch.Generator().manual_seed(0))

    targets, attention, masked = batch["targets"], batch["attention_mask"], batch["masked"]
    complement_masked, canvas = batch["complement_masked"], batch["canvas_mask"].bool()
    logits = teacher.forward(batch["input_ids"], attention)
    complement = teacher.forward(batch["complement_ids"], attention)
    noisy, noised, _ = mask_tokens(targets, canvas, teacher.mask_token_id, MASK_EPS, torch.Generator().manual_seed(0))
    terms = [
        ("trajectory_ce", [_full_width(logits, targets, masked)]),
        ("complementary_ce", [_full_width(complement, targets, complement_masked)]),
        (
            "certainty_forcing",
            [_full_width(logits, targets, masked, 0.5), _full_width(complement, targets, complement_masked, 0.5)],
        ),
        ("next_token", [_full_width(teacher.forward(targets, attention, causal=True), targets, canvas)]),
    ]
    expected = {kind: sum(sums.sum() / counts.sum().clamp(min=1) for sums, counts in parts) for kind, parts in terms}
    sums, counts = _full_width(teacher.forward(noisy, attention), targets, noised)
    expected["masked_diffusion"] = (sums / counts.clamp(min=1)).mean()  # the `uniform` weighting
    assert metrics["certainty_forcing"] > 0
    for kind in kinds:
        assert math.isclose(metrics[kind], expected[kind].item(), rel_tol=1e-5), kind
    reference = sum(expected.values())
    assert math.isclose(loss.item(), reference.item(), rel_tol=1e-5)
    parameters = [p for p in teacher.model.parameters() if p.requires_grad]
    for got, want in zip(
        torch.autograd.grad(loss, parameters), torch.autograd.grad(reference, parameters), strict=True
    ):
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_masked_diffusion_term_noises_its_prefix_rows_as_teacher_pretraining_does(saved_teacher):
    teacher, _ = saved_teacher
    batch = TrajectoryBatches(
        records(teacher), 4, 10, Curriculum(windows=(4,)), teacher.mask_token_id, teacher.pad_token_id, seed=0
    ).batch(3)
    term = LossTerm(kind="masked_diffusion", prefix_fraction=0.5, prefix_block=2)
    loss, _ = distillation_loss(teacher, [term])(teacher.model, batch, torch.Generator().manual_seed(0))
    targets, canvas = batch["targets"], batch["canvas_mask"]
    noisy, masked, scored, _ = mask_for_diffusion(
        targets, canvas, teacher.mask_token_id, MASK_EPS, torch.Generator().manual_seed(0), 0.5, 2
    )
    assert not torch.equal(scored[:2], masked[:2]) and torch.equal(scored[2:], masked[2:])  # two block rows
    sums, counts = _full_width(teacher.forward(noisy, batch["attention_mask"]), targets, scored)
    assert math.isclose(loss.item(), (sums / counts.clamp(min=1)).mean().item(), rel_tol=1e-5)
    uniform, _ = distillation_loss(teacher, [LossTerm(kind="masked_diffusion")])(
        teacher.model, batch, torch.Generator().manual_seed(0)
    )
    assert abs(uniform.item() - loss.item()) > 1e-4


def distill_recipe(tmp_path, teacher_path, losses: list[dict], max_steps: int, **sections):
    """A small trajectory-distillation recipe for the teacher at `teacher_path`, written and loaded."""
    tree = {
        "run": {"name": "d", "output_dir": str(tmp_path / "out")},
        "teacher": {"path": str(teacher_path)},
        "data": {"tasks": [{"name": "addition"}], "max_response_tokens": 8},
        "train": {"max_steps": max_steps, "micro_batch_size": 4, "lr": 1e-2, "log_every": 1},
        "distill": {"curriculum": {"windows": [4, 8]}, "losses": losses},
        "logging": {"wandb": {"mode": "disabled"}, "progress": False},
    }
    recipe_file = tmp_path / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(tree | sections))
    return load_recipe(recipe_file)


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_distill_student_trains_and_saves_a_loadable_student(saved_teacher, tmp_path, kind):
    teacher, path = saved_teacher
    losses = [
        {"kind": "trajectory_ce", "weight": 0.25},
        {"kind": "complementary_ce", "weight": 0.25},
        {"kind": "certainty_forcing", "weight": 0.25},
        {"kind": "masked_diffusion", "weight": 0.1},
    ]
    recipe = distill_recipe(tmp_path, path, losses, 3, student={"kind": kind, "lora": {"r": 4, "alpha": 8}})
    student_dir = distill_student(recipe, path, records(teacher), tmp_path / "out")
    student = AutoModel.from_pretrained(student_dir)
    assert type(student).__name__ == "DreamModel"  # LoRA merged into plain weights
    changed = any(
        not torch.equal(value, teacher.model.state_dict()[name]) for name, value in student.state_dict().items()
    )
    assert changed
    lines = (tmp_path / "out" / "distill" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3 and "masked_diffusion" in lines[-1] and "window" in lines[-1]


def test_task_source_terms_train_on_the_task_records_given(saved_teacher, tmp_path):
    teacher, path = saved_teacher
    losses = [{"kind": "trajectory_ce", "weight": 1.0}, {"kind": "next_token", "weight": 0.5, "source": "task"}]
    recipe = distill_recipe(tmp_path, path, losses, 2)
    with pytest.raises(ValueError, match="source: task needs the task training records"):
        distill_student(recipe, path, records(teacher), tmp_path / "out")
    distill_student(recipe, path, records(teacher), tmp_path / "out", task_records())
    lines = (tmp_path / "out" / "distill" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and all("next_token" in line for line in lines)
