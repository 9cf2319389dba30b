"""Diffusion decoding for fewstep's backbones: the decoders, the loop they share, and `diffusion_generate`.

This is the one source of fewstep's decoding rules. fewstep's engine (`distill/decoding.py`) calls `generate`
here, and every exported checkpoint carries this file verbatim beside its modeling file, where the models'
`DiffusionGenerationMixin.diffusion_generate` calls the same `generate`. So an export decodes exactly as fewstep
evaluated it, without fewstep installed. It imports torch only (and transformers' `GenerationConfig` lazily).
It runs past 400 lines on purpose: every decoder and the loop they share, in one place.

A decoder starts from `[prompt | MASK x gen_length]` and, at each forward pass (a *step*), commits some masked
response positions. Decoders are small functions in `DECODERS`; they only choose *which* positions to commit,
given a `StepState`. The loop (`generate`) owns everything else:

- logits come aligned (position i scores token i) from `aligned_logits`, which hides the shifted heads of
  Dream/Dimple; the model is any fewstep backbone (`forward(input_ids, attention_mask, cache=, use_cache=,
  logits_to_keep=)`, 2-D padding masks, a transformers `DynamicCache`);
- structure priors (pins, `fixed_length`) are committed before the first step;
- a sample is *finished* once it has a committed end token (the chat template's end of turn) with every position
  before it committed, or nothing is masked; finished samples leave the batch, the rest of their canvas becomes
  the end token, and they stop counting forward passes;
- counting: NFE = forwards a sample took part in; generated tokens = response tokens before the first end token
  (pinned tokens excluded); TPF = generated / NFE;
- `order[b, j]` is the step (0-based, per sample) that committed response position j, -1 if no forward did;
- bounded: every step commits at least one masked position of every sample still decoding, with a token that is
  not the mask, so a sample takes at most `gen_length` forwards; a NaN or infinite logit, a step that commits
  nothing, or a sample past `gen_length` forwards raises `DecodingError` naming the step (a diverged model would
  otherwise commit the mask token itself and never finish);
- blocks: the canvas is split into `block_length` blocks; a sample's *current block* is its first block with a
  masked position, and `block_step` counts the forwards it has spent there;
- the KV cache (`cache`): `prompt` encodes the prompt once (`prefill`) and then re-encodes only the response
  (Dimple's prefilling); `blocks` also caches every finished leading block once it has been finished for
  `cache_delay` forwards (Fast-dLLM's block cache, d3LLM's delayed cache). One batch shares one cache, so its
  prefix is the shortest over the samples still decoding; finished samples are sliced out of it. The step that
  builds or rebuilds the cache decodes from a full forward (as Dimple's first step and Fast-dLLM's first step of a
  block do), and so does every `refresh_every`-th forward (d3LLM's periodic refresh). Each step is one NFE
  whatever it encodes. Exact for causal attention; under bidirectional attention the cached prefix was encoded
  without the tokens after it: the approximation Dimple and Fast-dLLM accept for speed.
- the static path (`static`): the model always runs on the whole batch (finished samples stay in it; their
  outputs are dropped before the decoder sees them) and a prefix cache lives in `StaticKV`, buffers of the
  batch's full width allocated once per decode, so every forward of a block has the same shapes and the same
  buffer addresses: what `torch.compile` and CUDA graphs need. It decodes token for token as the eager path does
  (the decoders see exactly the same rows and logits); it spends compute on finished rows to keep shapes fixed.

Decoders:
- `low_confidence`: fixed-step remasking as in LLaDA's `generate`: `steps` split evenly over blocks; each step
  commits the k most confident masked positions of the current block (k from an even split of the block's masks
  over its steps). `remasking="random"` ranks by uniform noise instead.
- `confident` (Dimple): every masked position of the current block whose confidence exceeds `threshold`; if none
  does (or at the block's last scheduled step), what the `low_confidence` schedule would commit.
- `threshold` (Fast-dLLM): every masked position of the current block above `threshold`, and always the most
  confident one.
- `multi_block` (d3LLM): a block is active once its predecessor is `activate_fraction` decoded and fully active
  once it is `full_activate_fraction` decoded; every masked position of an active block with entropy <=
  `threshold` is committed, and always the single lowest-entropy masked position of the fully active blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

DECODER_NAMES = ("low_confidence", "confident", "threshold", "multi_block")


class DecodingError(ValueError):
    """A decode that cannot go on (non-finite logits, no progress); the message is one line naming the step."""


@dataclass
class DecodeSettings:
    """Every decoding setting, with the defaults `diffusion_generate` uses when neither the call nor the saved
    generation config names one. fewstep's recipe documents each (`distill.recipe.DecoderConfig`); `pin_ids` maps
    a response position (negative: from the end) to token ids committed there before decoding."""

    decoder: str = "confident"
    gen_length: int = 32  # response canvas in tokens
    steps: int | None = None  # forwards of the fixed schedule, split evenly over blocks; None: gen_length
    block_length: int | None = None  # semi-autoregressive block; None: one block spanning the canvas
    threshold: float | None = 0.9  # confidence bound (confident, threshold) or entropy bound in nats (multi_block)
    confidence: str = "probability"  # probability | margin | neg_entropy
    remasking: str = "low_confidence"  # low_confidence | random
    temperature: float = 0.0  # 0: greedy; > 0: Gumbel-max sampling
    top_k: int | None = None
    top_p: float = 1.0
    activate_fraction: float = 0.1
    full_activate_fraction: float = 0.95
    eos_fill: bool = False  # fill the masks after a committed end token with it
    fixed_length: int | None = None  # pin the end token from this response position on
    pin_ids: dict[int, list[int]] = field(default_factory=dict)
    cache: str = "none"  # none | prompt | blocks
    cache_delay: int = 1
    refresh_every: int = 0
    static: bool = False  # fixed shapes and a preallocated cache (`StaticKV`), for compiled or graphed forwards

    def __post_init__(self) -> None:
        if self.decoder not in DECODER_NAMES:
            raise ValueError(f"decoder: unknown name '{self.decoder}' (known: {', '.join(DECODER_NAMES)})")
        self.pin_ids = {int(position): list(ids) for position, ids in self.pin_ids.items()}
        gen_length = self.gen_length
        block_length = self.block_length or gen_length
        steps = self.steps or gen_length
        if gen_length % block_length:
            raise ValueError(f"gen_length {gen_length} is not a multiple of block_length {block_length}")
        if steps % (gen_length // block_length):
            raise ValueError(f"steps {steps} is not a multiple of the number of blocks {gen_length // block_length}")
        if steps > gen_length:
            raise ValueError(f"steps {steps} exceeds gen_length {gen_length}")
        if self.fixed_length is not None and self.fixed_length > gen_length:
            raise ValueError(f"fixed_length {self.fixed_length} exceeds gen_length {gen_length}")

    @property
    def blocks(self) -> int:
        return self.gen_length // (self.block_length or self.gen_length)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (the `diffusion` entry of generation_config.json)."""
        values = asdict(self)
        values["pin_ids"] = {str(position): ids for position, ids in self.pin_ids.items()}
        return values


