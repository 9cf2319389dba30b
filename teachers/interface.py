"""One teacher interface over every backbone (tiny, Dimple, Dream, LLaDA), and the registry of builders.

Decoders, data preparation and losses only ever talk to `Teacher`. It hides the backbone differences:
- logit alignment: Dream and Dimple (and the tiny model) emit *shifted* logits, position i-1 scoring token i;
  LLaDA does not. `Teacher.forward` always returns logits where position i scores token i.
- the mask token id, EOS / pad ids, tokenizer and chat format (`encode_prompt` is the one function that turns a
  question into prompt ids, for training and decoding alike);
- an optional prefix KV cache (`prefill`), including the one-token overlap a shifted model needs;
- extra model inputs (e.g. Dimple's `pixel_values`) pass through `forward` untouched.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from teachers import tiny  # noqa: F401  (registers the tiny model with the Auto classes)
from teachers.tiny import FewstepDimpleConfig, FewstepDimpleModel
from teachers.tokenizer import build_char_tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class PrefixCache:
    """Keys/values of a prompt, computed once and reused while the response is re-encoded.

    For a shifted model the last prompt token is *not* in `kv`: its output scores the first
    response token, so it is re-encoded together with the response (`carry_ids`). `kv` is whatever the backbone
    returns as its cache (per-layer key/value pairs for the tiny model).
    """

    kv: Any
    attention_mask: torch.Tensor  # [B, cached_len]
    carry_ids: torch.Tensor  # [B, 0 or 1]
    carry_mask: torch.Tensor  # [B, 0 or 1]


class Teacher:
    """A diffusion LM plus its tokenizer, with aligned logits and a uniform cache API."""

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        *,
        name: str,
        shifted: bool,
        mask_token_id: int,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.shifted = shifted
        self.mask_token_id = mask_token_id

    def with_model(self, model: Any) -> Teacher:
        """The same interface over another module with the same weights layout (e.g. a DeepSpeed engine)."""
        return Teacher(model, self.tokenizer, name=self.name, shifted=self.shifted, mask_token_id=self.mask_token_id)

    # -- tokens -------------------------------------------------------------------------------------------------

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return self.eos_token_id if pad is None else pad

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def encode_prompt(self, question: str) -> list[int]:
        """Prompt ids in the model's chat format, ending where the assistant's answer starts."""
        encoded = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True
        )
        return list(encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded)

    def encode_response(self, answer: str) -> list[int]:
        """Reference answer ids followed by EOS (what the model must produce after the prompt)."""
        return self.tokenizer.encode(answer, add_special_tokens=False) + [self.eos_token_id]

    def decode_response(self, ids: list[int]) -> str:
        """Text of generated ids up to (excluding) the first EOS."""
        if self.eos_token_id in ids:
            ids = ids[: ids.index(self.eos_token_id)]
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    # -- forward ------------------------------------------------------------------------------------------------

    def _call(self, input_ids, attention_mask, kv, use_cache, causal, model_inputs):
        kwargs = dict(model_inputs)
        if causal is not None:
            # Only the tiny model exposes the switch; the real backbones are bidirectional only.
            kwargs["causal"] = causal
        if kv is not None:
            kwargs["cache"] = kv
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=use_cache, **kwargs)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: PrefixCache | None = None,
        causal: bool | None = None,
        **model_inputs: Any,
    ) -> torch.Tensor:
        """Logits `[B, T, V]` for `input_ids` `[B, T]`, aligned so that position i scores token i.

        With `cache`, `input_ids` continue the cached prompt and `attention_mask` (if given) covers only them.
        """
        if cache is None:
            logits = self._call(input_ids, attention_mask, None, False, causal, model_inputs).logits
            if self.shifted:
                # Position 0 has no predecessor; repeating its own row keeps the shape (Dream does the same).
                logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
            return logits
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        ids = torch.cat([cache.carry_ids, input_ids], dim=1)
        mask = torch.cat([cache.attention_mask, cache.carry_mask, attention_mask], dim=1)
        logits = self._call(ids, mask, cache.kv, False, causal, model_inputs).logits
        return logits[:, :-1] if self.shifted else logits

    @torch.no_grad()
    def prefill(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        causal: bool | None = None,
        **model_inputs: Any,
    ) -> PrefixCache:
        """Encode a (left-padded) prompt once and return its cache for `forward(..., cache=...)`.

        Exact for causal attention. With bidirectional attention the cached prompt no longer sees the response
        as it changes: the approximation Dimple's prefilling and Fast-dLLM's cache accept for speed.
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        keep = input_ids.shape[1] - 1 if self.shifted else input_ids.shape[1]
        output = self._call(input_ids[:, :keep], attention_mask[:, :keep], None, True, causal, model_inputs)
        return PrefixCache(
            kv=output.cache,
            attention_mask=attention_mask[:, :keep],
            carry_ids=input_ids[:, keep:],
            carry_mask=attention_mask[:, keep:],
        )


