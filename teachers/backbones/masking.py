"""The attention mask and positions every fewstep backbone builds from a 2-D padding mask (one rule, three models).

Diffusion LMs attend bidirectionally; the AR phase and the AR baseline attend causally; batches are left-padded;
a prefix KV cache puts `past_len` cached tokens before the current ones. transformers' mask builders assume causal
decoders, so the backbones build their explicit 4-D mask here, and their positions by Dream's rule.
Exports carry this file beside the modeling files (relative import).
"""

import torch


def attention_mask_4d(
    attention_mask: torch.Tensor | None, batch: int, query_len: int, past_len: int, causal: bool, device
) -> torch.Tensor:
    """Boolean `[B, 1, query_len, past_len + query_len]`, True where a query may attend.

    `attention_mask` is the 2-D padding mask `[B, past_len + query_len]` (1 = real token) or None (no padding):
    padded keys are hidden from every query. Queries are the last `query_len` tokens, so under `causal` query i
    sits at key index past_len + i. A query with no visible key (a left pad under causal attention) attends to
    itself, so softmax never sees an all-masked row (NaN).
    """
    key_len = past_len + query_len
    if attention_mask is None:
        allowed = torch.ones(batch, 1, query_len, key_len, dtype=torch.bool, device=device)
    else:
        if attention_mask.shape != (batch, key_len):
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, expected ({batch}, {key_len}): "
                "one column per cached and current token"
            )
        allowed = attention_mask.bool()[:, None, None, :].expand(batch, 1, query_len, key_len)
    query_index = torch.arange(query_len, device=device) + past_len
    key_index = torch.arange(key_len, device=device)
    if causal:
        allowed = allowed & (key_index[None, :] <= query_index[:, None])
    itself = key_index[None, :] == query_index[:, None]
    return allowed | (itself & ~allowed.any(-1, keepdim=True))


def for_attention(mask: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The boolean mask as the attention kernel wants it: SDPA takes it as is, eager adds it to the scores."""
    if attn_implementation == "sdpa":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def default_position_ids(
    attention_mask: torch.Tensor | None, batch: int, query_len: int, past_len: int, device
) -> torch.Tensor:
    """`[B, query_len]` positions of the current tokens: `cumsum(mask) - 1` over cached + current columns, pads 1.

    Renumbering from each row's first real token makes a left-padded row equal to the row alone (Dream's rule; for
    LLaDA's absolute positions the logits on real tokens are the same, RoPE seeing only offsets between them).
    """
    if attention_mask is None:
        return (torch.arange(query_len, device=device) + past_len).expand(batch, query_len)
    positions = attention_mask.long().cumsum(-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)[:, past_len:]
