"""Dimple (rp-yu/Dimple-7B): the Dream LM with multimodal RoPE, a Qwen2.5-VL vision tower and an image projector.

Weights: Dream's (`model.*`, `lm_head`) + `visual.*` (transformers' `Qwen2_5_VisionTransformerPretrainedModel`,
whose merged patch features are its `.pooler_output`) + `img_projector.{linear_1, linear_2}`
(`linear_2(act(linear_1(x)))`, act = the LM's `hidden_act`). The LM's decoder layers are Qwen2's as in Dream
(Qwen2.5-VL's text layers hold the same weights and compute the same thing); only the rotary embedding differs:
transformers' `Qwen2_5_VLRotaryEmbedding`, which rotates `mrope_section` slices of the frequencies with the
temporal, height and width positions `[3, B, T]`.

What this file adds to Dream:

- image features replace the `image_token_id` positions in order (their counts must match);
- M-RoPE positions are computed inside `forward` from `input_ids`, `image_grid_thw` and the 2-D padding mask, with
  Qwen2.5-VL's maintained rule (`Qwen2_5_VLModel.get_rope_index`, reused as is): text tokens have equal t/h/w
  positions, an image's merged grid tokens get (t, row, col) offsets from the position after the text before it,
  text after an image continues from the image's max + 1; pads get 1. Dimple's published `forward` left this to
  its generation code; here every caller gets it;
- with a prefix cache, the current tokens continue the prefix's positions. An image's h·w merged tokens span only
  max(h, w) positions, so after it a row's next position differs from its token count by a *rope delta*
  (`max position + 1 - real tokens`, <= 0). Every forward on a `DynamicCache` (including the one that creates it)
  stores the per-row deltas on it as `cache.rope_deltas` (`[B, 1]` long); a later forward on that cache starts its
  tokens at `real cached tokens + rope_deltas`. Text-only forwards leave the deltas as they were, so cropping a
  cache back after them keeps it valid; a caller that crops away an *image* it appended must restore
  `rope_deltas` itself. Selecting rows of the cache must select the same rows of `rope_deltas`.

Loaded by fewstep directly and copied beside exported checkpoints (`auto_map`), so it imports only torch,
transformers and its siblings.
"""

import torch
from torch import nn
from transformers import DynamicCache
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLModel,
    Qwen2_5_VLRotaryEmbedding,
)

from .configuration_dimple import DimpleConfig
from .diffusion_generation import RowImages
from .modeling_dream import DreamModel, DreamOutput


class DimpleImageProjector(nn.Module):
    """Maps merged vision features (`vision_config.out_hidden_size`) into the LM's embedding space."""

    def __init__(self, config: DimpleConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.vision_config.out_hidden_size, config.hidden_size)
        self.act = ACT2FN[config.hidden_act]
        self.linear_2 = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))


