"""Teacher pretraining objectives: the AR anchor of the diffusion phase, and what each phase's checkpoints depend on."""

import math

import torch

from distill.pretrain import ar_loss, diffusion_loss, pretrain_fingerprint
from distill.recipe import load_recipe
from tests.builders import tiny_teacher


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


def test_changing_the_diffusion_objective_keeps_the_ar_phase_and_restarts_the_diffusion_phase():
    base = load_recipe("recipes/benchmark.yaml", [])
    for override in ["teacher.pretrain.ar_anchor_weight=0.0", "teacher.pretrain.mask_eps=0.01"]:
        changed = load_recipe("recipes/benchmark.yaml", [override])
        assert pretrain_fingerprint(changed, "ar") == pretrain_fingerprint(base, "ar"), override
        assert pretrain_fingerprint(changed, "diffusion") != pretrain_fingerprint(base, "diffusion"), override
    # The diffusion phase starts from the AR phase's weights: an AR change restarts both.
    changed = load_recipe("recipes/benchmark.yaml", ["teacher.pretrain.ar.lr=1e-3"])
    assert pretrain_fingerprint(changed, "diffusion") != pretrain_fingerprint(base, "diffusion")
    changed = load_recipe("recipes/benchmark.yaml", ["data.tasks.0.max_value=40"])
    assert pretrain_fingerprint(changed, "ar") != pretrain_fingerprint(base, "ar")
