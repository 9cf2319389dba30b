"""fewstep's decoding engine: a recipe's decoder run through the teacher interface.

The decoding rules themselves (every decoder, the loop they share, counting, the KV cache, structure priors) live
in one torch-only module, `teachers/backbones/diffusion_generation.py`, which exports also carry so that their
`diffusion_generate` decodes exactly as fewstep does. This file turns a recipe's `DecoderConfig` into that module's
`DecodeSettings` (text pins become token ids through the teacher's tokenizer), pads the prompts, and hands the loop
the teacher's aligned forward and prefill. Trajectory generation, evaluation, the bench and export verification
all decode through `decode` here.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from distill.recipe import DecoderConfig
from teachers.backbones.diffusion_generation import (
    DecodeSettings,
    confidence_of,
    entropy,
    filter_logits,
    finished_rows,
    generate,
    sample_tokens,
    top_positions,
)
from teachers.interface import Teacher
from teachers.vision import VisionInputs, collate_vision

__all__ = [
    "DecodeResult",
    "check_config",
    "confidence_of",
    "decode",
    "decode_settings",
    "entropy",
    "filter_logits",
    "finished_rows",
    "left_pad",
    "sample_tokens",
    "top_positions",
]


@dataclass
class DecodeResult:
    """Outputs of one batched decode. All tensors are on CPU."""

    tokens: torch.Tensor  # [B, gen_length] response token ids
    order: torch.Tensor  # [B, gen_length] step at which each position was committed, -1 if no forward did
    nfe: torch.Tensor  # [B] forward passes each sample took part in
    generated: torch.Tensor  # [B] response tokens before the first end token, pinned tokens excluded
    forwards: int = 0  # forwards of the batch
    prefills: int = 0  # cache prefills besides them

    @property
    def tpf(self) -> torch.Tensor:
        """Tokens per forward, per sample."""
        return self.generated.float() / self.nfe.clamp(min=1).float()


def check_config(config: DecoderConfig, gen_length: int) -> None:
    """Reject decoder settings that do not fit `gen_length` (one-line ValueError naming the setting)."""
    try:
        config.check_lengths(gen_length)
    except ValueError as error:
        raise ValueError(f"decoder: {error}") from None


def decode_settings(teacher: Teacher, config: DecoderConfig, gen_length: int) -> DecodeSettings:
    """The decoding module's settings for a recipe decoder on `gen_length` tokens (pins encoded to ids)."""
    check_config(config, gen_length)
    pin_ids = {}
    for position, text in config.pins.items():
        pin_ids[position] = teacher.tokenizer.encode(text, add_special_tokens=False)
        if not pin_ids[position]:
            raise ValueError(f"decoder: pins: text {text!r} at {position} encodes to no tokens")
    names = ("steps", "block_length", "threshold", "confidence", "remasking", "temperature", "top_k", "top_p")
    names += ("activate_fraction", "full_activate_fraction", "eos_fill", "fixed_length", "cache", "cache_delay")
    names += ("refresh_every",)
    static = config.static or config.compile  # a compiled forward needs the fixed shapes of the static path
    try:
        return DecodeSettings(
            decoder=config.name,
            gen_length=gen_length,
            pin_ids=pin_ids,
            static=static,
            **{name: getattr(config, name) for name in names},
        )
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


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled(model: torch.nn.Module) -> torch.nn.Module:
    """`model` through `torch.compile`, once per model (later decodes reuse its compiled shapes): CUDA graphs
    (`reduce-overhead`) on a GPU, inductor's default on CPU; fixed shapes (`dynamic=False`), as the static path
    gives them."""
    if model not in _COMPILED:
        on_gpu = next(model.parameters()).is_cuda
        _COMPILED[model] = torch.compile(model, mode="reduce-overhead" if on_gpu else "default", dynamic=False)
    return _COMPILED[model]


@torch.no_grad()
def decode(
    teacher: Teacher,
    prompts: list[list[int]],
    config: DecoderConfig,
    gen_length: int,
    generator: torch.Generator | None = None,
    vision: list[VisionInputs | None] | None = None,
) -> DecodeResult:
    """Decode a batch of prompt id lists with the decoder named in `config`.

    `vision` holds each prompt's images (`Teacher.encode_prompt(...).vision`, None for a text prompt), for
    Dimple. They are encoded by the vision tower once, here, and each forward of the loop gets the features of the
    rows it decodes (`RowImages`).
    """
    settings = decode_settings(teacher, config, gen_length)
    prompt_ids, prompt_mask = left_pad(prompts, teacher.pad_token_id)
    device = teacher.device
    prompt_images = None
    images = collate_vision(vision or [])
    if images:
        if len(vision) != len(prompts):
            raise ValueError(f"decode: {len(vision)} vision entries for {len(prompts)} prompts")
        images = {name: value.to(device) for name, value in images.items()}
        prompt_images = teacher.row_images(prompt_ids.to(device), **images)

    # Forwards run through the compiled model; prefills (a few per decode, each of another shape) do not.
    stepping = teacher.with_model(compiled(teacher.model)) if config.compile else teacher

    def forward(ids, mask, start, cache, **inputs):
        return stepping.forward(ids, mask, cache=cache, start=start, **inputs)

    out = generate(
        forward,
        teacher.prefill,
        prompt_ids.to(device),
        prompt_mask.to(device),
        settings,
        teacher.mask_token_id,
        teacher.end_token_id,
        generator,
        prompt_images=prompt_images,
    )
    return DecodeResult(
        tokens=out.tokens.cpu(),
        order=out.order.cpu(),
        nfe=out.nfe.cpu(),
        generated=out.generated.cpu(),
        forwards=out.forwards,
        prefills=out.prefills,
    )
