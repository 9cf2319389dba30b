"""Teacher pretraining objectives: the AR anchor of the diffusion phase, and what each phase's checkpoints depend on."""

import math

import pytest
import torch

from distill.losses import loss_start, mask_block_after_prefix, mask_tokens
from distill.pretrain import ar_loss, diffusion_loss, pretrain_fingerprint
from distill.recipe import RecipeError, load_recipe
from tests.builders import right_padded_batch, tiny_teacher


def _batch(teacher) -> dict:
    prompt, response = teacher.encode_prompt("12+3").ids, teacher.encode_response("15")
    ids = torch.tensor([prompt + response, prompt + response[::-1]])
    response_mask = torch.zeros_like(ids)
    response_mask[:, len(prompt) :] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "response_mask": response_mask}


def test_anchored_diffusion_loss_adds_the_weighted_ar_loss_on_the_same_batch():
    torch.manual_seed(0)
    teacher = tiny_teacher(32, 64, 2, 4, 2, 64)
    batch = _batch(teacher)
    plain, plain_metrics = diffusion_loss(teacher, 1e-3, "uniform")(
        teacher.model, batch, torch.Generator().manual_seed(3)
    )
    anchored, metrics = diffusion_loss(teacher, 1e-3, "uniform", ar_anchor_weight=0.5)(
        teacher.model, batch, torch.Generator().manual_seed(3)
    )
    ar, _ = ar_loss(teacher)(teacher.model, batch, None)
    assert "ar_ce" not in plain_metrics and math.isclose(metrics["ar_ce"], ar.item(), rel_tol=1e-6)
    assert math.isclose(metrics["diffusion_ce"], plain.item(), rel_tol=1e-6)
    assert math.isclose(anchored.item(), plain.item() + 0.5 * ar.item(), rel_tol=1e-5)
    anchored.backward()  # both terms reach the weights
    assert all(p.grad is not None for p in teacher.model.parameters() if p.requires_grad)


def _full_width_ce(logits, targets, positions):
    """`[B]` sums of the float32 CE at `positions` over every column: the losses before the forward was cut."""
    ce = -torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    return (ce * positions).sum(-1)


def test_both_phases_scored_from_the_first_response_column_equal_their_full_width_values():
    torch.manual_seed(0)
    teacher = tiny_teacher(32, 64, 2, 4, 2, 64)
    # Right-padded `[prompt | response]` rows (as `SequencePool` builds them) with prompts of different lengths.
    batch = right_padded_batch(teacher)
    ids, attention, response_mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    prompts = [int(row.argmax()) for row in response_mask]  # each row's first response column
    assert len(set(prompts)) == 2 and loss_start(batch["response_mask"]) == min(prompts) > 0

    ar, metrics = ar_loss(teacher)(teacher.model, batch, None)
    causal = teacher.forward(ids, attention, causal=True)
    expected = _full_width_ce(causal, ids, response_mask).sum() / response_mask.sum()
    assert math.isclose(ar.item(), expected.item(), rel_tol=1e-5) and metrics["ar_ce"] == ar.item()

    for weighting in ("inverse_t", "uniform"):
        loss, metrics = diffusion_loss(teacher, 0.5, weighting)(teacher.model, batch, torch.Generator().manual_seed(3))
        noisy, masked, t = mask_tokens(ids, response_mask, teacher.mask_token_id, 0.5, torch.Generator().manual_seed(3))
        assert masked.any()
        sums = _full_width_ce(teacher.forward(noisy, attention, causal=False), ids, masked)
        count = response_mask.sum(-1) * t if weighting == "inverse_t" else masked.sum(-1).clamp(min=1)
        per_sample = sums / count
        assert math.isclose(loss.item(), per_sample.mean().item(), rel_tol=1e-5), weighting
        assert metrics["masked_fraction"] == (masked.sum() / response_mask.sum()).item()


def test_prefix_rows_are_noised_as_a_block_decoder_sees_them_and_scored_on_their_block():
    torch.manual_seed(0)
    teacher = tiny_teacher(32, 64, 2, 4, 2, 64)
    batch = right_padded_batch(teacher)
    ids, attention, response_mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    loss, metrics = diffusion_loss(teacher, 0.01, "uniform", prefix_fraction=0.5, prefix_block=2)(
        teacher.model, batch, torch.Generator().manual_seed(5)
    )
    # Row 0 is the prefix row: its noise is drawn after the uniform draw of the whole batch, from the same generator.
    generator = torch.Generator().manual_seed(5)
    noisy, masked, _ = mask_tokens(ids, response_mask, teacher.mask_token_id, 0.01, generator)
    block = mask_block_after_prefix(ids[:1], response_mask[:1], teacher.mask_token_id, 0.01, 2, generator)
    noisy[:1], masked[:1] = block[0], block[1]
    scored = masked.clone()
    scored[:1] = block[2]
    sums = _full_width_ce(teacher.forward(noisy, attention, causal=False), ids, scored)
    expected = (sums / scored.sum(-1).clamp(min=1)).mean()
    assert math.isclose(loss.item(), expected.item(), rel_tol=1e-5)
    assert metrics["masked_fraction"] == (masked.sum() / response_mask.sum()).item()
    with pytest.raises(RecipeError, match="prefix_fraction needs loss_weighting 'uniform'"):
        load_recipe(
            "recipes/benchmark.yaml",
            ["teacher.pretrain.prefix_fraction=0.5", "teacher.pretrain.loss_weighting=inverse_t"],
        )


def test_changing_the_diffusion_objective_keeps_the_ar_phase_and_restarts_the_diffusion_phase():
    base = load_recipe("recipes/benchmark.yaml", [])
    for override in [
        "teacher.pretrain.ar_anchor_weight=0.0",
        "teacher.pretrain.mask_eps=0.01",
        "teacher.pretrain.prefix_fraction=0.5",
    ]:
        changed = load_recipe("recipes/benchmark.yaml", [override])
        assert pretrain_fingerprint(changed, "ar") == pretrain_fingerprint(base, "ar"), override
        assert pretrain_fingerprint(changed, "diffusion") != pretrain_fingerprint(base, "diffusion"), override
    # The diffusion phase starts from the AR phase's weights: an AR change restarts both.
    changed = load_recipe("recipes/benchmark.yaml", ["teacher.pretrain.ar.lr=1e-3"])
    assert pretrain_fingerprint(changed, "diffusion") != pretrain_fingerprint(base, "diffusion")
    changed = load_recipe("recipes/benchmark.yaml", ["data.tasks.0.max_value=40"])
    assert pretrain_fingerprint(changed, "ar") != pretrain_fingerprint(base, "ar")
