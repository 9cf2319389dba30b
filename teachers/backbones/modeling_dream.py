"""Dream (Dream-org/Dream-v0-Instruct-7B): Qwen2.5 decoder layers run as a bidirectional masked-diffusion LM.

The weights are a Qwen2.5-7B's (`model.embed_tokens`, `model.layers.{i}` = transformers' `Qwen2DecoderLayer`,
`model.norm`, `lm_head`), so the layers, norm and rotary embedding are transformers' own. What this file adds is
what Dream does differently from a causal Qwen2:

- attention is bidirectional unless asked to be causal (`causal=` per call, else `config.causal`), through ONE
  explicit 4-D mask `[B, 1, T, past + T]` built from a 2-D padding mask: padding keys are hidden from every query,
  causal hides later keys, and a query with nothing to attend to attends to itself (no NaN). An explicit mask is
  always passed, because transformers' SDPA path turns a missing mask into `is_causal=True`;
- positions renumber from 0 at each row's first real token (`cumsum(mask) - 1`, pads get 1), so a left-padded row
  gets the same logits as the row alone;
- `cache` is a transformers `DynamicCache`: the current tokens attend to the cached ones and are appended to it
  (callers crop it back); with `use_cache=True` and no cache, one is created and returned in `.cache`;
- `logits_to_keep` (an int n = last n positions, a slice = those positions) puts only those hidden states through
  the LM head, which dominates memory at a 152k vocabulary;
- logits are RAW and *shifted*: position i-1 scores token i (`logits_shifted = True`); callers align them.

Loaded by fewstep directly and copied beside exported checkpoints (`auto_map`), so it imports only torch,
transformers and its siblings.
"""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding
from transformers.utils import ModelOutput

from .configuration_dream import DreamConfig
from .diffusion_generation import DiffusionGenerationMixin
from .masking import attention_mask_4d, default_position_ids, for_attention


@dataclass
class DreamOutput(ModelOutput):
    logits: torch.Tensor | None = None  # [B, kept positions, vocab] raw (shifted) logits
    cache: DynamicCache | None = None  # the cache the current tokens were appended to, if any


class DreamPreTrainedModel(PreTrainedModel):
    # transformers' generic `_init_weights` (Qwen2's too) fits as is: normal(std=initializer_range) for linears and
    # embeddings, zero biases, unit norms, and the rotary `inv_freq` buffers recomputed (checkpoints do not hold them).
    config_class = DreamConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer"]
    _tied_weights_keys = {}  # the LM head is not tied to the embedding
    # The 4-D boolean/additive masks below suit SDPA and eager; flash/flex kernels take other mask formats.
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False


class DreamBaseModel(DreamPreTrainedModel):
    """Embedding, Qwen2 decoder layers and final norm: hidden states `[B, T, hidden]` of the current tokens."""

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        # No `padding_idx`: Dream's pad id is its EOS, a real token whose embedding must keep training.
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = Qwen2RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = Qwen2RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DynamicCache | None = None,
        use_cache: bool = False,
        causal: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        """`position_ids` may be `[B, T]`, or `[3, B, T]` for an M-RoPE rotary (Dimple); None applies Dream's rule."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past = cache.get_seq_length() if cache is not None else 0
        causal = self.config.causal if causal is None else causal

        mask = attention_mask_4d(attention_mask, batch, length, past, causal, device)
        mask = for_attention(mask, self.config._attn_implementation, inputs_embeds.dtype)
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, batch, length, past, device)

        hidden_states = inputs_embeds
        position_embeddings = self.rotary_emb(hidden_states, position_ids)
        for layer in self.layers:
            hidden_states = layer(
                hidden_states,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                cache=cache,
                use_cache=use_cache,
                **kwargs,
            )
        return BaseModelOutputWithPast(last_hidden_state=self.norm(hidden_states), cache=cache)


class DreamModel(DreamPreTrainedModel, DiffusionGenerationMixin):
    """Dream's LM: `DreamBaseModel` + an untied LM head; raw logits are shifted (position i-1 scores token i)."""

    logits_shifted = True

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DynamicCache | None = None,
        use_cache: bool = False,
        causal: bool | None = None,
        logits_to_keep: int | slice | torch.Tensor = 0,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> DreamOutput:
        """Raw logits of the current tokens.

        Args:
            input_ids: `[B, T]` current tokens (or `inputs_embeds` `[B, T, hidden]`).
            attention_mask: `[B, past + T]`, 1 = real token, 0 = padding (left padding is exact); None = no padding.
            position_ids: `[B, T]`; None = `cumsum(attention_mask) - 1` over past + current, pads 1.
            cache: a `DynamicCache` holding `past` tokens; the current tokens attend to it and are appended to it.
            use_cache: create a cache when `cache` is None (returned in `.cache`).
            causal: causal attention for this call; None = `config.causal`.
            logits_to_keep: 0 = every position; an int n = the last n positions; a slice (or index tensor) = those
                positions. Only the kept positions go through the LM head.
        """
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            causal=causal,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
        if isinstance(logits_to_keep, int):
            logits_to_keep = slice(-logits_to_keep, None)  # -0 == 0: every position
        logits = self.lm_head(outputs.last_hidden_state[:, logits_to_keep])
        return DreamOutput(logits=logits, cache=outputs.cache)
