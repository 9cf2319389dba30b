"""One teacher interface over every backbone (LLaDA, Dream, Dimple), with one adapter per backbone.

Decoders, data preparation, losses and the trainer only ever talk to `Teacher`. What differs between backbones is
declared once, in `BACKBONES` (a `Backbone` each): the model classes (fewstep's native ones in
`teachers/backbones/`, which load the published folders as they are), the logit alignment (Dream and Dimple are
*shifted*: raw position i-1 scores token i), the default LoRA targets (LLaDA names its projections differently),
and the chat template used when a checkpoint's tokenizer brings none. Everything else is read from the checkpoint:
the mask id (config, else tokenizer), the end-of-turn token that closes an assistant turn in the chat template
(the response terminator), EOS/pad.

`Teacher.forward` returns aligned logits (position i scores token i), for the positions from `start` on only;
`Teacher.prefill` encodes a prompt once for a prefix KV cache (`teachers.backbones.diffusion_generation` holds both
rules, shared with the exported `diffusion_generate`). Extra model inputs (Dimple's `pixel_values`,
`image_grid_thw`, `image_features`) pass through untouched.

Image prompts (Dimple): `Teacher.encode_prompt(question, images)` is the one place a prompt with images becomes
model inputs, for training and decoding alike: the checkpoint's Qwen2-VL image processor gives the patches and
their grid, and the chat content starts with one vision block per image, `<|vision_start|>` + one `<|image_pad|>`
per merged patch + `<|vision_end|>`, as Qwen2-VL's chat template places an image before the text.
`Teacher.vision_inputs(images)` is its image half, for batches that keep only the images and the ids.

The embedded teacher is a tiny instance of these same classes (`new_teacher`), with the character tokenizer.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from safetensors import SafetensorError
from transformers import (
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from teachers.backbones import (
    DimpleConfig,
    DimpleModel,
    DreamConfig,
    DreamModel,
    LLaDAConfig,
    LLaDAModelLM,
)
from teachers.backbones.diffusion_generation import PrefixCache, aligned_logits, prefill
from teachers.manifest import check_manifest, write_manifest
from teachers.tokenizer import build_char_tokenizer
from teachers.vision import (
    IMAGE_PAD,
    VISION_END,
    VISION_START,
    VISION_TOKENS,
    VisionInputs,
    written_vision_token,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}

# Qwen2.5's chat format (Dream, Dimple) without its default system turn, and LLaDA's (Llama 3 headers); used only
# when a checkpoint's tokenizer has no chat template of its own (the published ones do).
CHATML_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLADA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


@dataclass(frozen=True)
class Backbone:
    """Everything fewstep needs to know about one published architecture."""

    name: str  # fewstep's name (recipes: `teacher.name`)
    config_class: type[PretrainedConfig]  # its `model_type` is the published one
    model_class: type[PreTrainedModel]
    lora_targets: str  # peft regex over module names: the decoder blocks' linear layers only
    chat_template: str
    chat_tokens: tuple[str, ...]  # special tokens the chat template needs (added to the character tokenizer)
    images: bool = False  # takes image prompts through the checkpoint's Qwen2-VL image processor
    tiny_extras: Callable[[PreTrainedTokenizerBase, dict[str, Any]], dict[str, Any]] | None = None

    @property
    def shifted(self) -> bool:
        return self.model_class.logits_shifted

    @property
    def model_type(self) -> str:
        return self.config_class.model_type

    def tiny_config(self, tokenizer: PreTrainedTokenizerBase, sizes: dict[str, Any]) -> PretrainedConfig:
        """A config of this family at the given sizes (`ModelSizeConfig`'s standard names, which every config class
        maps onto its own keys) for `tokenizer`'s ids."""
        return self.config_class(
            # Vocab padded to a multiple of 64 so the LM-head matmul has friendly shapes.
            vocab_size=(len(tokenizer) + 63) // 64 * 64,
            rope_theta=10000.0,
            mask_token_id=tokenizer.mask_token_id,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sizes,
            **(self.tiny_extras(tokenizer, sizes) if self.tiny_extras else {}),
        )


