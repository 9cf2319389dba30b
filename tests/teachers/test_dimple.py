"""fewstep's Dimple class against the published Dimple-7B code (fixture logits and M-RoPE positions) and the backbone
contract: strict loading, images, padding, the causal switch, the prefix cache (with an image in the prefix),
logits_to_keep, gradient checkpointing, save/load."""

import json

import pytest
import torch
from safetensors.torch import load_file

from teachers.backbones.configuration_dimple import DimpleConfig, DimpleVisionConfig
from teachers.backbones.modeling_dimple import DimpleModel
from tests.builders import BACKBONE_FIXTURES

# A tiny random checkpoint with the published key layout, and the raw logits the published code computed for it.
FIXTURE = BACKBONE_FIXTURES / "dimple"
CASES = ("unpadded", "padded", "image")


@pytest.fixture(scope="module")
def model():
    model = DimpleModel.from_pretrained(FIXTURE)
    return model.eval()


@pytest.fixture(scope="module")
def reference():
    return load_file(FIXTURE / "reference.safetensors")


def case_inputs(reference: dict, case: str) -> dict:
    inputs = {"input_ids": reference[f"{case}.input_ids"], "attention_mask": reference[f"{case}.attention_mask"]}
    if case == "image":
        inputs |= {"pixel_values": reference["image.pixel_values"], "image_grid_thw": reference["image.image_grid_thw"]}
    return inputs


def compared_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """reference.json's "compare" for padded cases: i with mask[i] and mask[i-1] (or i == 0) real."""
    previous = torch.cat([torch.ones_like(attention_mask[:, :1]), attention_mask[:, :-1]], dim=1)
    return attention_mask.bool() & previous.bool()


def image_and_text_batch(reference: dict) -> dict:
    """Row 0: the image case (17 tokens); row 1: the padded case's second (text) row, left-padded to 17."""
    image_ids, text_ids = reference["image.input_ids"][0], reference["padded.input_ids"][1, 3:]
    pad = image_ids.shape[0] - text_ids.shape[0]
    ids = torch.stack([image_ids, torch.cat([torch.full((pad,), 480), text_ids])])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": reference["image.pixel_values"],
        "image_grid_thw": reference["image.image_grid_thw"],
    }


def tiny_config(**overrides) -> DimpleConfig:
    sizes = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        mrope_section=[2, 3, 3],  # head_dim 16: 8 rotary frequencies
        mask_token_id=95,
        pad_token_id=94,
        bos_token_id=94,
        eos_token_id=94,
        image_token_id=90,
        video_token_id=91,
        vision_start_token_id=88,
        vision_end_token_id=89,
        vision_token_id=92,
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_heads": 2,
            "out_hidden_size": 24,
            "fullatt_block_indexes": [0],
        },
    )
    return DimpleConfig(**(sizes | overrides))


