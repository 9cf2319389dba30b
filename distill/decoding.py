"""The one decoding engine: every diffusion decoder of fewstep, used by trajectory generation and evaluation.

A decoder starts from `[prompt | MASK x gen_length]` and, at each forward pass (a *step*), commits some masked
response positions. Decoders are small functions in the `DECODERS` dict; they only choose *which* positions to
commit at each step, given a `StepState`. The shared loop around them (`decode`) owns everything else, so it is
defined once (the file runs past 400 lines on purpose: every decoder and the loop they share, in one place):

- prompts are left-padded into one batch; the teacher interface supplies aligned logits (no backbone branches);
- structure priors (`pins`, `fixed_length`) are committed before the first step;
- a sample is *finished* as soon as it has a committed EOS with every position before it committed (its answer
  can no longer change) or nothing is masked; finished samples leave the batch, the rest of their canvas is
  filled with EOS, and they stop counting forward passes;
- counting: NFE = forward passes a sample took part in; generated tokens = response tokens before the first EOS
  (EOS and pinned prior tokens excluded); TPF = generated tokens / NFE;
- `order[b, j]` is the step (0-based, per sample) at which response position j was committed, -1 if no forward
  committed it (filled by the EOS rule or pinned by a prior): the record trajectory generation keeps;
- blocks: the canvas is split into `block_length` blocks; a sample's *current block* is its first block that
  still has a masked position, and `block_step` counts the forwards it has spent there;
- the KV cache (`config.cache`): `prompt` encodes the prompt once with `Teacher.prefill` and afterwards
  re-encodes only the response (Dimple's prefilling); `blocks` also caches every finished leading block once it
  has been finished for `cache_delay` forwards, rebuilding the cache when that prefix grows (Fast-dLLM's block
  cache, d3LLM's delayed cache). One batch shares one cache, so its prefix is the shortest over the samples
  still decoding; samples that finish are sliced out of it. The step that builds or rebuilds the cache decodes
  from a full forward, as Dimple's first step and Fast-dLLM's first step of each block do (our teacher interface
  returns the cache from a separate prefill, so such a step encodes the prefix twice); so does every
  `refresh_every`-th forward (d3LLM's periodic full refresh). Each step counts one NFE whatever it encodes.
  With causal attention the cached and uncached paths compute the same logits. With bidirectional attention
  the cached prefix was encoded without the tokens after it, so its keys/values are not those a full forward
  would compute: the approximation Dimple and Fast-dLLM accept for speed.

Decoders here (settings in `distill.recipe.DecoderConfig`):
- `low_confidence`: fixed-step remasking as in LLaDA's `generate`: `steps` split evenly over blocks; at each step
  the k most confident masked positions of the current block are committed (k from an even split of the block's
  masks over its steps). Positions past the current block are never chosen. `remasking="random"` ranks by
  uniform noise instead. steps = gen_length gives exactly one token per forward; block_length = 1 with a causal
  model is plain autoregressive decoding (the AR baseline).
- `confident` (Dimple): commit every masked position of the current block whose confidence exceeds `threshold`;
  if none does (or at the block's last scheduled step), commit what the `low_confidence` schedule would, so at
  least one token is committed. Threshold 1.0 with probability confidence reduces to `low_confidence`.
- `threshold` (Fast-dLLM): commit every masked position of the current block whose confidence exceeds
  `threshold`, and always the most confident one.
- `multi_block` (d3LLM): several blocks decode at once. A block is active once the previous block is at least
  `activate_fraction` decoded and fully active once it is at least `full_activate_fraction` decoded; every masked
  position of an active block whose entropy is <= `threshold` is committed, and always the single lowest-entropy
  masked position of the fully active blocks. Positions in inactive blocks are never chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from distill.recipe import DecoderConfig
from teachers.interface import PrefixCache, Teacher


@dataclass
class DecodeResult:
    """Outputs of one batched decode. All tensors are on CPU."""

    tokens: torch.Tensor  # [B, gen_length] response token ids
    order: torch.Tensor  # [B, gen_length] step at which each position was committed, -1 if no forward did
    nfe: torch.Tensor  # [B] forward passes each sample took part in
    generated: torch.Tensor  # [B] response tokens before the first EOS, pinned tokens excluded

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
    block: torch.Tensor  # [b] current block: the first block with a masked position
    block_step: torch.Tensor  # [b] steps this sample has spent in its current block
    block_length: int
    generator: torch.Generator | None


# A decoder returns (candidate tokens [b, L], positions to commit [b, L] bool); it must commit >= 1 masked
# position per sample per step or the loop stops it with an error (a decoder that stalls would never end).
Decoder = Callable[[StepState, DecoderConfig, int], tuple[torch.Tensor, torch.Tensor]]


# ----------------------------------------------------------------------------------------------------------------
# Token choice and confidence


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    """Logits with everything outside the top-k tokens and outside the top-p nucleus set to -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)
        sorted_probs = torch.softmax(sorted_logits.float(), dim=-1)
        # Drop a token once the tokens ranked above it already reach top_p; the top token always stays.
        drop_sorted = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, sorted_ids, drop_sorted)
        logits = logits.masked_fill(drop, -torch.inf)
    return logits


