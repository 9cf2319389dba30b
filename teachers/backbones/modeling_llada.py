"""LLaDA (GSAI-ML/LLaDA-8B-Instruct) as a transformers model: the published weights, fewstep's forward.

The published checkpoint is an OLMo-style Llama: each block is RMSNorm -> attention with RoPE (no biases, grouped
heads when `n_kv_heads < n_heads`) -> residual -> RMSNorm -> SwiGLU MLP `ff_out(silu(ff_proj(x)) * up_proj(x))` ->
residual, under a final RMSNorm and an untied output head `transformer.ff_out`. Only the weight names and the
attention differ from Llama, so this file reuses transformers' Llama parts (RMSNorm, rotary embedding,
`apply_rotary_pos_emb`, the attention interface) and writes the block under the published names; weights load
from the published `model.transformer.*` keys unchanged.

The forward is fewstep's backbone contract, shared with Dream and Dimple:
- attention is bidirectional (LLaDA's); `causal=True`, or `config.causal`, makes it causal (the AR baseline);
- `attention_mask` `[B, past + T]` is a 2-D padding mask; padded keys are hidden from every query, as the
  published code's key bias does, so a left-padded batch equals per-sample forwards on the real positions;
- positions count real tokens (`cumsum(mask) - 1`); the published code uses absolute positions, which gives the
  same logits on real positions, since with padded keys hidden RoPE only sees offsets between real tokens;
- `cache` is a transformers `DynamicCache`: the current tokens attend to the cached and the current keys, and
  each layer appends its keys and values (callers crop it back);
- logits are raw and unshifted (position i scores token i: `logits_shifted = False`); `logits_to_keep` picks the
  positions that go through the output head, which at a 126k vocabulary dominates memory.

Loaded by fewstep directly and copied beside exported checkpoints (`auto_map`), so it imports only torch,
transformers and its siblings.
"""