# ----------------------------------------------------------------------------------------------------------------
# Builders: one small function per backbone, each naming where its weights come from.


def _load_hf(path: Path, dtype: str, trust_remote_code: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a model checkpoint (no config.json)")
    model = AutoModel.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def build_tiny(path: Path, dtype: str = "fp32") -> Teacher:
    """The embedded Dimple-family model, from a checkpoint fewstep pretrained (`recipes/teacher-tiny.yaml`)."""
    model, tokenizer = _load_hf(path, dtype, trust_remote_code=False)
    return Teacher(
        model, tokenizer, name="tiny", shifted=model.config.shifted_logits, mask_token_id=model.config.mask_token_id
    )


def build_dream(path: Path, dtype: str = "bf16") -> Teacher:
    """Dream-v0-Instruct-7B (Dream-org): Qwen2.5-derived diffusion LM, shifted logits, mask id 151666."""
    model, tokenizer = _load_hf(path, dtype, trust_remote_code=True)
    return Teacher(model, tokenizer, name="dream", shifted=True, mask_token_id=151666)


def build_dimple(path: Path, dtype: str = "bf16") -> Teacher:
    """Dimple-7B (rp-yu/Dimple-7B): Dream-7B language model + Qwen2.5-VL vision tower; shifted, mask id 151666.

    Image inputs (`pixel_values`, `image_grid_thw`) pass through `Teacher.forward` as model inputs.
    """
    model, tokenizer = _load_hf(path, dtype, trust_remote_code=True)
    return Teacher(model, tokenizer, name="dimple", shifted=True, mask_token_id=151666)


def build_llada(path: Path, dtype: str = "bf16") -> Teacher:
    """LLaDA-8B-Instruct (GSAI-ML): unshifted logits, mask id 126336."""
    model, tokenizer = _load_hf(path, dtype, trust_remote_code=True)
    return Teacher(model, tokenizer, name="llada", shifted=False, mask_token_id=126336)


TEACHERS: dict[str, Callable[..., Teacher]] = {
    "tiny": build_tiny,
    "dream": build_dream,
    "dimple": build_dimple,
    "llada": build_llada,
}


def load_teacher(name: str, path: Path, dtype: str = "fp32") -> Teacher:
    """Build the named backbone from a local checkpoint directory."""
    if name not in TEACHERS:
        raise KeyError(f"unknown teacher '{name}' (known: {', '.join(TEACHERS)})")
    return TEACHERS[name](path, dtype)


def new_tiny_teacher(
    hidden_size: int,
    intermediate_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    max_position_embeddings: int,
) -> Teacher:
    """A randomly initialised tiny teacher with the character tokenizer (the start of pretraining)."""
    tokenizer = build_char_tokenizer()
    config = FewstepDimpleConfig(
        # Vocab padded to a multiple of 64 so the LM-head matmul has friendly shapes.
        vocab_size=(len(tokenizer) + 63) // 64 * 64,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = FewstepDimpleModel(config)
    return Teacher(model, tokenizer, name="tiny", shifted=True, mask_token_id=tokenizer.mask_token_id)


def save_teacher(teacher: Teacher, out_dir: Path) -> None:
    """Write model (safetensors) + tokenizer to `out_dir` atomically: a temp dir renamed into place."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    teacher.model.save_pretrained(tmp, safe_serialization=True)
    teacher.tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