def tiny_dimple_extras(tokenizer: PreTrainedTokenizerBase, sizes: dict[str, Any]) -> dict[str, Any]:
    """A one-block vision tower, M-RoPE sections and the vision token ids for a tiny Dimple."""
    # M-RoPE splits the head's rotary pairs among (t, h, w) as the 7B does (16, 24, 24 of 64).
    pairs = sizes["hidden_size"] // sizes["num_attention_heads"] // 2
    spatial = pairs * 3 // 8
    vision_tokens = {
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
        "vision_token_id": "<|vision_pad|>",
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
    }
    found = {name: tokenizer.convert_tokens_to_ids(token) for name, token in vision_tokens.items()}
    return {name: index for name, index in found.items() if index != tokenizer.unk_token_id} | {
        "mrope_section": [pairs - 2 * spatial, spatial, spatial],
        "vision_config": {
            "depth": 1,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": sizes["hidden_size"],
            "fullatt_block_indexes": [0],
        },
    }


_QWEN_LINEAR = r".*model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
BACKBONES: dict[str, Backbone] = {
    "llada": Backbone(
        name="llada",
        config_class=LLaDAConfig,
        model_class=LLaDAModelLM,
        lora_targets=r".*transformer\.blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)",
        chat_template=LLADA_TEMPLATE,
        chat_tokens=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "dream": Backbone(
        name="dream",
        config_class=DreamConfig,
        model_class=DreamModel,
        lora_targets=_QWEN_LINEAR,
        chat_template=CHATML_TEMPLATE,
        chat_tokens=("<|im_start|>", "<|im_end|>"),
    ),
    "dimple": Backbone(
        name="dimple",
        config_class=DimpleConfig,
        model_class=DimpleModel,
        lora_targets=_QWEN_LINEAR,  # the language model's blocks; the vision tower stays as published
        chat_template=CHATML_TEMPLATE,
        chat_tokens=("<|im_start|>", "<|im_end|>") + VISION_TOKENS,
        images=True,
        tiny_extras=tiny_dimple_extras,
    ),
}
BACKBONE_OF_MODEL_TYPE = {backbone.model_type: backbone for backbone in BACKBONES.values()}


@dataclass
class Prompt:
    """A prompt as the model takes it: ids in the chat format, and its images' vision inputs (None: text only)."""

    ids: list[int]
    vision: VisionInputs | None = None


class Teacher:
    """A diffusion LM plus its tokenizer (and image processor, for Dimple), with aligned logits and a uniform cache
    API."""

    def __init__(
        self,
        model: Any,
        tokenizer: PreTrainedTokenizerBase,
        backbone: Backbone,
        mask_token_id: int,
        image_processor: Any = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.backbone = backbone
        self.mask_token_id = mask_token_id
        self.image_processor = image_processor

    @cached_property
    def end_token_id(self) -> int:
        """The response terminator: the token the chat template closes an assistant turn with."""
        return end_of_turn_id(self.tokenizer)

    @property
    def name(self) -> str:
        return self.backbone.name

    @property
    def shifted(self) -> bool:
        return self.backbone.shifted

    def with_model(self, model: Any) -> Teacher:
        """The same interface over another module with the same weights layout (a student, a DeepSpeed engine)."""
        return Teacher(model, self.tokenizer, self.backbone, self.mask_token_id, self.image_processor)

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

    def encode_prompt(self, question: str, images: Sequence[Image.Image] = ()) -> Prompt:
        """The prompt in the model's chat format, ending where the assistant's answer starts, with its images.

        Vision tokens are placed here only: a question that holds one as text (image tokens without an image)
        is a ValueError, as are images for a teacher without a vision tower.
        """
        if self.backbone.images:
            written = written_vision_token(question)
            if written is not None:
                raise ValueError(f"the prompt holds {written} as text; image tokens are placed for the record's images")
        vision, content = None, question
        if images:
            vision = self.vision_inputs(images)
            merge = self.image_processor.merge_size**2
            pads = (vision.image_grid_thw.prod(-1) // merge).tolist()
            content = "".join(VISION_START + IMAGE_PAD * count + VISION_END for count in pads) + question
        ids = chat_ids(self.tokenizer, [{"role": "user", "content": content}], add_generation_prompt=True)
        return Prompt(ids, vision)

    def vision_inputs(self, images: Sequence[Image.Image]) -> VisionInputs:
        """Qwen2-VL patches and grids of a prompt's images (the checkpoint's image processor)."""
        if not self.backbone.images or self.image_processor is None:
            raise ValueError(f"teacher '{self.name}' takes no images (it has no vision tower or image processor)")
        processed = self.image_processor(images=[image.convert("RGB") for image in images], return_tensors="pt")
        return VisionInputs(processed["pixel_values"], processed["image_grid_thw"])

    def row_images(self, prompt_ids: torch.Tensor, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor):
        """The batch's images encoded once, per row (`DimpleModel.row_images`), for the decoding loop."""
        model = getattr(self.model, "module", self.model)  # a DeepSpeed engine wraps the model
        return model.row_images(prompt_ids, pixel_values, image_grid_thw)

    def encode_response(self, answer: str) -> list[int]:
        """Answer ids followed by the end-of-turn token (what the model must produce after the prompt)."""
        return self.tokenizer.encode(answer, add_special_tokens=False) + [self.end_token_id]

    def decode_response(self, ids: list[int]) -> str:
        """Text of generated ids up to (excluding) the first end-of-turn or EOS token."""
        stops = [index for index, token in enumerate(ids) if token in (self.end_token_id, self.eos_token_id)]
        return self.tokenizer.decode(ids[: stops[0]] if stops else ids, skip_special_tokens=True)

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        cache: PrefixCache | None = None,
        causal: bool | None = None,
        start: int = 0,
        **model_inputs: Any,
    ) -> torch.Tensor:
        """Aligned logits `[B, T - start, V]` of positions `start..T-1` of `input_ids` `[B, T]` (position i scores
        token i); only those positions go through the LM head.

        With `cache`, `input_ids` continue the cached prompt and `attention_mask` (if given) covers only them.
        `causal` overrides the checkpoint's attention mode (True for the AR phase and baseline).
        """
        if causal is not None:
            model_inputs["causal"] = causal
        return aligned_logits(self.model, self.shifted, input_ids, attention_mask, start, cache, **model_inputs)

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
        if causal is not None:
            model_inputs["causal"] = causal
        return prefill(self.model, self.shifted, input_ids, attention_mask, **model_inputs)


# ----------------------------------------------------------------------------------------------------------------
# Tokens read from the checkpoint


def chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of `messages` in the tokenizer's chat template."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def end_of_turn_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token the chat template closes an assistant turn with (`<|im_end|>`, `<|eot_id|>`, ...), else EOS."""
    sentinel = "\x00"
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": sentinel}]
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    closing = tokenizer.encode(text.split(sentinel, 1)[1], add_special_tokens=False) if sentinel in text else []
    return closing[0] if closing else tokenizer.eos_token_id


def mask_token_id_of(config: PretrainedConfig, tokenizer: PreTrainedTokenizerBase, path: Path) -> int:
    found = getattr(config, "mask_token_id", None)
    found = tokenizer.mask_token_id if found is None else found
    if found is None:
        raise ValueError(f"{path}: no mask token id (neither config.json's mask_token_id nor a tokenizer mask token)")
    return int(found)


# ----------------------------------------------------------------------------------------------------------------
# Loading, creating and saving


def backbone_of(path: Path) -> Backbone:
    """The backbone a checkpoint folder holds, from its config.json's `model_type`."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: not a model checkpoint (no config.json)")
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except ValueError as error:
        raise ValueError(f"{config_file}: not valid JSON ({error})") from None
    if model_type not in BACKBONE_OF_MODEL_TYPE:
        known = ", ".join(f"{b.model_type} ({b.name})" for b in BACKBONES.values())
        raise ValueError(f"{config_file}: model_type {model_type!r} is not a backbone fewstep knows (known: {known})")
    return BACKBONE_OF_MODEL_TYPE[model_type]


def load_tokenizer(path: Path, backbone: Backbone) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer; the backbone's chat template when it brings none."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (ValueError, OSError):
        # A published folder may name a remote-code tokenizer class; its tokenizer.json is all fewstep needs.
        if not (Path(path) / "tokenizer.json").is_file():
            raise
        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    if not tokenizer.chat_template:
        tokenizer.chat_template = backbone.chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_image_processor(path: Path, backbone: Backbone) -> Qwen2VLImageProcessorPil | None:
    """The checkpoint's image processor for a backbone that takes images, None otherwise (or when it has none)."""
    if not backbone.images or not (Path(path) / "preprocessor_config.json").is_file():
        return None
    # The published folder names Dimple's remote processor class; its settings are Qwen2-VL's, which
    # transformers' PIL implementation reads as they are (no torchvision needed).
    return Qwen2VLImageProcessorPil.from_pretrained(path)


def read_model(path: Path, backbone: Backbone, dtype: str = "fp32") -> PreTrainedModel:
    """The weights of a checkpoint folder in fewstep's native class for `backbone`, on the CPU in `dtype`; a
    damaged file or weights of another layout raise a one-line ValueError naming the folder."""
    try:
        model, info = backbone.model_class.from_pretrained(path, dtype=DTYPES[dtype], output_loading_info=True)
    except (SafetensorError, OSError) as error:
        # A cut-off or damaged published checkpoint (fewstep's own are caught by the manifest check first).
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: its weights cannot be read ({detail})") from None
    wrong = {kind: names for kind, names in info.items() if kind in ("missing_keys", "unexpected_keys") and names}
    if wrong:
        kind, names = next(iter(wrong.items()))
        raise ValueError(f"{path}: weights do not match the {backbone.name} layout ({kind}: {sorted(names)[:3]})")
    return model


def local_device() -> torch.device:
    """The device this process computes on: `cuda:LOCAL_RANK` when CUDA is available (one GPU per launcher rank),
    else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    return torch.device("cpu")


def load_teacher(
    name: str | None,
    path: Path,
    dtype: str = "fp32",
    device: torch.device | str | None = None,
    weights: bool = True,
) -> Teacher:
    """Load a checkpoint folder (published or fewstep-written) with fewstep's native class for its backbone, in
    `dtype`, on `device` (default `local_device()`: every stage that decodes or scores places its models the same
    way, on its rank's GPU when there is one).

    `name` (the recipe's `teacher.name`) must agree with the folder's `model_type`; None takes the folder's. A
    folder fewstep wrote is checked against its manifest first (`teachers.manifest.ManifestError`, a ValueError
    naming the file); a published one has none. Weights that cannot be read raise a one-line ValueError. With
    `weights=False` the interface comes without a model (`Teacher.model` None): tokenizer, image processor, mask
    id and logit convention only, for a stage that runs other weights through it (a student being trained).
    """
    path = Path(path)
    check_manifest(path)
    backbone = backbone_of(path)
    if name is not None and name != backbone.name:
        raise ValueError(f"teacher.name: '{name}', but {path / 'config.json'} holds a {backbone.name} checkpoint")
    tokenizer = load_tokenizer(path, backbone)
    image_processor = load_image_processor(path, backbone)
    if not weights:
        config = backbone.config_class.from_pretrained(path)
        return Teacher(None, tokenizer, backbone, mask_token_id_of(config, tokenizer, path), image_processor)
    model = read_model(path, backbone, dtype)
    mask_id = mask_token_id_of(model.config, tokenizer, path)
    model = model.to(local_device() if device is None else device)
    return Teacher(model.eval(), tokenizer, backbone, mask_id, image_processor)


def new_teacher(backbone: str, sizes: dict[str, Any], published_chat: bool = False) -> Teacher:
    """A randomly initialised teacher of `backbone` at `sizes`, with the character tokenizer (embedded default).

    The tokenizer's chat format is fewstep's compact one (`<|bos|><|user|>...<|assistant|>`, answers closed by
    EOS: short prompts train fast on CPU), or with `published_chat` the backbone's published one with its special
    tokens (an end-of-turn token distinct from EOS, as in the real checkpoints).
    """
    family = BACKBONES[backbone]
    if published_chat:
        tokenizer = build_char_tokenizer(extra_special_tokens=family.chat_tokens, chat_template=family.chat_template)
    else:
        # The compact format still needs the vision tokens for image prompts.
        tokenizer = build_char_tokenizer(extra_special_tokens=VISION_TOKENS if family.images else ())
    model = family.model_class(family.tiny_config(tokenizer, sizes))
    # Qwen2-VL's preprocessing (CLIP normalisation, 14-pixel patches merged 2x2), as Dimple's checkpoint sets it.
    image_processor = Qwen2VLImageProcessorPil() if family.images else None
    return Teacher(model, tokenizer, family, tokenizer.mask_token_id, image_processor)


def save_teacher(teacher: Teacher, out_dir: Path) -> None:
    """Write model (safetensors, with its modeling files) + tokenizer to `out_dir` atomically, with the sha256
    manifest `load_teacher` checks (`teachers/manifest.py`)."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    teacher.model.save_pretrained(tmp, safe_serialization=True)
    teacher.tokenizer.save_pretrained(tmp)
    if teacher.image_processor is not None:
        teacher.image_processor.save_pretrained(tmp)
    write_manifest(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