def test_loads_published_folder_strictly():
    model, info = DimpleModel.from_pretrained(FIXTURE, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    vision = model.config.vision_config
    assert isinstance(vision, DimpleVisionConfig) and vision.model_type == "dimple"
    # the keys the published config leaves out come from Dimple-7B's vision tower, not transformers' defaults
    assert (vision.depth, vision.hidden_size, vision.out_hidden_size) == (2, 32, 64)
    assert (vision.tokens_per_second, vision.window_size, vision.patch_size) == (2, 112, 14)
    assert list(model.config.mrope_section) == [2, 3, 3] and model.config.image_token_id == 492
    assert DimpleModel.logits_shifted


def test_vision_defaults_are_dimple_7b():
    vision = DimpleConfig().vision_config
    assert (vision.depth, vision.hidden_size, vision.num_heads, vision.intermediate_size) == (32, 1280, 16, 3420)
    assert (vision.out_hidden_size, list(vision.fullatt_block_indexes)) == (3584, [7, 15, 23, 31])
    assert (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size) == (14, 2, 2)
    assert (vision.window_size, vision.in_channels, vision.hidden_act, vision.tokens_per_second) == (112, 3, "silu", 2)


@pytest.mark.parametrize("case", CASES)
def test_mrope_positions_equal_the_published_ones(model, reference, case):
    inputs = case_inputs(reference, case)
    positions = model.mrope_position_ids(
        inputs["input_ids"], inputs.get("image_grid_thw"), inputs["attention_mask"], None
    )
    assert torch.equal(positions, reference[f"{case}.position_ids"])


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_case_matches_published_logits(model, reference, case):
    inputs = case_inputs(reference, case)
    logits = model(**inputs).logits
    compared = compared_positions(inputs["attention_mask"])
    assert (logits - reference[f"{case}.logits"])[compared].abs().max() <= 1e-4


@torch.no_grad()
def test_image_token_count_must_match_the_features(model, reference):
    inputs = case_inputs(reference, "image")
    inputs["input_ids"] = inputs["input_ids"].clone()
    inputs["input_ids"][0, 4] = 100  # one image token fewer
    with pytest.raises(ValueError, match="3 image tokens but 4 image features"):
        model(**inputs)


@torch.no_grad()
def test_left_padded_batch_equals_each_sample_alone(model, reference):
    batch = image_and_text_batch(reference)
    logits = model(**batch).logits
    mask = batch["attention_mask"]
    image_alone = model(**case_inputs(reference, "image")).logits[0]
    assert (logits[0] - image_alone).abs().max() <= 1e-5
    real = mask[1].bool()
    text_alone = model(batch["input_ids"][1:, real]).logits[0]
    assert (logits[1, real] - text_alone).abs().max() <= 1e-5


@torch.no_grad()
def test_causal_switch(model, reference):
    inputs = case_inputs(reference, "image")
    changed = dict(inputs, input_ids=inputs["input_ids"].clone())
    changed["input_ids"][:, -1] = 7
    causal = model(**inputs, causal=True).logits, model(**changed, causal=True).logits
    assert (causal[0][:, :-1] - causal[1][:, :-1]).abs().max() <= 1e-6
    bidirectional = model(**inputs).logits, model(**changed).logits
    assert (bidirectional[0][:, :-1] - bidirectional[1][:, :-1]).abs().max() > 1e-4


@torch.no_grad()
def test_prefix_cache_with_an_image_under_causal_equals_full_forward(model, reference):
    batch = image_and_text_batch(reference)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    full = model(**batch, causal=True).logits
    split = 11  # text, <|vision_start|>, the image, <|vision_end|>, two more text tokens
    prefix = model(
        ids[:, :split],
        attention_mask=mask[:, :split],
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        use_cache=True,
        causal=True,
    )
    # the image row's positions fall 2 behind its token count (its 4 image tokens span 2 positions per axis)
    assert prefix.cache.rope_deltas.tolist() == [[-2], [0]]
    rest = model(ids[:, split:], attention_mask=mask, cache=prefix.cache, causal=True).logits
    assert (rest - full[:, split:]).abs().max() <= 1e-5
    assert prefix.cache.rope_deltas.tolist() == [[-2], [0]]  # a text-only forward leaves the deltas as they were
    prefix.cache.crop(split - ids.shape[1])  # transformers 5: a negative count of tokens to drop
    again = model(ids[:, split:], attention_mask=mask, cache=prefix.cache, causal=True).logits
    assert torch.allclose(again, rest, atol=1e-6)
    assert not full.isnan().any()  # the left pads, which see nothing under causal attention, attend to themselves


@torch.no_grad()
def test_image_after_a_cached_text_prefix_continues_its_positions(model, reference):
    batch = image_and_text_batch(reference)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    full = model(**batch, causal=True).logits
    split = 3  # the image starts in the second forward
    prefix = model(ids[:, :split], attention_mask=mask[:, :split], use_cache=True, causal=True)
    assert prefix.cache.rope_deltas.tolist() == [[0], [0]]
    rest = model(
        ids[:, split:],
        attention_mask=mask,
        cache=prefix.cache,
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
        causal=True,
    ).logits
    assert (rest - full[:, split:])[mask[:, split:].bool()].abs().max() <= 1e-5
    assert prefix.cache.rope_deltas.tolist() == [[-2], [0]]


@torch.no_grad()
def test_logits_to_keep(model, reference):
    inputs = case_inputs(reference, "image")
    full = model(**inputs).logits
    assert torch.equal(model(**inputs, logits_to_keep=4).logits, full[:, -4:])
    assert torch.equal(model(**inputs, logits_to_keep=slice(8, 16)).logits, full[:, 8:16])


def test_gradient_checkpointing_gives_the_same_grads(reference):
    batch = image_and_text_batch(reference)

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = DimpleModel.from_pretrained(FIXTURE)
        if checkpointing:
            model.activation_checkpointing_enable()  # transformers 5's name for gradient_checkpointing_enable
            assert all(layer.gradient_checkpointing for layer in [*model.model.layers, *model.visual.blocks])
        model.train()
        model(**batch).logits.pow(2).mean().backward()
        return {name: param.grad for name, param in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    assert plain["visual.blocks.0.attn.qkv.weight"].abs().max() > 0  # the image path is trained too
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-7), name


@torch.no_grad()
def test_save_load_round_trip_at_a_tiny_random_config(tmp_path):
    torch.manual_seed(0)
    model = DimpleModel(tiny_config()).eval()
    ids = torch.tensor([[5, 6, 88, 90, 90, 90, 90, 89, 7, 95, 95], [94, 94, 94, 5, 6, 7, 8, 9, 95, 95, 95]])
    mask = (ids != 94).long()
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "pixel_values": torch.randn(16, 1176),
        "image_grid_thw": torch.tensor([[1, 4, 4]]),
    }
    expected = model(**inputs).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "dimple" and saved["vision_config"]["model_type"] == "dimple"
    reloaded, info = DimpleModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    vision = reloaded.config.vision_config.to_dict(), model.config.vision_config.to_dict()
    assert {k: v for k, v in vision[0].items() if k != "dtype"} == {k: v for k, v in vision[1].items() if k != "dtype"}
    assert torch.equal(reloaded.eval()(**inputs).logits, expected)