SETTING_NAMES = tuple(item.name for item in fields(DecodeSettings))
IMAGE_INPUTS = ("pixel_values", "image_grid_thw")  # prompt inputs `diffusion_generate` hands to the model


@dataclass
class RowImages:
    """The prompts' images, encoded once per decode (Dimple's `row_images`) and kept per batch row.

    The loop drops rows as samples finish; `inputs(rows)` gives the model inputs of the rows still decoding, so a
    forward gets exactly its rows' image features and the vision tower runs once per sample, not once per forward.
    """

    features: list[torch.Tensor]  # per row: [its image tokens, hidden] LM-space features ([0, hidden]: no image)
    grids: list[torch.Tensor]  # per row: [its images, 3] patch grids

    def inputs(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        """`image_features` and `image_grid_thw` of `rows`, in row order; {} when none of them has an image."""
        picked = rows.tolist()
        grids = [self.grids[row] for row in picked]
        if not any(len(grid) for grid in grids):
            return {}
        return {
            "image_features": torch.cat([self.features[row] for row in picked]),
            "image_grid_thw": torch.cat(grids),
        }


# ----------------------------------------------------------------------------------------------------------------
# Aligned logits and the prefix cache (the shifted head of Dream/Dimple hidden here, once)


@dataclass
class PrefixCache:
    """Keys/values of a prompt, computed once and reused while the response is re-encoded.

    For a shifted model the last prompt token is *not* in `kv`: its output scores the first response token, so it
    is re-encoded together with the response (`carry_ids`). `kv` is the backbone's `DynamicCache`; forwards on top
    of it crop it back to the prefix, so it can be reused.
    """

    kv: Any
    attention_mask: torch.Tensor  # [B, cached_len]
    carry_ids: torch.Tensor  # [B, 0 or 1]
    carry_mask: torch.Tensor  # [B, 0 or 1]

    def select_rows(self, index: torch.Tensor) -> PrefixCache:
        """The cache of rows `index` only (the old object must not be used afterwards: rows are cut in place)."""
        self.kv.batch_select_indices(index)
        if getattr(self.kv, "rope_deltas", None) is not None:
            self.kv.rope_deltas = self.kv.rope_deltas[index]
        return PrefixCache(self.kv, self.attention_mask[index], self.carry_ids[index], self.carry_mask[index])


class StaticKV:
    """A prefix KV cache in buffers allocated once per decode, for the static path.

    Every layer's keys and values live in `[B, heads, width, head_dim]` buffers, `width` the batch's prompt plus
    canvas. A prefill (a `DynamicCache`, computed as in the eager path) is copied in (`fill`); a forward on top of
    it writes its keys and values in place right after the prefix and attends to the buffer up to there. Prefix
    plus the tokens re-encoded on top of it always make the full width, so every such forward of a block reads the
    whole buffers at fixed addresses. It takes the place of the `DynamicCache` the backbones take (`update`,
    `get_seq_length`, `crop`, and Dimple's `rope_deltas`).
    """

    def __init__(self, width: int):
        self.width = width
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.lengths: list[int] = []
        self.rope_deltas: torch.Tensor | None = None

    def fill(self, prefix: Any) -> None:
        """Copy a prefilled `DynamicCache` into the buffers (allocated at the first fill, reused after)."""
        for index, layer in enumerate(prefix.layers):
            length = layer.keys.shape[-2]
            if index == len(self.keys):
                for store, states in ((self.keys, layer.keys), (self.values, layer.values)):
                    shape = (*states.shape[:2], self.width, states.shape[-1])
                    store.append(torch.zeros(shape, dtype=states.dtype, device=states.device))
                    if states.is_cuda:  # graph-captured forwards must find the buffers where they were captured
                        torch._dynamo.mark_static_address(store[-1])
                self.lengths.append(0)
            self.keys[index][:, :, :length].copy_(layer.keys)
            self.values[index][:, :, :length].copy_(layer.values)
            self.lengths[index] = length
        self.rope_deltas = getattr(prefix, "rope_deltas", None)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        start = self.lengths[layer_idx]
        end = start + key_states.shape[-2]
        self.keys[layer_idx][:, :, start:end].copy_(key_states)
        self.values[layer_idx][:, :, start:end].copy_(value_states)
        self.lengths[layer_idx] = end
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.lengths[layer_idx] if self.lengths else 0

    def crop(self, max_length: int) -> None:
        """As `DynamicCache.crop`: keep `max_length` tokens, or drop `-max_length` from the end (the buffers are
        overwritten by the next forward, never cleared)."""
        self.lengths = [max_length if max_length >= 0 else length + max_length for length in self.lengths]


def aligned_logits(
    model: Any,
    shifted: bool,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    start: int = 0,
    cache: PrefixCache | None = None,
    **model_inputs: Any,
) -> torch.Tensor:
    """Logits `[B, T - start, V]` of positions `start..T-1` of `input_ids` `[B, T]`, where row j scores token
    `start + j`. Only those positions go through the LM head.

    A shifted model's raw output at i-1 scores token i; position 0 has no predecessor and repeats its own row (as
    Dream does). With `cache`, `input_ids` continue the cached prompt, `attention_mask` covers only them, and the
    cache is cropped back to the prompt afterwards.
    """
    length = input_ids.shape[1]
    shift = int(shifted)
    if cache is None:
        if shifted and start == 0:
            raw = model(
                input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=slice(0, length - 1), **model_inputs
            ).logits
            return torch.cat([raw[:, :1], raw], dim=1) if length > 1 else raw
        keep = slice(start - shift, length - shift)
        return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, **model_inputs).logits
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    carry = cache.carry_ids.shape[1]
    ids = torch.cat([cache.carry_ids, input_ids], dim=1)
    mask = torch.cat([cache.attention_mask, cache.carry_mask, attention_mask], dim=1)
    cached = cache.kv.get_seq_length()
    keep = slice(carry + start - shift, carry + length - shift)
    logits = model(input_ids=ids, attention_mask=mask, cache=cache.kv, logits_to_keep=keep, **model_inputs).logits
    cache.kv.crop(cached - cache.kv.get_seq_length())  # drop what this forward appended
    return logits


