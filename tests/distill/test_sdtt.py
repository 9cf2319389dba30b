"""SDTT: which teacher distribution each position gets after two steps (on a scripted teacher), the loss on masked
positions only, the round schedule and the teacher hand-over across round boundaries and resumes."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from distill.losses import loss_start, mask_tokens, reverse_kl
from distill.recipe import TargetsConfig
from distill.sdtt import (
    DIVERGENCES,
    TeacherRounds,
    sdtt_loss,
    sdtt_loss_fn,
    sdtt_round,
    sdtt_targets,
    tokens_per_step,
)
from teachers.interface import Teacher
from tests.builders import SCRIPTED, keep_logits, tiny_teacher
from tests.builders import right_padded_batch as padded_rows

MASK, VOCAB = 0, 8


class ScriptedModel(torch.nn.Module):
    """Returns the next of the given logits tensors at each call and records the ids it was shown."""

    def __init__(self, script: list[torch.Tensor]):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # Teacher.device reads a parameter
        self.script = list(script)
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids, attention_mask=None, use_cache=False, logits_to_keep=0):
        self.seen.append(input_ids.clone())
        return SimpleNamespace(logits=keep_logits(self.script[len(self.seen) - 1].clone(), logits_to_keep))


def scripted_teacher(script: list[torch.Tensor]) -> Teacher:
    return Teacher(ScriptedModel(script), None, SCRIPTED, mask_token_id=MASK)


def peaked(token: int, height: float) -> torch.Tensor:
    row = torch.zeros(VOCAB)
    row[token] = height
    return row


def test_each_position_takes_the_distribution_of_the_step_that_unmasked_it():
    # Positions 0-1 are the prompt, 2-5 the response; position 2 is already clean in x_t.
    x_t = torch.tensor([[5, 6, 4, MASK, MASK, MASK]])
    response = torch.tensor([[0, 0, 1, 1, 1, 1]])
    step0 = torch.randn(1, 6, VOCAB)
    step0[0, 3] = peaked(MASK, 10.0)  # confident only about the mask token, which is never committed
    step0[0, 4] = peaked(3, 5.0)  # the most confident real token: committed at step 0
    step0[0, 5] = peaked(6, 2.0)
    step1 = torch.randn(1, 6, VOCAB)
    step1[0, 3] = peaked(1, 1.0)
    step1[0, 4] = peaked(2, 9.0)  # already committed: ignored as a candidate
    step1[0, 5] = peaked(6, 4.0)  # committed at step 1
    teacher = scripted_teacher([step0, step1])
    targets = sdtt_targets(teacher, x_t, torch.ones_like(x_t), response, dt=1, generator=None, temperature=0.0)

    assert targets.unmasked_at.tolist() == [[-1, -1, -1, -1, 0, 1]]
    assert targets.x_s.tolist() == [[5, 6, 4, MASK, 3, 6]]
    # The second forward saw the first step's commit.
    assert teacher.model.seen[1].tolist() == [[5, 6, 4, MASK, 3, MASK]]
    log_softmax = torch.log_softmax
    assert torch.allclose(targets.log_probs[0, 4], log_softmax(step0[0, 4], -1))  # unmasked at step 0
    assert torch.allclose(targets.log_probs[0, 5], log_softmax(step1[0, 5], -1))  # unmasked at step 1
    assert torch.allclose(targets.log_probs[0, 3], log_softmax(step1[0, 3], -1))  # still masked: the last step's
    assert torch.isfinite(targets.log_probs).all()


def test_dt_as_a_fraction_commits_that_share_of_the_canvas_per_step():
    x_t = torch.tensor([[7, MASK, MASK, MASK, MASK, MASK]])
    response = torch.tensor([[0, 1, 1, 1, 1, 1]])
    assert tokens_per_step(response, 0.4).tolist() == [2]  # ceil(0.4 * 5)
    assert tokens_per_step(response, 0.01).tolist() == [1]
    assert tokens_per_step(response, 3).tolist() == [3]
    with pytest.raises(ValueError, match="dt"):
        tokens_per_step(response, 1.5)
    script = [torch.randn(1, 6, VOCAB), torch.randn(1, 6, VOCAB)]
    targets = sdtt_targets(scripted_teacher(script), x_t, torch.ones_like(x_t), response, 0.4, None, 0.0)
    assert (targets.unmasked_at == 0).sum() == 2 and (targets.unmasked_at == 1).sum() == 2


def test_sampled_commits_are_reproducible_from_the_generator():
    x_t = torch.full((2, 6), MASK)
    response = torch.ones_like(x_t)
    script = [torch.randn(2, 6, VOCAB), torch.randn(2, 6, VOCAB)]
    runs = [
        sdtt_targets(scripted_teacher(script), x_t, response, response, 2, torch.Generator().manual_seed(0), 1.0)
        for _ in range(2)
    ]
    assert torch.equal(runs[0].x_s, runs[1].x_s) and torch.equal(runs[0].log_probs, runs[1].log_probs)
    assert (runs[0].x_s != MASK).sum() == 8


def test_loss_counts_masked_positions_only():
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, VOCAB), torch.log_softmax(torch.randn(2, 4, VOCAB), -1)
    masked = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    expected = reverse_kl(student, teacher)[masked].mean()
    assert torch.allclose(sdtt_loss(student, teacher, masked), expected)
    student[~masked] += 100.0  # positions clean in x_t never matter
    assert torch.allclose(sdtt_loss(student, teacher, masked), expected)
    for name in DIVERGENCES:
        assert torch.isfinite(sdtt_loss(student, teacher, masked, name))
    with pytest.raises(ValueError, match="unknown divergence"):
        sdtt_loss(student, teacher, masked, "js")


def test_round_schedule_halves_the_teacher_steps_each_round_and_stops_after_the_last():
    assert sdtt_round(0, 100).teacher_steps == 1024 and sdtt_round(0, 100).student_steps == 512
    assert sdtt_round(99, 100).round == 0
    second = sdtt_round(100, 100)
    assert (second.round, second.dt_multiplier, second.teacher_steps, second.dt) == (1, 2, 512, 2 / 1024)
    steps = [sdtt_round(r * 100, 100).teacher_steps for r in range(7)]
    assert steps == [1024, 512, 256, 128, 64, 32, 16]
    last = sdtt_round(10**6, 100)
    assert (last.round, last.teacher_steps, last.student_steps) == (6, 16, 8)
    with pytest.raises(Exception, match="divisible by 2\\*\\*rounds"):
        TargetsConfig(teacher_steps=100, rounds=7)


def tiny(seed: int) -> Teacher:
    torch.manual_seed(seed)
    return tiny_teacher(32, 64, 2, 2, 1, 64)


def same_weights(first: torch.nn.Module, second: torch.nn.Module) -> bool:
    return all(
        torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    )


def test_teacher_becomes_the_student_at_each_boundary_and_resume_reloads_the_round_teacher(tmp_path):
    config = TargetsConfig(teacher_steps=8, rounds=3, steps_per_round=2)
    student = tiny(1).model
    rounds = TeacherRounds(tiny(0), config, tmp_path / "rounds")
    initial = {name: value.clone() for name, value in rounds.teacher.model.state_dict().items()}
    assert rounds.update(0, student).round == 0 and rounds.update(1, student).round == 0
    assert all(torch.equal(initial[name], value) for name, value in rounds.teacher.model.state_dict().items())

    assert rounds.update(2, student).teacher_steps == 4
    assert same_weights(rounds.teacher.model, student)
    assert (tmp_path / "rounds" / "round-01" / "round.json").is_file()
    assert not any(parameter.requires_grad for parameter in rounds.teacher.model.parameters())

    # The student trains on; a resumed run at step 3 must get round 1's teacher back, not the current student.
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)
    resumed = TeacherRounds(tiny(0), config, tmp_path / "rounds")
    assert resumed.update(3, student).round == 1
    assert same_weights(resumed.teacher.model, rounds.teacher.model)
    assert not same_weights(resumed.teacher.model, student)
    # Round 2 was never saved and step 5 is past its boundary: its teacher cannot be rebuilt.
    with pytest.raises(FileNotFoundError, match="round 2"):
        TeacherRounds(tiny(0), config, tmp_path / "rounds").update(5, student)


def test_loss_fn_trains_the_student_and_reports_the_round(tmp_path):
    student = tiny(1)
    rounds = TeacherRounds(tiny(0), TargetsConfig(teacher_steps=8, rounds=2, steps_per_round=4), tmp_path)
    ids = torch.randint(7, 60, (2, 12))
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "response_mask": torch.tensor([[0] * 4 + [1] * 8] * 2),
        "step": 4,
    }
    loss, metrics = sdtt_loss_fn(student, rounds)(student.model, batch, torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and student.model.lm_head.weight.grad is not None
    assert metrics == {"sdtt_round": 1, "sdtt_dt": 2 / 8, "sdtt_teacher_steps": 4}


def right_padded_batch(teacher: Teacher) -> dict:
    """`tests.builders.right_padded_batch` at optimizer step 0 (SDTT reads the round from it)."""
    return padded_rows(teacher) | {"step": 0}


def test_targets_and_loss_from_the_first_response_column_equal_their_full_width_values(tmp_path):
    teacher, student = tiny(0), tiny(1)
    batch = right_padded_batch(teacher)
    ids, attention, response = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    start = loss_start(response)
    assert start == len(teacher.encode_prompt("1+1").ids) > 0
    x_t = ids.masked_fill(response.bool(), teacher.mask_token_id)
    full, cut = (sdtt_targets(teacher, x_t, attention, response, 2, None, 0.0, start=s) for s in (0, start))
    assert torch.equal(cut.x_s, full.x_s) and torch.equal(cut.unmasked_at, full.unmasked_at)
    assert (full.unmasked_at >= 0).sum(-1).tolist() == [4, 2]  # two a step; the second row has only two
    assert cut.start == start and torch.allclose(cut.log_probs, full.log_probs[:, start:], atol=1e-5)
    with pytest.raises(ValueError, match="past the first response position"):
        sdtt_targets(teacher, x_t, attention, response, 2, None, 0.0, start=start + 1)

    # The student's loss (greedy teacher, so the generator only noises x_t) against the full-width computation.
    config = TargetsConfig(teacher_steps=8, rounds=2, steps_per_round=4, temperature=0.0)
    loss, _ = sdtt_loss_fn(student, TeacherRounds(teacher, config, tmp_path))(
        student.model, batch, torch.Generator().manual_seed(0)
    )
    noisy, masked, _ = mask_tokens(ids, response, teacher.mask_token_id, 1e-3, torch.Generator().manual_seed(0))
    targets = sdtt_targets(teacher, noisy, attention, response, 1 / 8, None, 0.0)
    expected = reverse_kl(student.forward(noisy, attention), targets.log_probs)[masked.bool()].mean()
    assert masked.any() and math.isclose(loss.item(), expected.item(), rel_tol=1e-5)
