"""Teacher pretraining in Dimple's paradigm: an autoregressive phase, then a masked-diffusion phase.

1. AR phase: causal attention, next-token CE on response tokens. Its weights are saved as `ar-baseline` (with
   `causal: true` in its config), the autoregressive model that speed comparisons use.
2. Diffusion phase, continuing from the AR weights: full attention; t ~ U[mask_eps, 1]; every response token
   (answer padding included) masked with probability t; CE on masked tokens (`loss_weighting`: their mean, or
   LLaDA's 1/t weighting). With `ar_anchor_weight` > 0 each step also takes the AR phase's next-token loss (causal
   attention, same weights) at that weight. Why: switched to full attention over masks, the converged AR model
   starts the diffusion phase at a loss of ~5 nats and relearns slowly; on chain-of-thought arithmetic the pure
   diffusion phase lost a third of the AR accuracy in 1,500 steps, and the anchor keeps the computation the AR
   phase learned (numbers in `docs/benchmark.md`). With `prefix_fraction` > 0 that share of each batch is noised
   as a block decoder sees its canvas mid-answer (`mask_block_after_prefix`): under uniform masking a token is
   rarely seen with everything before it known and everything after it masked, the state decoding puts it in, and
   a masked result can often be read from a later copy of it; the block rows train computing it (chain
   arithmetic: 92.5% -> 96.5% at one token per forward, against the AR baseline's 99.5%).

Both phases run on the one DeepSpeed trainer with their own `TrainConfig` (`teacher.pretrain.ar` and
`teacher.pretrain.diffusion`), so they checkpoint and resume independently.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from distill.data import SequencePool, encode_records
from distill.losses import (
    loss_start,
    mask_for_diffusion,
    masked_diffusion_loss,
    next_token_loss,
)
from distill.ranks import current_rank
from distill.recipe import Recipe, TrainConfig
from distill.trainer import RESUME_SAFE_FIELDS, LossFn, Trainer
from students.build import set_vision_training
from teachers.interface import Teacher, new_teacher, save_teacher
from teachers.vision import vision_of


def ar_loss(teacher: Teacher) -> LossFn:
    """Next-token CE on the response tokens under causal attention, logged as `ar_ce`.

    Only the columns from the first response token on are scored (`loss_start`): rows are right-padded
    `[prompt | response]`, so that is the shortest prompt's length, and no prompt position carries a loss.
    """

    def loss_fn(model, batch, generator):
        start = loss_start(batch["response_mask"])
        logits = teacher.with_model(model).forward(
            batch["input_ids"], batch["attention_mask"], causal=True, start=start, **vision_of(batch)
        )
        loss = next_token_loss(logits, batch["input_ids"][:, start:], batch["response_mask"][:, start:])
        return loss, {"ar_ce": loss.item()}

    return loss_fn


def diffusion_loss(
    teacher: Teacher,
    eps: float,
    weighting: str,
    ar_anchor_weight: float = 0.0,
    prefix_fraction: float = 0.0,
    prefix_block: int = 8,
) -> LossFn:
    """Masked-diffusion CE on the noised response tokens (`masked_diffusion_loss` with `weighting`), plus
    `ar_anchor_weight` times `ar_loss`; logs `diffusion_ce` and `masked_fraction` (and `ar_ce` when anchored).

    The first `round(prefix_fraction * B)` rows of each batch are noised as a block decoder sees its canvas
    and scored on their block only (`mask_for_diffusion`); the rest are noised uniformly.
    Scores the columns from the first response token on, as `ar_loss` does; the noise is drawn at full width.
    """
    anchor = ar_loss(teacher) if ar_anchor_weight > 0 else None

    def loss_fn(model, batch, generator):
        ids, response_mask = batch["input_ids"], batch["response_mask"]
        noisy, masked, scored, t = mask_for_diffusion(
            ids, response_mask, teacher.mask_token_id, eps, generator, prefix_fraction, prefix_block
        )
        start = loss_start(response_mask)
        logits = teacher.with_model(model).forward(
            noisy, batch["attention_mask"], causal=False, start=start, **vision_of(batch)
        )
        loss = masked_diffusion_loss(logits, ids[:, start:], scored[:, start:], t, response_mask[:, start:], weighting)
        metrics = {"diffusion_ce": loss.item(), "masked_fraction": (masked.sum() / response_mask.sum()).item()}
        if anchor is not None:
            anchor_loss, anchor_metrics = anchor(model, batch, generator)
            loss = loss + ar_anchor_weight * anchor_loss
            metrics |= anchor_metrics
        return loss, metrics

    return loss_fn


def pretrain_fingerprint(recipe: Recipe, phase: str) -> str:
    """What a pretraining phase's checkpoints depend on besides its own TrainConfig: the data, the model sizes and
    the seed; for the diffusion phase also its objective and the AR phase it starts from (so changing the
    diffusion objective keeps the AR phase's checkpoints)."""
    spec = recipe.teacher.pretrain
    payload = {
        "data": recipe.data.model_dump(mode="json"),
        "model": spec.model.model_dump(mode="json"),
        "seed": recipe.run.seed,
    }
    if recipe.teacher.name == "dimple":
        payload["train_vision"] = spec.train_vision
    if phase == "diffusion":
        payload["objective"] = [spec.mask_eps, spec.loss_weighting, spec.ar_anchor_weight]
        if spec.prefix_fraction:  # absent at 0, so the caches of recipes without it keep their keys
            payload["objective"] += [spec.prefix_fraction, spec.prefix_block]
        payload["ar"] = spec.ar.model_dump(mode="json", exclude=RESUME_SAFE_FIELDS - {"max_steps"})
    return json.dumps(payload, sort_keys=True)


def _train_phase(
    teacher: Teacher, recipe: Recipe, config: TrainConfig, phase: str, loss_fn, examples, out_dir: Path
) -> None:
    if config.max_steps == 0:
        return
    pool = SequencePool(
        examples,
        micro_batch_size=config.micro_batch_size,
        max_response_tokens=recipe.data.max_response_tokens,
        pad_id=teacher.pad_token_id,
        seed=recipe.run.seed,
        rank=current_rank(),
        vision_fn=teacher.vision_inputs,
    )
    trainer = Trainer(
        teacher.model,
        config,
        out_dir / f"pretrain-{phase}",
        loss_fn,
        pool.batch,
        run_name=f"{recipe.run.name}-{phase}",
        logging=recipe.logging,
        seed=recipe.run.seed,
        phase=phase,
        fingerprint=pretrain_fingerprint(recipe, phase),
    )
    trainer.train()
    state = trainer.full_state_dict()
    if current_rank() == 0:
        teacher.model.load_state_dict(state)


def pretrain_teacher(recipe: Recipe, train_records: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """Pretrain a tiny teacher of the recipe's backbone; returns `(teacher_dir, ar_baseline_dir)` under `out_dir`."""
    spec = recipe.teacher.pretrain
    torch.manual_seed(recipe.run.seed)
    teacher = new_teacher(recipe.teacher.name, spec.model.model_dump())
    set_vision_training(teacher.model, spec.train_vision)
    examples = encode_records(teacher, train_records, recipe.data.max_response_tokens)
    teacher_dir, ar_dir = out_dir / "teacher", out_dir / "ar-baseline"

    # ---- autoregressive phase -----------------------------------------------------------------------------
    _train_phase(teacher, recipe, spec.ar, "ar", ar_loss(teacher), examples, out_dir)
    if current_rank() == 0:
        teacher.model.config.causal = True
        save_teacher(teacher, ar_dir)
        teacher.model.config.causal = False

    # ---- diffusion phase ----------------------------------------------------------------------------------
    loss_fn = diffusion_loss(
        teacher, spec.mask_eps, spec.loss_weighting, spec.ar_anchor_weight, spec.prefix_fraction, spec.prefix_block
    )
    _train_phase(teacher, recipe, spec.diffusion, "diffusion", loss_fn, examples, out_dir)
    if current_rank() == 0:
        save_teacher(teacher, teacher_dir)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return teacher_dir, ar_dir
