"""The one decoding engine: every diffusion decoder of fewstep, used by trajectory generation and evaluation.

A decoder starts from `[prompt | MASK x gen_length]` and, at each forward pass (a *step*), commits some masked
response positions. Decoders are small functions in the `DECODERS` dict; they only choose *which* positions to
commit at each step. The shared loop around them (`decode`) owns everything else, so it is defined once:

- prompts are left-padded into one batch; the teacher interface supplies aligned logits (no backbone branches);
- a sample is *finished* as soon as it has a committed EOS with every position before it committed (its answer
  can no longer change) or nothing is masked; finished samples leave the batch, the rest of their canvas is
  filled with EOS, and they stop counting forward passes;
- counting: NFE = forward passes a sample took part in; generated tokens = response tokens before the first EOS
  (EOS excluded); TPF = generated tokens / NFE;
- `order[b, j]` is the step (0-based, per sample) at which response position j was committed, -1 if it was
  filled by the EOS rule: the record trajectory generation keeps.

Decoders here:
- `low_confidence`: fixed-step remasking as in LLaDA's `generate`: the canvas is split into semi-autoregressive
  blocks, `steps` are split evenly over blocks, and at each step the k most confident masked positions of the
  current block are committed (k from an even split of the block's masks over its steps). Positions past the
  current block are never chosen. `remasking="random"` ranks by uniform noise instead of confidence.
  steps = gen_length gives exactly one token per forward; block_length = 1 with a causal model is plain
  autoregressive decoding (the AR baseline).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from distill.recipe import DecoderConfig
from teachers.interface import Teacher


@dataclass
class DecodeResult:
    """Outputs of one batched decode. All tensors are on CPU."""

    tokens: torch.Tensor  # [B, gen_length] response token ids
    order: torch.Tensor  # [B, gen_length] step at which each position was committed, -1 if EOS-filled
    nfe: torch.Tensor  # [B] forward passes each sample took part in
    generated: torch.Tensor  # [B] response tokens before the first EOS

    @property
    def tpf(self) -> torch.Tensor:
        """Tokens per forward, per sample."""
        return self.generated.float() / self.nfe.clamp(min=1).float()


@dataclass
class StepState:
    """What a decoder sees at one step, restricted to the samples still decoding."""

    logits: torch.Tensor  # [b, gen_length, V] aligned logits of the response positions
    masked: torch.Tensor  # [b, gen_length] True where still masked
    step: torch.Tensor  # [b] steps this sample has taken so far
    generator: torch.Generator | None


# A decoder returns (candidate tokens [b, L], positions to commit [b, L] bool); it must commit >= 1 masked
# position per sample per step or the loop stops it with an error (a decoder that stalls would never end).
Decoder = Callable[[StepState, DecoderConfig, int], tuple[torch.Tensor, torch.Tensor]]


def sample_tokens(
    logits: torch.Tensor, temperature: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate token and its probability per position: greedy at temperature 0, else Gumbel-max sampling."""
    probs = torch.softmax(logits.float(), dim=-1)
    if temperature <= 0:
        confidence, tokens = probs.max(dim=-1)
        return tokens, confidence
    # Gumbel-max in float64, as LLaDA does, because low-precision Gumbel noise degrades sample quality.
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device="cpu").to(logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20)))
    tokens = (logits.double() / temperature + gumbel).argmax(dim=-1)
    return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)


