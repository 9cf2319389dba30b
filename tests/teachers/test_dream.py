"""fewstep's Dream class against the published Dream-v0-Instruct-7B code (fixture logits) and the backbone contract:
strict loading, padding, the causal switch, the prefix cache, logits_to_keep, gradient checkpointing, save/load."""

import pytest
import torch
from safetensors.torch import load_file

from teachers.backbones.configuration_dream import DreamConfig
from teachers.backbones.modeling_dream import DreamModel
from tests.builders import BACKBONE_FIXTURES

# A tiny random checkpoint with the published key layout, and the raw logits the published code computed for it.
FIXTURE = BACKBONE_FIXTURES / "dream"


@pytest.fixture(scope="module")
def model():
    model = DreamModel.from_pretrained(FIXTURE)
    return model.eval()


@pytest.fixture(scope="module")
def reference():
    return load_file(FIXTURE / "reference.safetensors")


def compared_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """reference.json's "compare" for padded cases: i with mask[i] and mask[i-1] (or i == 0) real."""
    previous = torch.cat([torch.ones_like(attention_mask[:, :1]), attention_mask[:, :-1]], dim=1)
    return attention_mask.bool() & previous.bool()


def tiny_config(**overrides) -> DreamConfig:
    sizes = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        mask_token_id=95,
        pad_token_id=94,
        bos_token_id=94,
        eos_token_id=94,
    )
    return DreamConfig(**(sizes | overrides))


def test_loads_published_folder_strictly():
    model, info = DreamModel.from_pretrained(FIXTURE, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.config.mask_token_id == 503 and model.config.causal is False
    assert model.config.rope_parameters["rope_theta"] == 1e6
    assert DreamModel.logits_shifted


@torch.no_grad()
def test_unpadded_case_matches_published_logits(model, reference):
    logits = model(reference["unpadded.input_ids"]).logits
    assert (logits - reference["unpadded.logits"]).abs().max() <= 1e-4


@torch.no_grad()
def test_padded_case_matches_published_logits(model, reference):
    mask = reference["padded.attention_mask"]
    logits = model(reference["padded.input_ids"], attention_mask=mask).logits
    compared = compared_positions(mask)
    assert (logits - reference["padded.logits"])[compared].abs().max() <= 1e-4


@torch.no_grad()
def test_left_padded_batch_equals_each_sample_alone(model, reference):
    ids, mask = reference["padded.input_ids"], reference["padded.attention_mask"]
    batch = model(ids, attention_mask=mask).logits
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        alone = model(ids[row : row + 1, real]).logits[0]
        assert (batch[row, real] - alone).abs().max() <= 1e-5


@torch.no_grad()
def test_eager_attention_equals_sdpa(reference):
    eager = DreamModel.from_pretrained(FIXTURE, attn_implementation="eager").eval()
    sdpa = DreamModel.from_pretrained(FIXTURE).eval()
    ids, mask = reference["padded.input_ids"], reference["padded.attention_mask"]
    real = mask.bool()
    for causal in (False, True):
        difference = eager(ids, attention_mask=mask, causal=causal).logits - sdpa(ids, mask, causal=causal).logits
        assert difference[real].abs().max() <= 1e-5


@torch.no_grad()
def test_causal_switch(model, reference):
    ids = reference["unpadded.input_ids"]
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % model.config.vocab_size
    causal = model(ids, causal=True).logits, model(changed, causal=True).logits
    assert (causal[0][:, :-1] - causal[1][:, :-1]).abs().max() <= 1e-6
    bidirectional = model(ids).logits, model(changed).logits
    assert (bidirectional[0][:, :-1] - bidirectional[1][:, :-1]).abs().max() > 1e-4
    # `config.causal` is the default a call falls back to
    model.config.causal = True
    try:
        assert torch.equal(model(ids).logits, causal[0])
    finally:
        model.config.causal = False


@torch.no_grad()
def test_prefix_cache_under_causal_equals_full_forward(model, reference):
    ids, mask = reference["padded.input_ids"], reference["padded.attention_mask"]
    full = model(ids, attention_mask=mask, causal=True).logits
    split = 7
    prefix = model(ids[:, :split], attention_mask=mask[:, :split], use_cache=True, causal=True)
    assert prefix.cache.get_seq_length() == split
    rest = model(ids[:, split:], attention_mask=mask, cache=prefix.cache, causal=True).logits
    real = mask[:, split:].bool()
    assert (rest - full[:, split:])[real].abs().max() <= 1e-5
    assert (prefix.logits - full[:, :split])[mask[:, :split].bool()].abs().max() <= 1e-5
    # the cache grew by the current tokens; cropping it back makes it reusable
    assert prefix.cache.get_seq_length() == ids.shape[1]
    prefix.cache.crop(split - ids.shape[1])  # transformers 5: a negative count of tokens to drop
    again = model(ids[:, split:], attention_mask=mask, cache=prefix.cache, causal=True).logits
    assert torch.allclose(again, rest, atol=1e-6)
    assert not full.isnan().any()  # the left pads, which see nothing under causal attention, attend to themselves


@torch.no_grad()
def test_logits_to_keep(model, reference):
    ids = reference["unpadded.input_ids"]
    full = model(ids).logits
    # The head on fewer rows may block its matmul differently: equal up to float rounding.
    assert torch.allclose(model(ids, logits_to_keep=3).logits, full[:, -3:], atol=1e-6)
    assert torch.allclose(model(ids, logits_to_keep=slice(2, 9)).logits, full[:, 2:9], atol=1e-6)
    assert torch.equal(model(ids, logits_to_keep=0).logits, full)


def test_gradient_checkpointing_gives_the_same_grads(reference):
    ids, mask = reference["padded.input_ids"], reference["padded.attention_mask"]

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = DreamModel.from_pretrained(FIXTURE)
        if checkpointing:
            model.activation_checkpointing_enable()  # transformers 5's name for gradient_checkpointing_enable
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        model.train()
        model(ids, attention_mask=mask).logits.pow(2).mean().backward()
        return {name: param.grad for name, param in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], atol=1e-7), name


@torch.no_grad()
def test_save_load_round_trip_at_a_tiny_random_config(tmp_path):
    torch.manual_seed(0)
    model = DreamModel(tiny_config(causal=True)).eval()
    ids = torch.randint(0, 94, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    expected = model(ids, attention_mask=mask).logits
    model.save_pretrained(tmp_path)
    reloaded, info = DreamModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.causal is True and reloaded.config.mask_token_id == 95
    assert torch.equal(reloaded.eval()(ids, attention_mask=mask).logits, expected)


def test_random_init_follows_initializer_range():
    torch.manual_seed(0)
    model = DreamModel(tiny_config(intermediate_size=4096, initializer_range=0.05))
    assert abs(model.model.layers[0].mlp.up_proj.weight.std().item() - 0.05) < 0.005
    assert torch.equal(model.model.layers[0].self_attn.q_proj.bias, torch.zeros(32))
    assert torch.equal(model.model.norm.weight, torch.ones(32))
