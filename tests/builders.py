"""Tiny teachers for tests: fewstep's native backbone classes at a few thousand parameters."""

import dataclasses
from pathlib import Path

import torch

from teachers.interface import BACKBONES, Teacher, new_teacher, save_teacher

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


def saved_tiny_teacher(directory: Path) -> Path:
    """The tests' standard tiny teacher (seed 0, one layer) saved as `directory/teacher`; returns its path."""
    torch.manual_seed(0)
    path = Path(directory) / "teacher"
    save_teacher(tiny_teacher(32, 64, 1, 2, 1, 64), path)
    return path


def right_padded_batch(teacher: Teacher) -> dict:
    """Two `[prompt | response]` rows with prompts of different lengths, right-padded (as `SequencePool` builds)."""
    rows = [(teacher.encode_prompt(q).ids, teacher.encode_response(a)) for q, a in [("123+45", "168"), ("1+1", "2")]]
    width = max(len(prompt) + len(response) for prompt, response in rows)
    ids = torch.full((2, width), teacher.pad_token_id)
    attention, response_mask = torch.zeros_like(ids), torch.zeros_like(ids)
    for row, (prompt, response) in enumerate(rows):
        ids[row, : len(prompt) + len(response)] = torch.tensor(prompt + response)
        attention[row, : len(prompt) + len(response)] = 1
        response_mask[row, len(prompt) : len(prompt) + len(response)] = 1
    return {"input_ids": ids, "attention_mask": attention, "response_mask": response_mask}


def keep_logits(logits: torch.Tensor, logits_to_keep: int | slice) -> torch.Tensor:
    """The positions a backbone's `logits_to_keep` selects (0: all, n: the last n, a slice: those)."""
    if isinstance(logits_to_keep, slice):
        return logits[:, logits_to_keep]
    return logits[:, -logits_to_keep:] if logits_to_keep else logits


# The published-layout fixtures (tiny random checkpoints + the original code's logits) in the steering repo's
# shared folder, which sits beside the checkout (as in CI).
BACKBONE_FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "backbones"
