"""Training objectives, one function each, on logits aligned so that position i scores token i.

Shapes: `logits [B, T, V]`, `targets [B, T]` token ids, masks `[B, T]` (bool or 0/1).

Memory. At a 150k vocabulary the logits and the float32 tensors computed from them dominate a step's memory. So
callers score only the columns from `loss_start(mask)` on (`Teacher.forward(start=...)`): every loss position lies
in the response, and a prompt of any length then adds nothing to the logits. The functions below take those
`[B, W, V]` logits with targets and masks sliced the same way (`[:, start:]`), and compute each per-position term
in chunks of positions (`per_position`), so the float32 intermediates kept for the backward are a chunk's, not
`[B, W, V]` ones (peaks measured in tests/distill/test_memory.py).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def loss_start(loss_mask: torch.Tensor) -> int:
    """The first column of `loss_mask` `[B, T]` holding a loss position in any row (0 when none does).

    Left-padded batches (d3LLM trajectories) give `T - L`, L the canvas width; right-padded ones (`SequencePool`)
    the shortest prompt's length. A host sync: the column is a Python int for slicing.
    """
    return int(loss_mask.bool().any(0).int().argmax())


CHUNKS = 8  # position chunks of a loss over logits: its float32 intermediates are 1/8 of the logits' size


def chunk_size(width: int) -> int:
    """Positions per chunk for `width` positions: `ceil(width / CHUNKS)`, at least 1."""
    return max(1, -(-width // CHUNKS))


def per_position(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> torch.Tensor:
    """`fn` over chunks of positions, `[B, W, ...]` inputs -> `[B, W]`: `fn(*(t[:, chunk] for t in tensors))` gives
    `[B, c]` per chunk, concatenated.

    Why: a per-position loss on `[B, W, V]` logits keeps `[B, W, V]` float32 intermediates (log-softmax, its exp)
    from its forward to the backward, several times the size of bf16 logits. Each chunk runs under activation
    checkpointing, so only its inputs are kept, and its intermediates, recomputed in the backward, are `[B, c, V]`.
    `fn` must draw no random numbers (its RNG state is not replayed).
    """
    size = chunk_size(tensors[0].shape[1])
    chunks = zip(*(tensor.split(size, dim=1) for tensor in tensors), strict=True)
    values = [checkpoint(fn, *chunk, use_reentrant=False, preserve_rng_state=False) for chunk in chunks]
    return torch.cat(values, dim=1)


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Upcast (a chunk) first: on bf16 logits F.cross_entropy returns bf16 values, up to 0.06 nats off at ~15.
    return F.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")


def token_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """CE of each position in float32, `[B, W, V], [B, W] -> [B, W]`, chunked (`per_position`); every CE term's."""
    return per_position(_cross_entropy, logits, targets)


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """Autoregressive CE, mean over `loss_mask` positions.

    With causal attention and aligned logits, position i's logits only saw tokens < i, so
    `CE(logits_i, x_i)` is next-token prediction (Dimple's autoregressive phase).
    """
    loss_mask = loss_mask.bool()
    per_token = token_cross_entropy(logits, targets)
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


