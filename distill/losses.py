"""Training objectives, one function each, on logits aligned so that position i scores token i.

Shapes: `logits [B, T, V]`, `targets [B, T]` token ids, masks `[B, T]` (bool or 0/1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Autoregressive CE, mean over `loss_mask` positions.

    With causal attention and aligned logits, position i's logits only saw tokens < i, so
    `CE(logits_i, x_i)` is next-token prediction (Dimple's autoregressive phase).
    """
    loss_mask = loss_mask.bool()
    per_token = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return (per_token * loss_mask).sum() / loss_mask.sum().clamp(min=1)


def mask_tokens(
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    mask_token_id: int,
    eps: float,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Forward process of masked diffusion: t ~ U[eps, 1] per sample, each response token masked w.p. t.

    Returns `(noisy_ids [B, T], masked [B, T] bool, t [B])`. Noise is drawn on CPU from `generator` so a run is
    reproducible on any device.
    """
    batch, length = input_ids.shape
    t = eps + (1 - eps) * torch.rand(batch, generator=generator)
    draws = torch.rand(batch, length, generator=generator)
    masked = (draws < t[:, None]).to(input_ids.device) & response_mask.bool()
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return noisy, masked, t.to(input_ids.device)


def masked_diffusion_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    masked: torch.Tensor,
    t: torch.Tensor,
    response_mask: torch.Tensor,
    weighting: str = "inverse_t",
) -> torch.Tensor:
    """Masked-diffusion CE on masked positions, averaged over the batch.

    - `inverse_t`: the ELBO form (LLaDA Eq. 3): `(1/t) * sum_masked CE / |response|` per sample. Unbiased, but a
      sample noised with small t carries a large weight, so gradients are noisy.
    - `uniform`: `sum_masked CE / |masked|` per sample, the plain mean over masked tokens. Lower-variance; in a
      probe on the tiny teacher's 3-digit addition it was ahead after 800 diffusion steps (82.5% vs 67.5% exact
      match) and level with `inverse_t` by 1200 (98.5% vs 97.5%).

    `t [B]` is the masking probability each sample was noised with.
    """
    masked = masked.bool()
    per_token = F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    masked_sum = (per_token * masked).sum(-1)
    if weighting == "inverse_t":
        per_sample = masked_sum / t / response_mask.sum(-1).clamp(min=1)
    elif weighting == "uniform":
        per_sample = masked_sum / masked.sum(-1).clamp(min=1)
    else:
        raise ValueError(f"unknown loss weighting '{weighting}' (inverse_t or uniform)")
    return per_sample.mean()
