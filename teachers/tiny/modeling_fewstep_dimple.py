"""The embedded Dimple-family diffusion LM: Qwen2-style blocks with bidirectional attention.

Blocks are RMSNorm -> grouped-query attention with RoPE -> RMSNorm -> SwiGLU MLP, as in Qwen2.5 (the language model
under Dream and Dimple). Attention is bidirectional by default and switches to causal for the autoregressive
training phase. Logits are *shifted* like Dream/Dimple when `config.shifted_logits` is set: the output at position
i-1 scores token i, which is also exactly next-token prediction, so one head serves both phases.

`cache` is a tuple with one `(key, value)` pair per layer, each `[batch, kv_heads, past_len, head_dim]`;
the current tokens attend to it and to each other. With `use_cache=True` the output carries the pairs for
past + current tokens. Diffusion decoders use this to encode a prompt once (prefilling) and re-encode only the
response.

`FewstepDimpleModel.diffusion_generate` decodes with the diffusion decoders of fewstep's engine
(`distill/decoding.py`: `low_confidence`, `confident`, `threshold`, `multi_block`), taking its defaults from the
`generation_config.json` that `distill export` writes beside the weights (the decoder the student was distilled
and evaluated with). It repeats the engine's rules rather than importing them, and `distill verify` checks that
both give the same tokens and forward counts.

Self-contained on purpose (torch + transformers only): exported checkpoints copy this file so that
`AutoModel.from_pretrained(dir, trust_remote_code=True)` and `diffusion_generate` work without fewstep installed.
For the same reason it holds the model and its decoding loop together and runs past 400 lines.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_fewstep_dimple import FewstepDimpleConfig


@dataclass
class FewstepDimpleOutput(ModelOutput):
    logits: torch.Tensor | None = None
    cache: tuple | None = None


@dataclass
class DiffusionGenerateOutput(ModelOutput):
    sequences: torch.LongTensor | None = None  # [B, prompt + gen_length]: each prompt, then its response
    nfe: torch.LongTensor | None = None  # [B] forward passes each sample took part in
    order: torch.LongTensor | None = None  # [B, gen_length] step that committed each position, -1 if none did


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 so bf16 activations keep their precision, as Qwen2 does.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    # The frequencies are recomputed per call rather than kept in a buffer: transformers 5 materialises models
    # from the meta device and leaves non-persistent buffers uninitialised, and the cost is head_dim/2 values.
    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=position_ids.device)
        inv_freq = 1.0 / (self.theta ** (exponents / self.head_dim))
        freqs = position_ids.float()[..., None] * inv_freq  # [B, T, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, head_dim]
        return emb.cos().to(dtype), emb.sin().to(dtype)


class Attention(nn.Module):
    def __init__(self, config: FewstepDimpleConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        # Qwen2 puts biases on q/k/v only.
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, past):
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if past is not None:
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        present = (k, v)
        groups = self.num_heads // self.num_kv_heads
        out = F.scaled_dot_product_attention(
            q, k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1), attn_mask=mask
        )
        out = out.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim)
        return self.o_proj(out), present


class MLP(nn.Module):
    def __init__(self, config: FewstepDimpleConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: FewstepDimpleConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask, past):
        attn_out, present = self.self_attn(self.input_layernorm(x), cos, sin, mask, past)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, present


class FewstepDimplePreTrainedModel(PreTrainedModel):
    config_class = FewstepDimpleConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["DecoderLayer"]

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)


def build_attention_mask(
    attention_mask: torch.Tensor | None, batch: int, query_len: int, past_len: int, causal: bool, device
) -> torch.Tensor | None:
    """Boolean mask `[B, 1, query_len, past_len + query_len]`, True where a query may attend.

    An explicit mask is always built when padding or causality matters; SDPA with `is_causal` alone would
    mis-handle a prefix cache (the query block sits at the end of the keys).
    """
    key_len = past_len + query_len
    allowed = None
    if attention_mask is not None:
        if attention_mask.shape != (batch, key_len):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch}, {key_len}) "
                "covering cached and current tokens"
            )
        allowed = attention_mask.bool()[:, None, None, :].expand(batch, 1, query_len, key_len)
    if causal:
        query_pos = torch.arange(query_len, device=device)[:, None] + past_len
        key_pos = torch.arange(key_len, device=device)[None, :]
        causal_mask = (key_pos <= query_pos)[None, None]
        allowed = causal_mask if allowed is None else allowed & causal_mask
    if allowed is not None:
        # A fully padded query row would make softmax produce NaN; let it see itself instead.
        diagonal = torch.zeros(query_len, key_len, dtype=torch.bool, device=device)
        diagonal[torch.arange(query_len), torch.arange(query_len) + past_len] = True
        allowed = allowed | (~allowed.any(-1, keepdim=True) & diagonal)
    return allowed


# ----------------------------------------------------------------------------------------------------------------
# Diffusion decoding rules (the engine's, `distill/decoding.py`, restated so this file needs no fewstep)

# Settings `diffusion_generate` uses where neither the call nor the saved generation config gives one. The meanings
# are those of fewstep's `DecoderConfig`; `pin_ids` maps a response position (negative: from the end) to token ids
# committed there before decoding.
DECODERS = ("low_confidence", "confident", "threshold", "multi_block")
DEFAULT_DECODING = {
    "decoder": "confident",
    "gen_length": 32,  # response canvas in tokens
    "steps": None,  # forwards of the fixed schedule, split evenly over blocks; None: gen_length
    "block_length": None,  # semi-autoregressive block; None: one block spanning the canvas
    "threshold": 0.9,  # confidence bound (confident, threshold) or entropy bound in nats (multi_block)
    "confidence": "probability",  # probability | margin | neg_entropy
    "remasking": "low_confidence",  # low_confidence: rank by top-1 probability | random
    "temperature": 0.0,  # 0: greedy; > 0: Gumbel-max sampling
    "top_k": None,
    "top_p": 1.0,
    "activate_fraction": 0.1,  # multi_block: a block opens once its predecessor is this decoded
    "full_activate_fraction": 0.95,  # multi_block: ... and is fully active once its predecessor is this decoded
    "eos_fill": False,  # fill the masks after a committed EOS with EOS
    "fixed_length": None,  # pin EOS from this response position on
    "pin_ids": {},
    "mask_token_id": None,  # None: the generation config's, else the model config's
    "eos_token_id": None,
}


def _structure_prior(settings: dict) -> torch.Tensor:
    """[gen_length] ids fixed before decoding (pins, EOS from `fixed_length` on), -1 where free."""
    gen_length = settings["gen_length"]
    prior = torch.full((gen_length,), -1, dtype=torch.long)
    length = settings["fixed_length"] or gen_length
    prior[length:] = settings["eos_token_id"]
    for position, ids in sorted((int(position), list(ids)) for position, ids in settings["pin_ids"].items()):
        start = position % length
        if not ids or start + len(ids) > length or (prior[start : start + len(ids)] >= 0).any():
            raise ValueError(f"pin_ids: {ids} at {position} is empty, runs past {length} or overlaps another pin")
        prior[start : start + len(ids)] = torch.tensor(ids, dtype=torch.long)
    return prior


def _first_eos(response: torch.Tensor, masked: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B] position of the first committed EOS, -1 where there is none."""
    is_eos = (response == eos_id) & ~masked
    none = torch.full((response.shape[0],), -1, dtype=torch.long, device=response.device)
    return torch.where(is_eos.any(-1), is_eos.float().argmax(-1), none)