def sample_tokens(
    logits: torch.Tensor, config: DecoderConfig, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate token per position and the filtered distribution `[..., V]` it was drawn from (temperature 1).

    Greedy at temperature 0, else Gumbel-max sampling at `config.temperature`.
    """
    logits = filter_logits(logits.float(), config.top_k, config.top_p)
    probs = torch.softmax(logits, dim=-1)
    if config.temperature <= 0:
        return probs.argmax(dim=-1), probs
    # Gumbel-max in float64, as LLaDA does, because low-precision Gumbel noise degrades sample quality.
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device="cpu").to(logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20)))
    return (logits.double() / config.temperature + gumbel).argmax(dim=-1), probs


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of each distribution `[..., V] -> [...]` (0 log 0 taken as 0)."""
    return -(probs * probs.clamp(min=1e-30).log()).sum(-1)


def confidence_of(probs: torch.Tensor, tokens: torch.Tensor, kind: str) -> torch.Tensor:
    """Confidence of each position: `probability` of its token, top-1 minus top-2 `margin`, or `neg_entropy`."""
    if kind == "probability":
        return probs.gather(-1, tokens[..., None]).squeeze(-1)
    if kind == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    return -entropy(probs)


def top_positions(score: torch.Tensor, candidates: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[b, L] True at the `count[b]` highest-scoring candidate positions of each row."""
    score = torch.where(candidates, score, torch.full_like(score, -torch.inf))
    rank = score.argsort(dim=-1, descending=True).argsort(dim=-1)
    return candidates & (rank < count[:, None])


def _current_block_candidates(state: StepState) -> torch.Tensor:
    positions = torch.arange(state.masked.shape[1], device=state.masked.device)[None, :]
    start = (state.block * state.block_length)[:, None]
    return state.masked & (positions >= start) & (positions < start + state.block_length)


def _schedule(state: StepState, config: DecoderConfig, gen_length: int, candidates: torch.Tensor):
    """LLaDA's count for this step and whether it is the block's last scheduled step: ([b] count, [b] bool)."""
    steps_per_block = (config.steps or gen_length) // (gen_length // state.block_length)
    # Past the schedule (cannot happen for low_confidence) the last step's rule applies: commit everything left.
    steps_left = (steps_per_block - state.block_step).clamp(min=1)
    # Ceil-dividing what is left over the steps left reproduces LLaDA's even split of the block's masks
    # (remainder to the first steps) without keeping per-block state.
    remaining = candidates.sum(-1)
    return torch.div(remaining + steps_left - 1, steps_left, rounding_mode="floor"), steps_left == 1


# ----------------------------------------------------------------------------------------------------------------
# Decoders


def low_confidence(state: StepState, config: DecoderConfig, gen_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, probs = sample_tokens(state.logits, config, state.generator)
    if config.remasking == "random":
        score = torch.rand(state.masked.shape, generator=state.generator, device="cpu").to(state.masked.device)
    else:
        score = confidence_of(probs, tokens, "probability")
    candidates = _current_block_candidates(state)
    count, _ = _schedule(state, config, gen_length, candidates)
    return tokens, top_positions(score, candidates, count)


def confident(state: StepState, config: DecoderConfig, gen_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, probs = sample_tokens(state.logits, config, state.generator)
    score = confidence_of(probs, tokens, config.confidence)
    candidates = _current_block_candidates(state)
    above = candidates & (score > config.threshold)
    count, last_step = _schedule(state, config, gen_length, candidates)
    use_threshold = above.any(-1) & ~last_step
    return tokens, torch.where(use_threshold[:, None], above, top_positions(score, candidates, count))


def threshold_parallel(state: StepState, config: DecoderConfig, gen_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, probs = sample_tokens(state.logits, config, state.generator)
    score = confidence_of(probs, tokens, config.confidence)
    candidates = _current_block_candidates(state)
    best = top_positions(score, candidates, torch.ones_like(state.block))
    return tokens, (candidates & (score > config.threshold)) | best


def multi_block(state: StepState, config: DecoderConfig, gen_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, probs = sample_tokens(state.logits, config, state.generator)
    uncertainty = entropy(probs)
    batch, length = state.masked.shape
    blocks = length // state.block_length
    decoded = 1.0 - state.masked.view(batch, blocks, state.block_length).float().mean(-1)  # [b, blocks]
    previous = torch.cat([torch.ones_like(decoded[:, :1]), decoded[:, :-1]], dim=1)
    # A block opens only when every block before it has opened (cumprod), and its predecessor is far enough.
    active = (previous >= config.activate_fraction).long().cumprod(-1).bool()
    full = active & (previous >= config.full_activate_fraction)
    active = active.repeat_interleave(state.block_length, dim=1) & state.masked
    full = full.repeat_interleave(state.block_length, dim=1) & state.masked
    # The first unfinished block's predecessor is complete, so `full` always holds a masked position.
    forced = top_positions(-uncertainty, full, torch.ones_like(state.block))
    return tokens, (active & (uncertainty <= config.threshold)) | forced


DECODERS: dict[str, Decoder] = {
    "low_confidence": low_confidence,
    "confident": confident,
    "threshold": threshold_parallel,
    "multi_block": multi_block,
}


# ----------------------------------------------------------------------------------------------------------------
# The shared loop and its helpers


def check_config(config: DecoderConfig, gen_length: int) -> None:
    """Reject decoder settings that do not fit `gen_length` (one-line ValueError naming the setting)."""
    if config.name not in DECODERS:
        raise ValueError(f"decoder: unknown name '{config.name}' (known: {', '.join(DECODERS)})")
    try:
        config.check_lengths(gen_length)
    except ValueError as error:
        raise ValueError(f"decoder: {error}") from None


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompt ids into `[B, P]` ids and attention mask (so every response starts at column P)."""
    width = max(len(prompt) for prompt in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


def structure_prior(teacher: Teacher, config: DecoderConfig, gen_length: int) -> torch.Tensor:
    """[gen_length] token ids fixed before decoding (pins, EOS from `fixed_length` on), -1 where free."""
    prior = torch.full((gen_length,), -1, dtype=torch.long)
    length = config.fixed_length or gen_length
    prior[length:] = teacher.eos_token_id
    for position, text in sorted(config.pins.items()):
        ids = teacher.tokenizer.encode(text, add_special_tokens=False)
        start = position % length
        if not ids:
            raise ValueError(f"decoder: pins: text {text!r} at {position} encodes to no tokens")
        if start + len(ids) > length:
            raise ValueError(f"decoder: pins: text {text!r} at {position} runs past the response end {length}")
        if (prior[start : start + len(ids)] >= 0).any():
            raise ValueError(f"decoder: pins: text {text!r} at {position} overlaps another pin")
        prior[start : start + len(ids)] = torch.tensor(ids, dtype=torch.long)
    return prior


def finished_rows(response: torch.Tensor, masked: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B] True where the answer is settled: nothing masked, or a committed EOS with no mask before it."""
    first_eos = _first_eos(response, masked, eos_id)
    positions = torch.arange(response.shape[1], device=response.device)[None, :]
    masked_before = (masked & (positions < first_eos[:, None])).any(-1)
    return ~masked.any(-1) | ((first_eos >= 0) & ~masked_before)


def _first_eos(response: torch.Tensor, masked: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B] position of the first committed EOS, -1 where there is none."""
    is_eos = (response == eos_id) & ~masked
    none = torch.full((response.shape[0],), -1, dtype=torch.long, device=response.device)
    return torch.where(is_eos.any(-1), is_eos.float().argmax(-1), none)


def _current_block(masked: torch.Tensor, block_length: int) -> torch.Tensor:
    """[b] index of each row's first block that still has a masked position."""
    batch, length = masked.shape
    has_mask = masked.view(batch, length // block_length, block_length).any(-1)
    return has_mask.float().argmax(-1)


def _block_step(order: torch.Tensor, nfe: torch.Tensor, block: torch.Tensor, block_length: int) -> torch.Tensor:
    """[b] forwards spent in the current block: since the last commit before it (0 if nothing before it)."""
    positions = torch.arange(order.shape[1], device=order.device)[None, :]
    before = positions < (block * block_length)[:, None]
    last_commit = torch.where(before, order, torch.full_like(order, -1)).max(-1).values
    return nfe - (last_commit + 1)


def _cacheable_length(
    masked: torch.Tensor, order: torch.Tensor, nfe: torch.Tensor, block_length: int, delay: int
) -> torch.Tensor:
    """[b] response positions that may sit in a `blocks` cache: the leading blocks finished >= `delay` forwards ago."""
    batch, length = masked.shape
    blocks = length // block_length
    finished = ~masked.view(batch, blocks, block_length).any(-1)
    finished_at = order.view(batch, blocks, block_length).max(-1).values  # step of the block's last commit
    settled = finished & ((nfe[:, None] - (finished_at + 1)) >= delay)
    return settled.long().cumprod(-1).sum(-1) * block_length


def _take_rows(value: Any, index: torch.Tensor) -> Any:
    """The rows `index` of every tensor in a nested tuple/list; None when the value holds anything else."""
    if isinstance(value, torch.Tensor):
        return value[index]
    if isinstance(value, tuple | list):
        taken = [_take_rows(item, index) for item in value]
        return None if any(item is None for item in taken) else type(value)(taken)
    return None


def _cache_for_rows(cache: PrefixCache, cached_rows: torch.Tensor, rows: torch.Tensor) -> PrefixCache | None:
    """The cache restricted to `rows` (a subset of `cached_rows`), or None if its layout cannot be sliced."""
    index = torch.isin(cached_rows, rows).nonzero().squeeze(-1)
    kv = _take_rows(cache.kv, index)
    if kv is None:
        return None  # an opaque backbone cache object: the caller rebuilds it instead
    return PrefixCache(
        kv=kv,
        attention_mask=cache.attention_mask[index],
        carry_ids=cache.carry_ids[index],
        carry_mask=cache.carry_mask[index],
    )


@torch.no_grad()
def decode(
    teacher: Teacher,
    prompts: list[list[int]],
    config: DecoderConfig,
    gen_length: int,
    generator: torch.Generator | None = None,
) -> DecodeResult:
    """Decode a batch of prompt id lists with the decoder named in `config`."""
    check_config(config, gen_length)
    decoder = DECODERS[config.name]
    block_length = config.block_length or gen_length
    device = teacher.device
    prompt_ids, prompt_mask = left_pad(prompts, teacher.pad_token_id)
    prompt_ids, prompt_mask = prompt_ids.to(device), prompt_mask.to(device)
    batch, prompt_len = prompt_ids.shape
    mask_id, eos_id = teacher.mask_token_id, teacher.eos_token_id

    prior = structure_prior(teacher, config, gen_length).to(device)
    pinned = (prior >= 0)[None, :].expand(batch, gen_length)
    response = torch.where(pinned, prior, torch.full_like(prior, mask_id)).clone()
    order = torch.full((batch, gen_length), -1, dtype=torch.long, device=device)
    nfe = torch.zeros(batch, dtype=torch.long, device=device)
    active = ~finished_rows(response, response == mask_id, eos_id)

    cache: PrefixCache | None = None
    cached_rows = cached_length = None
    forwards = 0  # forwards of the batch, for the refresh period
    while active.any():
        rows = active.nonzero().squeeze(-1)
        current = response[rows]
        masked = current == mask_id
        ones = torch.ones_like(current)

        # ---- forward: full, or the uncached tail on top of a prefix cache -------------------------------------
        full = config.cache == "none" or (config.refresh_every > 0 and (forwards + 1) % config.refresh_every == 0)
        if config.cache != "none":
            start = 0
            if config.cache == "blocks":
                start = int(_cacheable_length(masked, order[rows], nfe[rows], block_length, config.cache_delay).min())
            if cache is not None and start == cached_length and not torch.equal(cached_rows, rows):
                cache, cached_rows = _cache_for_rows(cache, cached_rows, rows), rows
            if cache is None or start != cached_length:
                prefix = torch.cat([prompt_ids[rows], current[:, :start]], dim=1)
                cache = teacher.prefill(prefix, torch.cat([prompt_mask[rows], ones[:, :start]], dim=1))
                cached_rows, cached_length = rows, start
                full = True  # as in Dimple and Fast-dLLM, the step that builds the cache decodes from a full forward
        if full:
            ids = torch.cat([prompt_ids[rows], current], dim=1)
            logits = teacher.forward(ids, torch.cat([prompt_mask[rows], ones], dim=1))[:, prompt_len:]
        else:
            tail = teacher.forward(current[:, start:], ones[:, start:], cache=cache)
            # Cached positions are all committed, so no decoder reads their (zero) logits.
            logits = tail.new_zeros(len(rows), gen_length, tail.shape[-1])
            logits[:, start:] = tail
        logits[..., mask_id] = -torch.inf  # the mask token is never a valid answer token
        forwards += 1

        # ---- the decoder chooses; the loop commits and counts -------------------------------------------------
        block = _current_block(masked, block_length)
        state = StepState(
            logits=logits,
            masked=masked,
            step=nfe[rows],
            block=block,
            block_step=_block_step(order[rows], nfe[rows], block, block_length),
            block_length=block_length,
            generator=generator,
        )
        tokens, commit = decoder(state, config, gen_length)
        commit &= masked
        if not commit.any(-1).all():
            raise RuntimeError(f"decoder '{config.name}' committed no token for some sample at a step")
        current = torch.where(commit, tokens, current)
        order[rows] = torch.where(commit, nfe[rows][:, None].expand_as(commit), order[rows])
        nfe[rows] += 1
        if config.eos_fill:
            # Masks after a committed EOS cannot change the answer; filling them stops decoders spending on them.
            first_eos = _first_eos(current, current == mask_id, eos_id)
            after = torch.arange(gen_length, device=device)[None, :] > first_eos[:, None]
            fill = after & (first_eos[:, None] >= 0) & (current == mask_id)
            current = torch.where(fill, torch.full_like(current, eos_id), current)
        response[rows] = current
        done = finished_rows(current, current == mask_id, eos_id)
        active[rows[done]] = False

    # Finished early: whatever is still masked lies after the answer's EOS.
    response = torch.where(response == mask_id, torch.full_like(response, eos_id), response)
    is_eos = response == eos_id
    first_eos = torch.where(is_eos.any(-1), is_eos.float().argmax(-1), torch.full_like(nfe, gen_length))
    before_eos = torch.arange(gen_length, device=device)[None, :] < first_eos[:, None]
    generated = (before_eos & ~pinned).sum(-1)
    return DecodeResult(tokens=response.cpu(), order=order.cpu(), nfe=nfe.cpu(), generated=generated.cpu())