@torch.no_grad()
def prefill(
    model: Any, shifted: bool, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **model_inputs
) -> PrefixCache:
    """Encode a (left-padded) prompt once and return its cache for `aligned_logits(..., cache=...)`."""
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    keep = input_ids.shape[1] - int(shifted)
    output = model(
        input_ids=input_ids[:, :keep],
        attention_mask=attention_mask[:, :keep],
        use_cache=True,
        logits_to_keep=1,
        **model_inputs,
    )
    return PrefixCache(output.cache, attention_mask[:, :keep], input_ids[:, keep:], attention_mask[:, keep:])


# ----------------------------------------------------------------------------------------------------------------
# Token choice and confidence


@dataclass
class StepState:
    """What a decoder sees at one step, restricted to the samples still decoding."""

    logits: torch.Tensor  # [b, gen_length, V] aligned logits of the response positions
    masked: torch.Tensor  # [b, gen_length] True where still masked
    block: torch.Tensor  # [b] current block: the first block with a masked position
    block_step: torch.Tensor  # [b] steps this sample has spent in its current block
    block_length: int
    generator: torch.Generator | None


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
        logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, sorted_ids, drop_sorted), -torch.inf)
    return logits


def sample_tokens(
    logits: torch.Tensor, settings: DecodeSettings, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate token per position and the filtered distribution `[..., V]` it was drawn from (temperature 1).

    Greedy at temperature 0, else Gumbel-max sampling at `settings.temperature`.
    """
    logits = filter_logits(logits.float(), settings.top_k, settings.top_p)
    probs = torch.softmax(logits, dim=-1)
    if settings.temperature <= 0:
        return probs.argmax(dim=-1), probs
    # Gumbel-max in float64 (as LLaDA does: low-precision noise skews samples), drawn on the CPU so a seeded
    # generator gives the same draws on every device.
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device="cpu").to(logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20)))
    return (logits.double() / settings.temperature + gumbel).argmax(dim=-1), probs


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


def _schedule(state: StepState, settings: DecodeSettings, candidates: torch.Tensor):
    """LLaDA's count for this step and whether it is the block's last scheduled step: ([b] count, [b] bool)."""
    steps_per_block = (settings.steps or settings.gen_length) // settings.blocks
    # Past the schedule (cannot happen for low_confidence) the last step's rule applies: commit everything left.
    steps_left = (steps_per_block - state.block_step).clamp(min=1)
    # Ceil-dividing what is left over the steps left reproduces LLaDA's even split of the block's masks
    # (remainder to the first steps) without keeping per-block state.
    remaining = candidates.sum(-1)
    return torch.div(remaining + steps_left - 1, steps_left, rounding_mode="floor"), steps_left == 1


# ----------------------------------------------------------------------------------------------------------------
# Decoders: (state, settings) -> (candidate tokens [b, L], positions to commit [b, L] bool)


def low_confidence(state: StepState, settings: DecodeSettings) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, probs = sample_tokens(state.logits, settings, state.generator)
    if settings.remasking == "random":
        score = torch.rand(state.masked.shape, generator=state.generator, device="cpu").to(state.masked.device)
    else:
        score = confidence_of(probs, tokens, "probability")
    candidates = _current_block_candidates(state)
    count, _ = _schedule(state, settings, candidates)
    return tokens, top_positions(score, candidates, count)


def confident(state: StepState, settings: DecodeSettings) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, probs = sample_tokens(state.logits, settings, state.generator)
    score = confidence_of(probs, tokens, settings.confidence)
    candidates = _current_block_candidates(state)
    above = candidates & (score > settings.threshold)
    count, last_step = _schedule(state, settings, candidates)
    use_threshold = above.any(-1) & ~last_step
    return tokens, torch.where(use_threshold[:, None], above, top_positions(score, candidates, count))


def threshold_parallel(state: StepState, settings: DecodeSettings) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, probs = sample_tokens(state.logits, settings, state.generator)
    score = confidence_of(probs, tokens, settings.confidence)
    candidates = _current_block_candidates(state)
    best = top_positions(score, candidates, torch.ones_like(state.block))
    return tokens, (candidates & (score > settings.threshold)) | best


def multi_block(state: StepState, settings: DecodeSettings) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, probs = sample_tokens(state.logits, settings, state.generator)
    uncertainty = entropy(probs)
    batch, length = state.masked.shape
    blocks = length // state.block_length
    decoded = 1.0 - state.masked.view(batch, blocks, state.block_length).float().mean(-1)  # [b, blocks]
    previous = torch.cat([torch.ones_like(decoded[:, :1]), decoded[:, :-1]], dim=1)
    # A block opens only when every block before it has opened (cumprod), and its predecessor is far enough.
    active = (previous >= settings.activate_fraction).long().cumprod(-1).bool()
    full = active & (previous >= settings.full_activate_fraction)
    active = active.repeat_interleave(state.block_length, dim=1) & state.masked
    full = full.repeat_interleave(state.block_length, dim=1) & state.masked
    # The first unfinished block's predecessor is complete, so `full` always holds a masked position.
    forced = top_positions(-uncertainty, full, torch.ones_like(state.block))
    return tokens, (active & (uncertainty <= settings.threshold)) | forced


DECODERS: dict[str, Callable[[StepState, DecodeSettings], tuple[torch.Tensor, torch.Tensor]]] = {
    "low_confidence": low_confidence,
    "confident": confident,
    "threshold": threshold_parallel,
    "multi_block": multi_block,
}


# ----------------------------------------------------------------------------------------------------------------
# The shared loop and its helpers


def structure_prior(settings: DecodeSettings, end_id: int) -> torch.Tensor:
    """[gen_length] ids fixed before decoding (pins, the end token from `fixed_length` on), -1 where free."""
    prior = torch.full((settings.gen_length,), -1, dtype=torch.long)
    length = settings.fixed_length or settings.gen_length
    prior[length:] = end_id
    for position, ids in sorted(settings.pin_ids.items()):
        if not -length <= position < length:
            raise ValueError(f"pins: position {position} is outside a response of {length} tokens")
        start = position % length
        if not ids:
            raise ValueError(f"pins: the pin at {position} encodes to no tokens")
        if start + len(ids) > length:
            raise ValueError(f"pins: the pin at {position} runs past the response end {length}")
        if (prior[start : start + len(ids)] >= 0).any():
            raise ValueError(f"pins: the pin at {position} overlaps another pin")
        prior[start : start + len(ids)] = torch.tensor(ids, dtype=torch.long)
    return prior


def first_end(response: torch.Tensor, masked: torch.Tensor, end_id: int) -> torch.Tensor:
    """[B] position of the first committed end token, -1 where there is none."""
    is_end = (response == end_id) & ~masked
    none = torch.full((response.shape[0],), -1, dtype=torch.long, device=response.device)
    return torch.where(is_end.any(-1), is_end.float().argmax(-1), none)


def finished_rows(response: torch.Tensor, masked: torch.Tensor, end_id: int) -> torch.Tensor:
    """[B] True where the answer is settled: nothing masked, or a committed end token with no mask before it."""
    end = first_end(response, masked, end_id)
    positions = torch.arange(response.shape[1], device=response.device)[None, :]
    masked_before = (masked & (positions < end[:, None])).any(-1)
    return ~masked.any(-1) | ((end >= 0) & ~masked_before)


def _current_block(masked: torch.Tensor, block_length: int) -> torch.Tensor:
    """[b] index of each row's first block that still has a masked position."""
    batch, length = masked.shape
    return masked.view(batch, length // block_length, block_length).any(-1).float().argmax(-1)


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


@dataclass
class Decoded:
    """Outputs of one batched decode, on the prompts' device."""

    tokens: torch.Tensor  # [B, gen_length] response ids
    order: torch.Tensor  # [B, gen_length] step that committed each position, -1 if no forward did
    nfe: torch.Tensor  # [B] forward passes each sample took part in
    generated: torch.Tensor  # [B] response tokens before the first end token, pinned tokens excluded
    forwards: int = 0  # forwards of the batch (a step is one, whatever it encodes)
    prefills: int = 0  # prompt (or prefix) encodings for the cache, besides the forwards


# forward(ids, mask, start, cache, **image_inputs) -> aligned logits [b, T - start, V];
# prefill(ids, mask, **image_inputs) -> PrefixCache
Forward = Callable[[torch.Tensor, torch.Tensor, int, PrefixCache | None], torch.Tensor]
Prefill = Callable[[torch.Tensor, torch.Tensor], PrefixCache]


@torch.no_grad()
def generate(
    forward: Forward,
    prefill_prompt: Prefill,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    settings: DecodeSettings,
    mask_id: int,
    end_id: int,
    generator: torch.Generator | None = None,
    prompt_images: RowImages | None = None,
) -> Decoded:
    """Decode a response after each left-padded prompt `[B, P]` with the decoder `settings` names.

    `prompt_images` (Dimple's image prompts, encoded once) belong to the prompt: every full forward and the
    prefill take the image features of the rows they decode, a forward on top of the prompt's cache does not.
    """
    decoder = DECODERS[settings.decoder]
    gen_length = settings.gen_length
    block_length = settings.block_length or gen_length
    device = prompt_ids.device
    batch, prompt_len = prompt_ids.shape

    prior = structure_prior(settings, end_id).to(device)
    pinned = (prior >= 0)[None, :].expand(batch, gen_length)
    response = torch.where(pinned, prior, torch.full_like(prior, mask_id)).clone()
    order = torch.full((batch, gen_length), -1, dtype=torch.long, device=device)
    nfe = torch.zeros(batch, dtype=torch.long, device=device)
    active = ~finished_rows(response, response == mask_id, end_id)

    cache: PrefixCache | None = None
    cached_rows = cached_length = None
    prefills = 0
    static_kv = StaticKV(prompt_len + gen_length) if settings.static else None
    every_row = torch.arange(batch, device=device)
    forwards = 0  # forwards of the batch, for the refresh period
    while active.any():
        rows = active.nonzero().squeeze(-1)
        current = response[rows]
        masked = current == mask_id
        # The rows the model runs on: those still decoding, or on the static path the whole batch (fixed shapes),
        # whose outputs are then cut down to `rows` so the decoder sees exactly what the eager path gives it.
        run = every_row if settings.static else rows
        running = response if settings.static else current
        ones = torch.ones_like(running)

        # ---- forward: full, or the uncached tail on top of a prefix cache -------------------------------------
        full = settings.cache == "none" or (settings.refresh_every > 0 and (forwards + 1) % settings.refresh_every == 0)
        if settings.cache != "none":
            start = 0
            if settings.cache == "blocks":
                start = int(_cacheable_length(masked, order[rows], nfe[rows], block_length, settings.cache_delay).min())
            if cache is not None and start == cached_length and not torch.equal(cached_rows, run):
                cache = cache.select_rows(torch.isin(cached_rows, run).nonzero().squeeze(-1))
                cached_rows = run
            if cache is None or start != cached_length:
                prefix = torch.cat([prompt_ids[run], running[:, :start]], dim=1)
                images = prompt_images.inputs(run) if prompt_images is not None else {}
                cache = prefill_prompt(prefix, torch.cat([prompt_mask[run], ones[:, :start]], dim=1), **images)
                prefills += 1
                if static_kv is not None:
                    static_kv.fill(cache.kv)
                    cache = PrefixCache(static_kv, cache.attention_mask, cache.carry_ids, cache.carry_mask)
                cached_rows, cached_length = run, start
                full = True  # the step that builds the cache decodes from a full forward
        if full:
            ids = torch.cat([prompt_ids[run], running], dim=1)
            images = prompt_images.inputs(run) if prompt_images is not None else {}
            logits = forward(ids, torch.cat([prompt_mask[run], ones], dim=1), prompt_len, None, **images)
            logits = logits[rows] if settings.static else logits
        else:
            tail = forward(running[:, start:], ones[:, start:], 0, cache)
            # Cached positions are all committed, so no decoder reads their (zero) logits.
            logits = tail.new_zeros(len(rows), gen_length, tail.shape[-1])
            logits[:, start:] = tail[rows] if settings.static else tail
        forwards += 1
        if forwards > gen_length:
            # Cannot happen while every step commits (checked below); a guard against a loop that never ends.
            raise DecodingError(f"decoding: step {forwards} exceeds gen_length {gen_length} forwards per sample")
        # A NaN or inf logit makes its row's sum NaN or inf; the sum needs no [b, L, V] mask. A sync point, as the
        # commit check below is.
        if not torch.isfinite(logits.sum(-1, dtype=torch.float32)).all():
            raise DecodingError(
                f"decoding: the model's logits are NaN or infinite at step {forwards} (of at most {gen_length}); "
                "its weights have probably diverged"
            )
        logits[..., mask_id] = -torch.inf  # the mask token is never an answer token

        # ---- the decoder chooses; the loop commits and counts -------------------------------------------------
        block = _current_block(masked, block_length)
        state = StepState(
            logits=logits,
            masked=masked,
            block=block,
            block_step=_block_step(order[rows], nfe[rows], block, block_length),
            block_length=block_length,
            generator=generator,
        )
        tokens, commit = decoder(state, settings)
        commit &= masked & (tokens != mask_id)
        if not commit.any(-1).all():
            raise DecodingError(f"decoding: decoder '{settings.decoder}' committed no token at step {forwards}")
        current = torch.where(commit, tokens, current)
        order[rows] = torch.where(commit, nfe[rows][:, None].expand_as(commit), order[rows])
        nfe[rows] += 1
        if settings.eos_fill:
            # Masks after a committed end token cannot change the answer; filling them stops decoders spending on them.
            end = first_end(current, current == mask_id, end_id)
            after = torch.arange(gen_length, device=device)[None, :] > end[:, None]
            current = torch.where(after & (end[:, None] >= 0) & (current == mask_id), end_id, current)
        response[rows] = current
        active[rows[finished_rows(current, current == mask_id, end_id)]] = False

    # Finished early: whatever is still masked lies after the answer's end token.
    response = torch.where(response == mask_id, end_id, response)
    is_end = response == end_id
    end = torch.where(is_end.any(-1), is_end.float().argmax(-1), torch.full_like(nfe, gen_length))
    generated = ((torch.arange(gen_length, device=device)[None, :] < end[:, None]) & ~pinned).sum(-1)
    return Decoded(tokens=response, order=order, nfe=nfe, generated=generated, forwards=forwards, prefills=prefills)


# ----------------------------------------------------------------------------------------------------------------
# `diffusion_generate` for the exported models


@dataclass
class DiffusionGenerateOutput:
    sequences: torch.Tensor  # [B, P + gen_length]: each prompt, then its response
    nfe: torch.Tensor  # [B] forward passes each sample took part in
    order: torch.Tensor  # [B, gen_length] step that committed each position, -1 if none did


class DiffusionGenerationMixin:
    """`diffusion_generate` for a fewstep backbone (a class with `logits_shifted` and a fewstep-style forward)."""

    logits_shifted: bool = False

    @torch.no_grad()
    def diffusion_generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: Any = None,
        generator: torch.Generator | None = None,
        **overrides: Any,
    ) -> DiffusionGenerateOutput:
        """Decode a response after each prompt: `gen_length` mask tokens, committed over forward passes.

        Args:
            input_ids: `[B, P]` prompt ids, left-padded (apply the tokenizer's chat template first).
            attention_mask: `[B, P]`, 0 on the left padding; None means no padding.
            generation_config: a `GenerationConfig` whose `diffusion` entry holds the decoding settings, or a dict
                of them; None reads the `generation_config.json` saved with the weights (the defaults the model was
                exported with), then `DecodeSettings`' defaults.
            generator: CPU generator for sampling (`temperature` > 0) and `remasking="random"`.
            overrides: any setting `DecodeSettings` names, e.g. `threshold=0.95`; also `mask_token_id`,
                `eos_token_id` (the token that ends an answer; default the generation config's).
            Image prompts (Dimple) pass `pixel_values` and `image_grid_thw` as overrides (the images of every
                row, in row order, as its image processor gives them); they are encoded once per call.

        Returns `DiffusionGenerateOutput`: `sequences` (prompt + response), `nfe`, `order`.
        """
        images = {name: overrides.pop(name) for name in IMAGE_INPUTS if name in overrides}
        saved = self._saved_generation_config() if generation_config is None else generation_config
        if isinstance(saved, dict):
            values, token_ids = dict(saved), {}
        else:
            values = dict(getattr(saved, "diffusion", None) or {})
            token_ids = {name: getattr(saved, name, None) for name in ("mask_token_id", "eos_token_id")}
        for name in ("mask_token_id", "eos_token_id"):
            token_ids[name] = overrides.pop(name, values.pop(name, token_ids.get(name)))
            if token_ids[name] is None:
                token_ids[name] = getattr(self.config, name)
        end_id = token_ids["eos_token_id"]
        end_id = end_id[0] if isinstance(end_id, list | tuple) else end_id
        unknown = sorted((set(values) | set(overrides)) - set(SETTING_NAMES))
        if unknown:
            raise ValueError(f"unknown decoding setting(s) {', '.join(unknown)} (known: {', '.join(SETTING_NAMES)})")
        settings = DecodeSettings(**(values | overrides))
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        shifted = self.logits_shifted
        prompt_images = None
        if images.get("pixel_values") is not None:
            if not hasattr(self, "row_images"):
                raise ValueError(f"{type(self).__name__} takes no images (pixel_values given)")
            prompt_images = self.row_images(input_ids, images["pixel_values"], images["image_grid_thw"])

        def forward(ids, mask, start, cache, **inputs):
            return aligned_logits(self, shifted, ids, mask, start=start, cache=cache, **inputs)

        def prefill_prompt(ids, mask, **inputs):
            return prefill(self, shifted, ids, mask, **inputs)

        out = generate(
            forward,
            prefill_prompt,
            input_ids,
            attention_mask.long(),
            settings,
            token_ids["mask_token_id"],
            end_id,
            generator,
            prompt_images=prompt_images,
        )
        return DiffusionGenerateOutput(
            sequences=torch.cat([input_ids, out.tokens], dim=1), nfe=out.nfe, order=out.order
        )

    def _saved_generation_config(self) -> Any:
        # transformers reads generation_config.json only for models with `generate`; read it here, once, from where
        # the weights came from.
        if "_diffusion_generation_config" not in self.__dict__:
            from transformers import GenerationConfig

            try:
                found = GenerationConfig.from_pretrained(self.name_or_path)
            except (OSError, ValueError, TypeError):
                found = None
            self.__dict__["_diffusion_generation_config"] = found
        return self.__dict__["_diffusion_generation_config"] or {}
