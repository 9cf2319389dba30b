"""The embedded Dimple-family diffusion LM: Qwen2-style blocks with bidirectional attention.

Blocks are RMSNorm -> grouped-query attention with RoPE -> RMSNorm -> SwiGLU MLP, as in Qwen2.5 (the language model
under Dream and Dimple). Attention is bidirectional by default and switches to causal for the autoregressive
training phase. Logits are *shifted* like Dream/Dimple when `config.shifted_logits` is set: the output at position
i-1 scores token i, which is also exactly next-token prediction, so one head serves both phases.

`cache` is a tuple with one `(key, value)` pair per layer, each `[batch, kv_heads, past_len, head_dim]`;
the current tokens attend to it and to each other. With `use_cache=True` the output carries the pairs for
past + current tokens. Diffusion decoders use this to encode a prompt once (prefilling) and re-encode only the
response.

Self-contained on purpose (torch + transformers only): exported checkpoints copy this file so that
`AutoModel.from_pretrained(dir, trust_remote_code=True)` works without fewstep installed.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_fewstep_dimple import FewstepDimpleConfig


@dataclass
class FewstepDimpleOutput(ModelOutput):
    logits: torch.Tensor | None = None
    cache: tuple | None = None


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