def low_confidence(state: StepState, config: DecoderConfig, gen_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    block_length = config.block_length or gen_length
    steps_per_block = (config.steps or gen_length) // (gen_length // block_length)
    tokens, confidence = sample_tokens(state.logits, config.temperature, state.generator)
    if config.remasking == "random":
        confidence = torch.rand(confidence.shape, generator=state.generator, device="cpu").to(confidence.device)
    block = torch.div(state.step, steps_per_block, rounding_mode="floor")  # [b] current block per sample
    steps_left = steps_per_block - (state.step - block * steps_per_block)
    positions = torch.arange(gen_length, device=state.masked.device)[None, :]
    start = (block * block_length)[:, None]
    candidates = state.masked & (positions >= start) & (positions < start + block_length)
    # Ceil-dividing what is left over the steps left reproduces LLaDA's even split of the block's masks
    # (remainder to the first steps) without keeping per-block state.
    remaining = candidates.sum(-1)
    count = torch.div(remaining + steps_left - 1, steps_left, rounding_mode="floor")
    confidence = torch.where(candidates, confidence, torch.full_like(confidence, -torch.inf))
    rank = confidence.argsort(dim=-1, descending=True).argsort(dim=-1)
    return tokens, candidates & (rank < count[:, None])


DECODERS: dict[str, Decoder] = {"low_confidence": low_confidence}


def check_config(config: DecoderConfig, gen_length: int) -> None:
    """Reject decoder settings whose block/step split is not whole (one-line ValueError)."""
    block_length = config.block_length or gen_length
    steps = config.steps or gen_length
    if gen_length % block_length:
        raise ValueError(f"decoder: gen_length {gen_length} is not a multiple of block_length {block_length}")
    blocks = gen_length // block_length
    if steps % blocks:
        raise ValueError(f"decoder: steps {steps} is not a multiple of the number of blocks {blocks}")
    if steps > gen_length:
        raise ValueError(f"decoder: steps {steps} exceeds gen_length {gen_length}")


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompt ids into `[B, P]` ids and attention mask (so every response starts at column P)."""
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def finished_rows(response: torch.Tensor, masked: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B] True where the answer is settled: nothing masked, or a committed EOS with no mask before it."""
    is_eos = (response == eos_id) & ~masked
    no_eos = torch.full((response.shape[0],), -1, dtype=torch.long, device=response.device)
    first_eos = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), no_eos)
    positions = torch.arange(response.shape[1], device=response.device)[None, :]
    masked_before = (masked & (positions < first_eos[:, None])).any(-1)
    return ~masked.any(-1) | ((first_eos >= 0) & ~masked_before)


@torch.no_grad()
def decode(
    teacher: Teacher,
    prompts: list[list[int]],
    config: DecoderConfig,
    gen_length: int,
    generator: torch.Generator | None = None,
) -> DecodeResult:
    """Decode a batch of prompt id lists with the decoder named in `config`."""
    if config.name not in DECODERS:
        raise ValueError(f"decoder: unknown name '{config.name}' (known: {', '.join(DECODERS)})")
    check_config(config, gen_length)
    decoder = DECODERS[config.name]
    device = teacher.device
    prompt_ids, prompt_mask = left_pad(prompts, teacher.pad_token_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    batch, prompt_len = prompt_ids.shape
    mask_id, eos_id = teacher.mask_token_id, teacher.eos_token_id

    response = torch.full((batch, gen_length), mask_id, dtype=torch.long, device=device)
    order = torch.full((batch, gen_length), -1, dtype=torch.long, device=device)
    nfe = torch.zeros(batch, dtype=torch.long, device=device)
    active = torch.ones(batch, dtype=torch.bool, device=device)
    response_mask = torch.ones((batch, gen_length), dtype=torch.long, device=device)

    while active.any():
        rows = active.nonzero().squeeze(-1)
        ids = torch.cat([prompt_ids[rows], response[rows]], dim=1)
        attention = torch.cat([prompt_mask[rows], response_mask[rows]], dim=1)
        logits = teacher.forward(ids, attention)[:, prompt_len:]
        logits[..., mask_id] = -torch.inf  # the mask token is never a valid answer token
        masked = response[rows] == mask_id
        state = StepState(logits=logits, masked=masked, step=nfe[rows], generator=generator)
        tokens, commit = decoder(state, config, gen_length)
        commit &= masked
        if not commit.any(-1).all():
            raise RuntimeError(f"decoder '{config.name}' committed no token for some sample at a step")
        response[rows] = torch.where(commit, tokens, response[rows])
        order[rows] = torch.where(commit, nfe[rows][:, None].expand_as(commit), order[rows])
        nfe[rows] += 1
        done = finished_rows(response[rows], response[rows] == mask_id, eos_id)
        active[rows[done]] = False

    # Finished early: whatever is still masked lies after the answer's EOS.
    response = torch.where(response == mask_id, torch.full_like(response, eos_id), response)
    is_eos = response == eos_id
    generated = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full_like(nfe, gen_length))
    return DecodeResult(tokens=response.cpu(), order=order.cpu(), nfe=nfe.cpu(), generated=generated.cpu())