def mask_block_after_prefix(
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    mask_token_id: int,
    eps: float,
    block: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise each row as a block decoder sees its canvas mid-answer: a clean prefix, a block, a masked future.

    Per row a cut c ~ U{0..|response|-1} and t ~ U[eps, 1]: response tokens before c stay clean, the `block` tokens
    from c are masked w.p. t (token c always, so the block is never done), every token after the block is masked.
    Returns `(noisy_ids, masked, scored, t)`: `scored` is the block's masked tokens, the ones a block decoder
    commits from this state; the masked future is input only. Why: under `mask_tokens` the state a decoder puts a
    token in (everything before it known, everything after it masked) is rare, and much of a token's loss can be
    met from its right (in chain arithmetic each result reappears as the next step's operand and in the
    `#### answer`); these rows train that state directly. Noise is drawn on CPU.
    """
    batch, length = input_ids.shape
    device = input_ids.device
    response = response_mask.bool()
    rank = (response.long().cumsum(-1) - 1).cpu()  # each response token's index in its answer
    lengths = response.sum(-1).cpu()
    t = eps + (1 - eps) * torch.rand(batch, generator=generator)
    cut = (torch.rand(batch, generator=generator) * lengths).long().clamp(max=(lengths - 1).clamp(min=0))
    draws = torch.rand(batch, length, generator=generator)
    in_block = (rank >= cut[:, None]) & (rank < cut[:, None] + block)
    scored = in_block & ((draws < t[:, None]) | (rank == cut[:, None]))
    masked = scored | (rank >= cut[:, None] + block)
    scored, masked = scored.to(device) & response, masked.to(device) & response
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return noisy, masked, scored, t.to(device)


def mask_for_diffusion(
    input_ids: torch.Tensor,
    response_mask: torch.Tensor,
    mask_token_id: int,
    eps: float,
    generator: torch.Generator,
    prefix_fraction: float = 0.0,
    prefix_block: int = 8,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The masked-diffusion noise of a batch: `(noisy_ids, masked, scored, t)`.

    Every row by `mask_tokens` (scored where masked), then the first `round(prefix_fraction * B)` rows replaced by
    `mask_block_after_prefix` (scored on their block), drawn after the uniform draw from the same generator.
    """
    noisy, masked, t = mask_tokens(input_ids, response_mask, mask_token_id, eps, generator)
    rows = round(prefix_fraction * input_ids.shape[0])
    if not rows:
        return noisy, masked, masked, t
    block = mask_block_after_prefix(input_ids[:rows], response_mask[:rows], mask_token_id, eps, prefix_block, generator)
    whole = (noisy, masked, masked, t)
    return tuple(torch.cat([part, rest[rows:]]) for part, rest in zip(block, whole, strict=True))


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
    per_token = token_cross_entropy(logits, targets)
    masked_sum = (per_token * masked).sum(-1)
    if weighting == "inverse_t":
        per_sample = masked_sum / t / response_mask.sum(-1).clamp(min=1)
    elif weighting == "uniform":
        per_sample = masked_sum / masked.sum(-1).clamp(min=1)
    else:
        raise ValueError(f"unknown loss weighting '{weighting}' (inverse_t or uniform)")
    return per_sample.mean()


# ----------------------------------------------------------------------------------------------------------------
# SDTT divergences (Deschenaux & Gulcehre): student distribution p_s = softmax(student logits) against a teacher
# target given as log-probabilities log p_t. Each returns the per-position divergence `[...]` for inputs
# `[..., V]`; `distill.sdtt.sdtt_loss` averages it over the masked positions. Teacher log-probs must be finite
# wherever the student has mass (the targets of `distill.sdtt.sdtt_targets` are finite everywhere).


def reverse_kl(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """Reverse KL, `KL(p_s || p_t) = sum_v p_s(v) (log p_s(v) - log p_t(v))`; `[..., V], [..., V] -> [...]`.

    Mode-seeking: the student is penalised for mass where the teacher has little. SDTT's best divergence as the
    number of sampling steps drops.
    """
    student_log_probs = F.log_softmax(student_logits.float(), dim=-1)
    return (student_log_probs.exp() * (student_log_probs - teacher_log_probs.float())).sum(-1)


def forward_kl(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """Forward KL, `KL(p_t || p_s) = sum_v p_t(v) (log p_t(v) - log p_s(v))`; `[..., V], [..., V] -> [...]`.

    Mass-covering. Tokens the teacher gives probability 0 (log-prob -inf) contribute 0 (0 log 0 = 0).
    """
    student_log_probs = F.log_softmax(student_logits.float(), dim=-1)
    teacher_log_probs = teacher_log_probs.float()
    teacher_probs = teacher_log_probs.exp()
    terms = teacher_probs * (teacher_log_probs - student_log_probs)
    return torch.where(teacher_probs > 0, terms, torch.zeros_like(terms)).sum(-1)


def log_prob_mse(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """Mean squared error of log-probabilities, `(1/V) sum_v (log p_s(v) - log p_t(v))^2`; `[..., V] -> [...]`."""
    student_log_probs = F.log_softmax(student_logits.float(), dim=-1)
    return (student_log_probs - teacher_log_probs.float()).pow(2).mean(-1)


def total_variation(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """Total variation distance of the probabilities, `(1/2) sum_v |p_s(v) - p_t(v)|` in [0, 1]; `[..., V] -> [...]`.

    Computed on probabilities, not logits or log-probs (SDTT's TVD is a distance between distributions).
    """
    student_probs = torch.softmax(student_logits.float(), dim=-1)
    return 0.5 * (student_probs - teacher_log_probs.float().exp()).abs().sum(-1)


def masked_ce(logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Mean CE over masked positions of the whole batch (d3LLM's pseudo-trajectory and complementary CE).

    `logits [B, T, V]`, `targets [B, T]`, `masked [B, T]`; 0 when nothing is masked.
    """
    masked = masked.bool()
    per_token = token_cross_entropy(logits, targets)
    return (per_token * masked).sum() / masked.sum().clamp(min=1)


def certainty_forcing_loss(
    logits: torch.Tensor, targets: torch.Tensor, masked: torch.Tensor, temperature: float = 0.5
) -> torch.Tensor:
    """Certainty forcing (dParallel): mean entropy of softmax(logits / T) on masked positions already correct.

    `H_i = -sum_v p_iv log p_iv` with `p_i = softmax(z_i / T)`, averaged over masked positions whose argmax equals
    the target. Minimising it sharpens predictions the student already gets right, so more of them pass a
    confidence threshold in the same forward; wrong positions are left to the CE terms. T = 0.5 by default.
    """
    correct = masked.bool() & (logits.argmax(-1) == targets)
    entropy = per_position(partial(_tempered_entropy, temperature=temperature), logits)
    return (entropy * correct).sum() / correct.sum().clamp(min=1)


def _tempered_entropy(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    return -(log_probs.exp() * log_probs).sum(-1)
