"""Tiny teachers for tests: fewstep's native backbone classes at a few thousand parameters."""

import dataclasses
from pathlib import Path

import torch

from teachers.interface import BACKBONES, Teacher, new_teacher

BACKBONE_NAMES = ("llada", "dream", "dimple")
# For scripted stand-in models: an unshifted backbone (position i scores token i) under another name.
SCRIPTED = dataclasses.replace(BACKBONES["llada"], name="scripted")


def tiny_sizes(hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int, positions: int) -> dict:
    return {
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": positions,
    }


def tiny_teacher(*sizes: int, backbone: str = "dream", published_chat: bool = False) -> Teacher:
    """A random tiny teacher (default: the embedded default's Dream LM with the compact character chat format)."""
    return new_teacher(backbone, tiny_sizes(*sizes), published_chat=published_chat)


def keep_logits(logits: torch.Tensor, logits_to_keep: int | slice) -> torch.Tensor:
    """The positions a backbone's `logits_to_keep` selects (0: all, n: the last n, a slice: those)."""
    if isinstance(logits_to_keep, slice):
        return logits[:, logits_to_keep]
    return logits[:, -logits_to_keep:] if logits_to_keep else logits


# The published-layout fixtures (tiny random checkpoints + the original code's logits) in the steering repo's
# shared folder, which sits beside the checkout (as in CI).
BACKBONE_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "backbones"