def _settled(response: torch.Tensor, masked: torch.Tensor, eos_id: int) -> torch.Tensor:
    """[B] True where nothing is masked, or a committed EOS has nothing masked before it."""
    first_eos = _first_eos(response, masked, eos_id)
    positions = torch.arange(response.shape[1], device=response.device)[None, :]
    masked_before = (masked & (positions < first_eos[:, None])).any(-1)
    return ~masked.any(-1) | ((first_eos >= 0) & ~masked_before)


def _filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float) -> torch.Tensor:
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -torch.inf)
    if top_p < 1.0:
        ranked, ranked_ids = logits.sort(dim=-1, descending=True)
        ranked_probs = torch.softmax(ranked.float(), dim=-1)
        # A token is dropped once the tokens ranked above it already hold top_p; the top token always stays.
        dropped = (ranked_probs.cumsum(-1) - ranked_probs) >= top_p
        logits = logits.masked_fill(torch.zeros_like(dropped).scatter(-1, ranked_ids, dropped), -torch.inf)
    return logits


def _draw_tokens(logits: torch.Tensor, settings: dict, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Token per position and the filtered temperature-1 distribution its confidence is read from."""
    logits = _filter_logits(logits.float(), settings["top_k"], settings["top_p"])
    probs = torch.softmax(logits, dim=-1)
    if settings["temperature"] <= 0:
        return probs.argmax(dim=-1), probs
    # Gumbel-max in float64 (low-precision noise skews samples), drawn on the CPU so a seeded generator gives the
    # same draws on every device.
    uniform = torch.rand(logits.shape, generator=generator, dtype=torch.float64, device="cpu").to(logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp(min=1e-20)))
    return (logits.double() / settings["temperature"] + gumbel).argmax(dim=-1), probs


def _entropy(probs: torch.Tensor) -> torch.Tensor:
    return -(probs * probs.clamp(min=1e-30).log()).sum(-1)


def _confidence(probs: torch.Tensor, tokens: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "probability":
        return probs.gather(-1, tokens[..., None]).squeeze(-1)
    if kind == "margin":
        top2 = probs.topk(2, dim=-1).values
        return top2[..., 0] - top2[..., 1]
    return -_entropy(probs)


def _best(score: torch.Tensor, allowed: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """[b, L] True at the `count[b]` highest-scoring allowed positions of each row."""
    score = torch.where(allowed, score, torch.full_like(score, -torch.inf))
    rank = score.argsort(dim=-1, descending=True).argsort(dim=-1)
    return allowed & (rank < count[:, None])


def _commit_rule(logits, masked, block, block_step, settings, generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(candidate token per position, positions to commit) for one step of the samples still decoding."""
    decoder, block_length = settings["decoder"], settings["block_length"]
    batch, length = masked.shape
    tokens, probs = _draw_tokens(logits, settings, generator)
    if decoder == "multi_block":
        uncertainty = _entropy(probs)
        blocks = length // block_length
        decoded = 1.0 - masked.view(batch, blocks, block_length).float().mean(-1)
        previous = torch.cat([torch.ones_like(decoded[:, :1]), decoded[:, :-1]], dim=1)
        # A block opens once every block before it is open and its predecessor is decoded far enough.
        opened = (previous >= settings["activate_fraction"]).long().cumprod(-1).bool()
        full = opened & (previous >= settings["full_activate_fraction"])
        opened = opened.repeat_interleave(block_length, dim=1) & masked
        full = full.repeat_interleave(block_length, dim=1) & masked
        forced = _best(-uncertainty, full, torch.ones_like(block))
        return tokens, (opened & (uncertainty <= settings["threshold"])) | forced

    positions = torch.arange(length, device=masked.device)[None, :]
    start = (block * block_length)[:, None]
    in_block = masked & (positions >= start) & (positions < start + block_length)
    # The fixed schedule: the block's masks split evenly over the steps it has left (remainder first), all of
    # them at its last step.
    steps_left = (settings["steps"] // (length // block_length) - block_step).clamp(min=1)
    scheduled = torch.div(in_block.sum(-1) + steps_left - 1, steps_left, rounding_mode="floor")
    if decoder == "low_confidence":
        if settings["remasking"] == "random":
            score = torch.rand(masked.shape, generator=generator, device="cpu").to(masked.device)
        else:
            score = _confidence(probs, tokens, "probability")
        return tokens, _best(score, in_block, scheduled)
    score = _confidence(probs, tokens, settings["confidence"])
    above = in_block & (score > settings["threshold"])
    if decoder == "threshold":
        return tokens, above | _best(score, in_block, torch.ones_like(block))
    # confident: the threshold rule while it finds a position, the schedule otherwise and at the block's last step
    use_threshold = above.any(-1) & (steps_left != 1)
    return tokens, torch.where(use_threshold[:, None], above, _best(score, in_block, scheduled))


class FewstepDimpleModel(FewstepDimplePreTrainedModel):
    """Embedding, decoder blocks, final norm and LM head; returns (shifted) logits."""

    def __init__(self, config: FewstepDimpleConfig):
        super().__init__(config)
        if config.hidden_size % config.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if config.num_attention_heads % config.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.hidden_size // config.num_attention_heads, config.rope_theta)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: tuple | None = None,
        use_cache: bool = False,
        causal: bool | None = None,
        **kwargs,
    ) -> FewstepDimpleOutput:
        """Args:
        input_ids: `[B, T]` current tokens.
        attention_mask: `[B, past_len + T]`, 1 for real tokens, 0 for padding.
        position_ids: `[B, T]`; default counts real tokens from the left (so left padding is harmless).
        cache: per-layer `(key, value)` of earlier tokens, or None.
        causal: override `config.causal` (True for the autoregressive phase).
        """
        batch, length = input_ids.shape
        past_len = cache[0][0].shape[2] if cache is not None else 0
        causal = self.config.causal if causal is None else causal
        if position_ids is None:
            if attention_mask is not None:
                positions = attention_mask.long().cumsum(-1) - 1
                position_ids = positions[:, past_len:].clamp(min=0)
            else:
                position_ids = torch.arange(past_len, past_len + length, device=input_ids.device)
                position_ids = position_ids.expand(batch, length)
        x = self.embed_tokens(input_ids)
        cos, sin = self.rotary(position_ids, x.dtype)
        mask = build_attention_mask(attention_mask, batch, length, past_len, causal, input_ids.device)
        presents = []
        for index, layer in enumerate(self.layers):
            past = cache[index] if cache is not None else None
            if self.gradient_checkpointing and self.training:
                x, present = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, past, use_reentrant=False)
            else:
                x, present = layer(x, cos, sin, mask, past)
            presents.append(present)
        logits = self.lm_head(self.norm(x))
        return FewstepDimpleOutput(logits=logits, cache=tuple(presents) if use_cache else None)

    # -- diffusion decoding ------------------------------------------------------------------------------------

    @torch.no_grad()
    def diffusion_generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        generation_config: GenerationConfig | dict | None = None,
        generator: torch.Generator | None = None,
        **overrides,
    ) -> DiffusionGenerateOutput:
        """Decode a response after each prompt: `gen_length` mask tokens, committed over forward passes.

        Each forward encodes prompt + response (no KV cache) and the decoder commits masked response positions:
        `low_confidence` the k most confident of the current block (k from an even split of the block's masks over
        `steps`), `confident` (Dimple) every one of the current block above `threshold` or the schedule's k when
        none is, `threshold` (Fast-dLLM) every one above `threshold` and always the most confident, `multi_block`
        (d3LLM) every one with entropy <= `threshold` in the active blocks and always the lowest-entropy one.
        A sample stops once it has a committed EOS with nothing masked before it (its answer is settled) or
        nothing is masked; what is still masked then becomes EOS.

        Args:
            input_ids: `[B, P]` prompt ids, left-padded (apply the tokenizer's chat template first).
            attention_mask: `[B, P]`, 0 on the left padding; None means no padding.
            generation_config: a `GenerationConfig` whose `diffusion` entry holds the decoding settings, or a
                dict of those settings; None reads the `generation_config.json` saved with the weights (the
                defaults the model was exported with), then `DEFAULT_DECODING`.
            generator: CPU generator for sampling (`temperature` > 0) and `remasking="random"`.
            overrides: any decoding setting (`DEFAULT_DECODING` names them), e.g. `threshold=0.95`.

        Returns `DiffusionGenerateOutput`: `sequences` (prompt + response), `nfe`, `order`.
        """
        settings = self._decoding_settings(generation_config, overrides)
        mask_id, eos_id = settings["mask_token_id"], settings["eos_token_id"]
        gen_length, block_length = settings["gen_length"], settings["block_length"]
        device = input_ids.device
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
        batch, prompt_len = input_ids.shape

        prior = _structure_prior(settings).to(device)
        pinned = (prior >= 0)[None, :].expand(batch, gen_length)
        response = torch.where(pinned, prior, torch.full_like(prior, mask_id)).clone()
        order = torch.full((batch, gen_length), -1, dtype=torch.long, device=device)
        nfe = torch.zeros(batch, dtype=torch.long, device=device)
        positions = torch.arange(gen_length, device=device)[None, :]
        decoding = ~_settled(response, response == mask_id, eos_id)
        while decoding.any():
            # Only the samples still decoding take part in a forward (and count it).
            rows = decoding.nonzero().squeeze(-1)
            current = response[rows]
            masked = current == mask_id
            ids = torch.cat([input_ids[rows], current], dim=1)
            mask = torch.cat([attention_mask[rows], torch.ones_like(current)], dim=1)
            logits = self(input_ids=ids, attention_mask=mask).logits
            if self.config.shifted_logits:
                # Position i-1 scores token i; position 0 has no predecessor and repeats its own row.
                logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            logits = logits[:, prompt_len:]
            logits[..., mask_id] = -torch.inf  # the mask token is never an answer token

            # The current block is the first with a masked position; its step count starts after the last
            # commit before it.
            blocks_masked = masked.view(len(rows), gen_length // block_length, block_length).any(-1)
            block = blocks_masked.float().argmax(-1)
            before = positions < (block * block_length)[:, None]
            last_commit = torch.where(before, order[rows], torch.full_like(order[rows], -1)).max(-1).values
            block_step = nfe[rows] - (last_commit + 1)
            tokens, commit = _commit_rule(logits, masked, block, block_step, settings, generator)
            commit &= masked
            if not commit.any(-1).all():
                raise RuntimeError(f"decoder '{settings['decoder']}' committed no token for some sample")
            current = torch.where(commit, tokens, current)
            order[rows] = torch.where(commit, nfe[rows][:, None].expand_as(commit), order[rows])
            nfe[rows] += 1
            if settings["eos_fill"]:
                # Masks after a committed EOS cannot change the answer: fill them so no forward is spent on them.
                first_eos = _first_eos(current, current == mask_id, eos_id)
                fill = (positions > first_eos[:, None]) & (first_eos[:, None] >= 0) & (current == mask_id)
                current = torch.where(fill, torch.full_like(current, eos_id), current)
            response[rows] = current
            decoding[rows[_settled(current, current == mask_id, eos_id)]] = False

        # Finished early: whatever is still masked lies after the answer's EOS.
        response = torch.where(response == mask_id, torch.full_like(response, eos_id), response)
        return DiffusionGenerateOutput(sequences=torch.cat([input_ids, response], dim=1), nfe=nfe, order=order)

    def _decoding_settings(self, generation_config: GenerationConfig | dict | None, overrides: dict) -> dict:
        if generation_config is None:
            generation_config = self._saved_generation_config()
        if isinstance(generation_config, dict):
            saved, token_ids = generation_config, {}
        else:
            saved = getattr(generation_config, "diffusion", None) or {}
            token_ids = {name: getattr(generation_config, name, None) for name in ("mask_token_id", "eos_token_id")}
        unknown = sorted((set(saved) | set(overrides)) - set(DEFAULT_DECODING))
        if unknown:
            raise ValueError(f"unknown decoding setting(s) {', '.join(unknown)} (known: {', '.join(DEFAULT_DECODING)})")
        settings = {**DEFAULT_DECODING, **saved, **overrides}
        for name in ("mask_token_id", "eos_token_id"):
            if settings[name] is None:
                settings[name] = token_ids.get(name)
            if settings[name] is None:
                settings[name] = getattr(self.config, name)
        if settings["decoder"] not in DECODERS:
            raise ValueError(f"decoder: unknown name '{settings['decoder']}' (known: {', '.join(DECODERS)})")
        gen_length = settings["gen_length"]
        block_length = settings["block_length"] or gen_length
        steps = settings["steps"] or gen_length
        if gen_length % block_length:
            raise ValueError(f"gen_length {gen_length} is not a multiple of block_length {block_length}")
        if steps % (gen_length // block_length) or steps > gen_length:
            raise ValueError(
                f"steps {steps} must divide evenly over {gen_length // block_length} blocks and be <= "
                f"gen_length {gen_length}"
            )
        if settings["fixed_length"] is not None and settings["fixed_length"] > gen_length:
            raise ValueError(f"fixed_length {settings['fixed_length']} exceeds gen_length {gen_length}")
        settings.update(block_length=block_length, steps=steps)
        return settings

    def _saved_generation_config(self) -> GenerationConfig | None:
        # transformers reads generation_config.json only for models with `generate`; this one reads it itself, once,
        # from where the weights came from.
        if "_diffusion_generation_config" not in self.__dict__:
            try:
                found = GenerationConfig.from_pretrained(self.name_or_path)
            except (OSError, ValueError, TypeError):
                found = None
            self.__dict__["_diffusion_generation_config"] = found
        return self.__dict__["_diffusion_generation_config"]