from collections.abc import Callable

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.models.llama.modeling_llama import (
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .configuration_llada import LLaDAConfig
from .diffusion_generation import DiffusionGenerationMixin
from .masking import attention_mask_4d, default_position_ids, for_attention


class LLaDABlock(GradientCheckpointingLayer):
    """One published `LLaDALlamaBlock`: attention and SwiGLU MLP, each after an RMSNorm, each added back.

    The block is also the attention module handed to transformers' attention functions, so it carries what they
    read: `is_causal` (False: causality comes only from the explicit mask), `num_key_value_groups`, `scaling`.
    """

    def __init__(self, config: LLaDAConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.n_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = False
        d_model, kv_width, hidden = config.d_model, config.num_key_value_heads * self.head_dim, config.intermediate_size

        self.attn_norm = LlamaRMSNorm(d_model, eps=config.rms_norm_eps)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.k_proj = nn.Linear(d_model, kv_width, bias=False)
        self.v_proj = nn.Linear(d_model, kv_width, bias=False)
        self.attn_out = nn.Linear(d_model, d_model, bias=False)
        self.ff_norm = LlamaRMSNorm(d_model, eps=config.rms_norm_eps)
        self.ff_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.ff_out = nn.Linear(hidden, d_model, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        cache: Cache | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        x = self.attn_norm(hidden_states)
        q = self.q_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, -1, self.head_dim).transpose(1, 2)

        # cos/sin come in fp32; with `rope_full_precision` (published: true) LLaDA rotates in fp32 too, which
        # matters for bf16 weights.
        cos, sin = position_embeddings
        if self.config.rope_full_precision:
            q_rot, k_rot = apply_rotary_pos_emb(q.float(), k.float(), cos, sin)
        else:
            q_rot, k_rot = apply_rotary_pos_emb(q, k, cos.to(q.dtype), sin.to(q.dtype))
        q, k = q_rot.to(v.dtype), k_rot.to(v.dtype)

        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)

        attention: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attended, _ = attention(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
        )
        hidden_states = hidden_states + self.attn_out(attended.reshape(batch, length, -1))

        x = self.ff_norm(hidden_states)
        return hidden_states + self.ff_out(nn.functional.silu(self.ff_proj(x)) * self.up_proj(x))


class LLaDAPreTrainedModel(PreTrainedModel):
    # `PreTrainedModel._init_weights` already initialises as LLaDA needs: normal(std=`init_std`, the config's
    # `initializer_range`) for linears and the embedding, ones for the RMSNorms, the rotary frequencies.
    config_class = LLaDAConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["LLaDABlock"]
    _supports_sdpa = True
    _tied_weights_keys = {}


class LLaDAModel(LLaDAPreTrainedModel):
    """The published `LLaDAModel`: `transformer.{wte, blocks, ln_f, ff_out}`. Returns the final hidden states;
    `transformer.ff_out` is the output head, which `LLaDAModelLM` applies to the positions it keeps."""

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        width = config.embedding_size or config.vocab_size
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(width, config.d_model),
                "blocks": nn.ModuleList(LLaDABlock(config, i) for i in range(config.n_layers)),
                "ln_f": LlamaRMSNorm(config.d_model, eps=config.rms_norm_eps),
                "ff_out": nn.Linear(config.d_model, width, bias=False),
            }
        )
        self.rotary_emb = LlamaRotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.transformer.wte = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        causal: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """See `LLaDAModelLM.forward`; returns `last_hidden_state` `[B, T, d_model]` and `cache`."""
        batch, length = input_ids.shape
        device = input_ids.device
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        causal = self.config.causal if causal is None else causal

        hidden_states = self.transformer.wte(input_ids)
        mask = None  # no padding and bidirectional: no mask, so SDPA may pick its fastest kernel (is_causal False)
        if attention_mask is not None or causal:
            mask = attention_mask_4d(attention_mask, batch, length, past, causal, device)
            mask = for_attention(mask, self.config._attn_implementation, hidden_states.dtype)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, batch, length, past, device)
        # A float32 probe makes the rotary embedding return fp32 cos/sin whatever the model dtype.
        position_embeddings = self.rotary_emb(torch.empty(0, dtype=torch.float32, device=device), position_ids)

        for block in self.transformer.blocks:
            hidden_states = block(hidden_states, mask, position_embeddings, cache=cache)
        return BaseModelOutputWithPast(last_hidden_state=self.transformer.ln_f(hidden_states), cache=cache)


class LLaDAModelLM(LLaDAPreTrainedModel, DiffusionGenerationMixin):
    """The published `LLaDAModelLM` (`model.transformer.*` weights), with fewstep's forward and
    `diffusion_generate`. Logits are unshifted: position i scores token i."""

    logits_shifted = False

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDAModel(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.transformer.wte

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.transformer.wte = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.model.transformer.ff_out

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.model.transformer.ff_out = value

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool = False,
        causal: bool | None = None,
        logits_to_keep: int | slice | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Raw logits of the current tokens.

        Args:
            input_ids: `[B, T]` current tokens.
            attention_mask: `[B, past + T]`, 1 on real tokens, 0 on padding (cached tokens first); None: no padding.
            position_ids: `[B, T]` RoPE positions; None counts real tokens (`cumsum(mask) - 1`, pads 1), or
                `past + arange(T)` without a mask.
            cache: a `DynamicCache` holding the keys and values of earlier tokens, or None. It is updated in place.
            use_cache: create a cache when `cache` is None, and return it.
            causal: causal attention for this call; None uses `config.causal` (False: bidirectional).
            logits_to_keep: 0 keeps every position; an int n the last n; a slice or index tensor those positions.
            kwargs: accepted for transformers' callers (e.g. `return_dict`) and ignored.

        Returns `CausalLMOutputWithPast` with `logits` `[B, kept, embedding_size]` in the model's dtype and `cache`.
        """
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            causal=causal,
        )
        kept = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        return CausalLMOutputWithPast(logits=self.model.transformer.ff_out(kept), cache=outputs.cache)


__all__ = ["LLaDABlock", "LLaDAModel", "LLaDAModelLM", "LLaDAPreTrainedModel"]
