"""Configuration of Dimple (rp-yu/Dimple-7B): the Dream language model plus a Qwen2.5-VL vision tower.

The published `config.json` is a Dream config with `model_type: "dimple"`, the vision/text token ids, the M-RoPE
split (`mrope_section`) and a nested `vision_config` whose `model_type` is also `"dimple"` and which stores only the
keys that differ from Dimple's vision defaults. Those defaults are Qwen2.5-VL-7B's vision tower, which are NOT all
transformers' `Qwen2_5_VLVisionConfig` defaults (its `hidden_size` is 3584 and `tokens_per_second` 4, Dimple's are
1280 and 2), so `DimpleVisionConfig` restates them.

Loaded by fewstep directly and copied beside exported checkpoints (`auto_map`), so it imports only transformers
and its sibling configuration.
"""

from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig

from .configuration_dream import DreamConfig


class DimpleVisionConfig(Qwen2_5_VLVisionConfig):
    """The Qwen2.5-VL vision transformer as Dimple-7B ships it (every `Qwen2_5_VLVisionConfig` field applies).

    `model_type` is "dimple", as in the published `vision_config`, so a saved config keeps that spelling.
    """

    model_type = "dimple"

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 3584
    fullatt_block_indexes: list[int] | tuple[int, ...] = (7, 15, 23, 31)
    patch_size: int | list[int] | tuple[int, int] = 14
    temporal_patch_size: int | list[int] | tuple[int, int] = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    in_channels: int = 3
    hidden_act: str = "silu"
    tokens_per_second: int = 2


class DimpleConfig(DreamConfig):
    """Dream's language-model fields (see `DreamConfig`) plus Dimple's vision fields.

    Parameters that Dimple adds:
        vision_config (`dict` or `DimpleVisionConfig`): the vision tower; a dict fills missing keys from Dimple-7B's.
        image_token_id (`int`, defaults to 151655): `<|image_pad|>`; each one takes one merged image feature.
        video_token_id (`int`, defaults to 151656): `<|video_pad|>` (the release supports no video).
        vision_start_token_id / vision_end_token_id (`int`, defaults to 151652 / 151653): the tokens around an image.
        vision_token_id (`int`, defaults to 151654): `<|vision_pad|>`.
        mrope_section (`list[int]`, defaults to [16, 24, 24]): how many of the head_dim/2 rotary frequencies rotate
            with the temporal, height and width positions; must sum to head_dim/2.
        full_attn_mask (`bool`, defaults to `True`): the published flag for bidirectional attention; attention
            follows `causal`, so it is kept for the config's sake only.
    """

    model_type = "dimple"
    sub_configs_defaults = {"vision_config": DimpleVisionConfig}

    vision_config: dict | DimpleVisionConfig | None = None
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    vision_token_id: int = 151654
    mrope_section: list[int] | tuple[int, ...] = (16, 24, 24)
    full_attn_mask: bool = True