class DimpleModel(DreamModel):
    """Dream's LM with M-RoPE, plus `visual` and `img_projector`; raw logits are shifted as Dream's."""

    config_class = DimpleConfig
    _no_split_modules = ["Qwen2DecoderLayer", "Qwen2_5_VLVisionBlock"]

    # Qwen2.5-VL's M-RoPE position rule, bound to this model: it reads `config.vision_config` (spatial_merge_size,
    # tokens_per_second) and calls `get_vision_position_ids`, both of which Dimple has as Qwen2.5-VL does.
    get_rope_index = Qwen2_5_VLModel.get_rope_index
    get_vision_position_ids = Qwen2_5_VLModel.get_vision_position_ids

    def __init__(self, config: DimpleConfig):
        super().__init__(config)
        # Qwen2.5-VL reads the split from `rope_parameters`; Dimple's config keeps it at the top level.
        self.model.rotary_emb = Qwen2_5_VLRotaryEmbedding(config)
        self.model.rotary_emb.mrope_section = list(config.mrope_section)
        self.visual = Qwen2_5_VisionTransformerPretrainedModel._from_config(config.vision_config)
        self.img_projector = DimpleImageProjector(config)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        projector = getattr(self, "img_projector", None)
        if projector is not None and (module is projector.linear_1 or module is projector.linear_2):
            # Fresh weights only (a checkpoint's are loaded over them). At `initializer_range` both layers shrink the
            # features (~6e-4 from the tiny tower, ~30x below the token embeddings they sit among), and a model
            # trained from scratch then never learned to read its images; 1/sqrt(fan_in) keeps their scale.
            init.normal_(module.weight, mean=0.0, std=module.in_features**-0.5)

    def get_image_features(self, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor) -> torch.Tensor:
        """`[Σ t·h·w / merge², hidden]` LM-space features of every image, in order."""
        merged = self.visual(pixel_values.to(self.visual.dtype), grid_thw=image_grid_thw).pooler_output
        return self.img_projector(merged)

    @torch.no_grad()
    def row_images(
        self, input_ids: torch.LongTensor, pixel_values: torch.Tensor, image_grid_thw: torch.LongTensor
    ) -> RowImages:
        """The images of a batch of prompts `[B, P]` encoded once (vision tower and projector) and split per row, so
        a decode can hand each forward the features of the rows it decodes without re-running the vision tower."""
        features = self.get_image_features(pixel_values, image_grid_thw)
        merge = self.config.vision_config.spatial_merge_size**2
        tokens_per_image = (image_grid_thw.prod(-1) // merge).tolist()
        tokens_per_row = (input_ids == self.config.image_token_id).sum(-1).tolist()
        if sum(tokens_per_row) != sum(tokens_per_image):
            raise ValueError(f"{sum(tokens_per_row)} image tokens but {sum(tokens_per_image)} image features")
        row_features, row_grids, image, offset = [], [], 0, 0
        for needed in tokens_per_row:
            first = image
            while needed > 0:
                needed -= tokens_per_image[image]
                image += 1
            if needed < 0:
                raise ValueError("the image tokens of a prompt do not cover whole images")
            count = sum(tokens_per_image[first:image])
            row_features.append(features[offset : offset + count])
            row_grids.append(image_grid_thw[first:image])
            offset += count
        return RowImages(row_features, row_grids)

    def mrope_position_ids(
        self,
        input_ids: torch.LongTensor,
        image_grid_thw: torch.LongTensor | None,
        attention_mask: torch.Tensor | None,
        cache: DynamicCache | None,
    ) -> torch.LongTensor:
        """`[3, B, T]` M-RoPE positions of the current tokens, continuing the cache's; updates `cache.rope_deltas`."""
        batch, length = input_ids.shape
        past = cache.get_seq_length() if cache is not None else 0
        if attention_mask is None:
            attention_mask = input_ids.new_ones(batch, past + length)
        current = attention_mask[:, past:]
        delta = getattr(cache, "rope_deltas", None) if past else None
        delta = torch.zeros(batch, 1, dtype=torch.long, device=input_ids.device) if delta is None else delta
        if delta.shape[0] != batch:  # a cache whose rows were repeated per sample
            delta = delta.repeat_interleave(batch // delta.shape[0], dim=0)
        # The current tokens start one past the prefix's largest position.
        start = attention_mask[:, :past].long().sum(-1, keepdim=True) + delta
        if image_grid_thw is None:
            positions = (current.long().cumsum(-1) - 1 + start).expand(3, batch, length)
        else:
            image_tokens = (input_ids == self.config.image_token_id).int()
            positions, chunk_delta = self.get_rope_index(
                input_ids, image_tokens, image_grid_thw=image_grid_thw, attention_mask=current
            )
            positions = positions + start
            delta = delta + chunk_delta.to(delta.device)
        if cache is not None:
            cache.rope_deltas = delta
        return positions.masked_fill(current[None] == 0, 1)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: DynamicCache | None = None,
        use_cache: bool = False,
        causal: bool | None = None,
        logits_to_keep: int | slice | torch.Tensor = 0,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        image_features: torch.Tensor | None = None,
        **kwargs,
    ) -> DreamOutput:
        """Raw logits of the current tokens; arguments as `DreamModel.forward`, plus the image inputs.

        Args:
            pixel_values: `[Σ t·h·w, 3·2·14·14]` patches of every image in the batch (Qwen2-VL preprocessing).
            image_grid_thw: `[n_images, 3]` patch grid of each image, in the order the images appear in the batch.
            image_features: `[Σ t·h·w / merge², hidden]` LM-space features (`get_image_features`) in place of
                `pixel_values`, for callers that encoded the images once (the decoding loop, `row_images`).
            position_ids: `[3, B, T]` (or `[B, T]` for text); None computes M-RoPE positions (module docstring).
        """
        inputs_embeds = self.model.embed_tokens(input_ids)
        if pixel_values is not None and image_features is not None:
            raise ValueError("pass pixel_values or image_features, not both")
        if pixel_values is not None or image_features is not None:
            features = image_features
            if features is None:
                features = self.get_image_features(pixel_values, image_grid_thw)
            is_image = input_ids == self.config.image_token_id
            if is_image.sum().item() != features.shape[0]:
                raise ValueError(f"{is_image.sum().item()} image tokens but {features.shape[0]} image features")
            inputs_embeds = inputs_embeds.masked_scatter(is_image[..., None], features.to(inputs_embeds.dtype))
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        if position_ids is None:
            position_ids = self.mrope_position_ids(input_ids, image_grid_thw, attention_mask, cache)
        return super().forward(
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            causal=causal,
            logits_to_keep=logits_to_keep,
            inputs_embeds=inputs_embeds,
            **kwargs,
        )
