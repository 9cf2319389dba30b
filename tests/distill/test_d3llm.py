"""Pseudo-trajectory inputs (d3LLM) and their loss, against hand-built trajectories and direct formulas."""

import math

import pytest
import torch

from distill.d3llm import Curriculum, TrajectoryBatches
from distill.losses import certainty_forcing_loss, masked_ce

MASK, PAD = 0, 1


def record(order, prompt=(5, 6, 7)):
    canvas = len(order)
    return {"sample_id": "s", "prompt_ids": list(prompt), "target_ids": list(range(20, 20 + canvas)), "order": order}


def test_window_shows_the_teachers_state_prefix_clean_suffix_masked():
    # Block-by-block teacher, one token per step, 8-token canvas in windows of 4.
    order = [2, 0, 3, 1, 5, 7, 4, 6]
    curriculum = Curriculum(floor_start=0.5, floor_end=0.5, t_max=0.5, windows=(4,))
    batches = TrajectoryBatches([record(order)], 64, 10, curriculum, MASK, PAD, seed=0)
    batch = batches.batch(0)
    canvas = slice(3, 11)
    seen = set()
    for row in range(64):
        ids, comp = batch["input_ids"][row, canvas], batch["complement_ids"][row, canvas]
        targets = batch["targets"][row, canvas]
        assert batch["t"][row] == 0.5
        if (ids[:4] == targets[:4]).all():  # window 1: positions 4..7, step k = 4 + int(0.5 * 4) = 6
            seen.add(1)
            assert (ids[4:] == torch.tensor([20 + 4, MASK, 20 + 6, MASK])).all()  # orders 5 and 4 are < 6
            assert (comp[4:] == torch.tensor([MASK, 20 + 5, MASK, 20 + 7])).all()
            assert (comp[:4] == targets[:4]).all()
        else:  # window 0: k = 0 + 2 = 2, orders 0 and 1 (positions 1 and 3) are clean; the rest after it masked
            seen.add(0)
            assert ids.tolist() == [MASK, 21, MASK, 23, MASK, MASK, MASK, MASK]
            assert comp.tolist() == [20, MASK, 22, MASK, MASK, MASK, MASK, MASK]
        # Loss positions are the window's masked positions only.
        masked, comp_masked = batch["masked"][row, canvas], batch["complement_masked"][row, canvas]
        assert not (masked & comp_masked).any()
        assert (masked | comp_masked).sum() == 4
        assert (batch["input_ids"][row, :3] == torch.tensor([5, 6, 7])).all()
    assert seen == {0, 1}


def test_unvisited_positions_count_as_last_and_rows_are_left_padded():
    order = [0, 1, 2, -1]
    curriculum = Curriculum(floor_start=0.0, floor_end=0.0, t_max=0.0, windows=(4,))  # t = 0: step k = 4
    batch = TrajectoryBatches([record(order), record(order, prompt=(9,))], 8, 10, curriculum, MASK, PAD, 1).batch(3)
    for row in range(8):
        ids = batch["input_ids"][row, -4:]
        assert ids.tolist() == [20, 21, 22, MASK]
        assert batch["attention_mask"][row, -4:].all()
    short = [row for row in range(8) if batch["attention_mask"][row].sum() == 5]
    assert short and all(batch["input_ids"][row, :2].tolist() == [PAD, PAD] for row in short)


def test_batches_are_deterministic_and_follow_the_curriculum():
    records = [record([0, 1, 2, 3, 4, 5, 6, 7])] * 10
    curriculum = Curriculum(windows=(4, 8))
    batches = TrajectoryBatches(records, 5, 100, curriculum, MASK, PAD, seed=3)
    assert all(torch.equal(batches.batch(7)[key], batches.batch(7)[key]) for key in ("input_ids", "t"))
    assert batches.schedule(0) == (0.0, 4)
    assert batches.schedule(2) == (pytest.approx(0.016), 8)  # 10 records seen after 2 batches of 5: epoch 1
    assert batches.schedule(100)[0] == pytest.approx(0.8)
    late = batches.batch(90)
    assert (late["t"] >= batches.schedule(90)[0]).all() and (late["t"] <= 0.8).all()


def test_window_must_divide_canvas():
    with pytest.raises(ValueError, match="window 3 does not divide the 8-token canvas"):
        TrajectoryBatches([record(list(range(8)))], 2, 2, Curriculum(windows=(3,)), MASK, PAD, 0)


def test_certainty_forcing_is_tempered_entropy_on_correct_masked_positions():
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 3.0, 0.0], [1.0, 0.5, 0.0]]])
    targets = torch.tensor([[0, 0, 0]])
    masked = torch.tensor([[True, True, False]])
    # Only position 0 is masked and correct.
    p = torch.softmax(logits[0, 0] / 0.5, -1)
    expected = -(p * p.log()).sum().item()
    assert math.isclose(certainty_forcing_loss(logits, targets, masked, 0.5).item(), expected, rel_tol=1e-6)


def test_masked_ce_is_mean_over_all_masked_positions():
    logits = torch.tensor([[[0.0, 1.0], [2.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]])
    targets = torch.tensor([[1, 1], [0, 0]])
    masked = torch.tensor([[True, True], [False, True]])
    terms = [-torch.log_softmax(logits[b, i], -1)[targets[b, i]] for b, i in ((0, 0), (0, 1), (1, 1))]
    assert math.isclose(masked_ce(logits, targets, masked).item(), (sum(terms) / 3).item(), rel_tol=1e-6)
