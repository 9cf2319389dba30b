"""fewstep's LLaDA class: the published checkpoint layout loads and reproduces the published code's logits, and the
forward contract holds (padding, causal switch, prefix cache, logits_to_keep, gradient checkpointing, save/load,
grouped-query attention, refused variants)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from teachers.backbones.configuration_llada import LLaDAConfig
from teachers.backbones.modeling_llada import LLaDAModelLM
from tests.builders import BACKBONE_FIXTURES

# A tiny random checkpoint with the published key layout and config keys, and the logits the published code computed.
FIXTURE = BACKBONE_FIXTURES / "llada"


def fixture_model(attn_implementation: str = "sdpa") -> LLaDAModelLM:
    return LLaDAModelLM.from_pretrained(FIXTURE, attn_implementation=attn_implementation).eval()


def tiny_config(**overrides) -> LLaDAConfig:
    sizes = dict(
        d_model=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=4,
        mlp_hidden_size=64,
        vocab_size=64,
        mask_token_id=63,
        pad_token_id=62,
        eos_token_id=62,
    )
    return LLaDAConfig(**(sizes | overrides))


def tiny_model(**overrides) -> LLaDAModelLM:
    torch.manual_seed(0)
    return LLaDAModelLM(tiny_config(**overrides)).eval()


def random_batch(batch: int = 2, length: int = 10, vocab: int = 64) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("case", ["unpadded", "padded"])
def test_fixture_logits_match_the_published_code(case, attn_implementation):
    reference = load_file(FIXTURE / "reference.safetensors")
    cases = json.loads((FIXTURE / "reference.json").read_text())["cases"]
    assert case in cases
    mask = reference.get(f"{case}.attention_mask")
    with torch.no_grad():
        logits = fixture_model(attn_implementation)(reference[f"{case}.input_ids"], attention_mask=mask).logits
    expected = reference[f"{case}.logits"]
    assert logits.shape == expected.shape and logits.dtype == torch.float32
    # Padded query rows are not compared: the published code gives them absolute positions, fewstep a dummy one.
    valid = mask.bool() if mask is not None else torch.ones(expected.shape[:2], dtype=torch.bool)
    assert (logits - expected)[valid].abs().max() <= 1e-4


def test_published_folder_loads_strictly():
    model, info = LLaDAModelLM.from_pretrained(FIXTURE, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    published = json.loads((FIXTURE / "config.json").read_text())
    assert model.config.mask_token_id == published["mask_token_id"] and model.config.causal is False
    assert model.logits_shifted is False
    assert set(model.state_dict()) == {
        name for name, _, _ in json.loads((FIXTURE / "reference.json").read_text())["state_dict"]
    }


@pytest.mark.parametrize("causal", [False, True])
def test_left_padded_batch_equals_per_sample_forwards(causal):
    model = fixture_model()
    ids = random_batch(3, 9, model.config.vocab_size)
    lengths = [9, 6, 2]
    pad = model.config.pad_token_id
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, : 9 - length] = pad
        mask[row, 9 - length :] = 1
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, causal=causal).logits
        for row, length in enumerate(lengths):
            alone = model(ids[row : row + 1, 9 - length :], causal=causal).logits
            assert (batched[row, 9 - length :] - alone[0]).abs().max() <= 1e-5


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_no_mask_equals_all_ones_mask(attn_implementation):
    # Without padding the model passes no mask to the attention (SDPA's fastest kernels); same logits.
    model = fixture_model(attn_implementation)
    ids = random_batch(2, 10, model.config.vocab_size)
    with torch.no_grad():
        for causal in (False, True):
            plain = model(ids, causal=causal).logits
            assert (plain - model(ids, attention_mask=torch.ones_like(ids), causal=causal).logits).abs().max() <= 1e-6


def test_causal_switch():
    model = tiny_model()
    ids = random_batch()
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 64
    with torch.no_grad():
        for causal in (False, True):
            before = model(ids, causal=causal).logits[:, :-1]
            after = model(changed, causal=causal).logits[:, :-1]
            assert torch.equal(before, after) == causal
        # The config's default applies when the call does not say.
        model.config.causal = True
        assert torch.equal(model(ids).logits, model(ids, causal=True).logits)


def test_prefix_cache_under_causal_equals_full_forward():
    model = tiny_model(causal=True)
    ids = random_batch(2, 10)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the cached prefix
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits
        prefix = model(ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        assert prefix.cache.get_seq_length() == 6
        rest = model(ids[:, 6:], attention_mask=mask, cache=prefix.cache).logits
    assert prefix.cache.get_seq_length() == 10
    assert (rest - full[:, 6:]).abs().max() <= 1e-5
    assert (prefix.logits - full[:, :6])[mask[:, :6].bool()].abs().max() <= 1e-5


def test_logits_to_keep():
    model = tiny_model()
    ids = random_batch()
    with torch.no_grad():
        full = model(ids).logits
        assert full.shape == (2, 10, 64)
        assert torch.allclose(model(ids, logits_to_keep=3).logits, full[:, -3:], atol=1e-6)
        assert torch.allclose(model(ids, logits_to_keep=slice(2, 5)).logits, full[:, 2:5], atol=1e-6)


def test_gradient_checkpointing_gives_the_same_grads():
    ids = random_batch()

    def grads(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = tiny_model().train()
        if checkpointing:
            model.activation_checkpointing_enable()  # transformers 5's name for gradient_checkpointing_enable
        calls = []
        model.model.transformer.blocks[0].ff_norm.register_forward_hook(lambda *_: calls.append(1))
        model(ids).logits.logsumexp(-1).sum().backward()
        assert len(calls) == 1 + checkpointing  # the backward pass recomputed the block
        return {name: param.grad for name, param in model.named_parameters()}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        assert grad is not None and torch.allclose(grad, checkpointed[name], atol=1e-6), name


@pytest.mark.parametrize("causal", [False, True])
def test_save_and_load_round_trip(tmp_path, causal):
    model = tiny_model(causal=causal)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    # The OLMo key names stay; the transformers aliases are derived and never written.
    published = set(json.loads((FIXTURE / "config.json").read_text()))
    assert published - {"auto_map"} <= set(saved) <= published | {"causal", "dtype"}
    assert not {"hidden_size", "num_attention_heads", "head_dim", "rope_parameters"} & set(saved)
    assert saved.get("causal", False) is causal and ("causal" in saved) == causal
    reloaded, info = LLaDAModelLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert reloaded.config.causal is causal
    ids = random_batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, reloaded.eval()(ids).logits)


def test_standard_names_alias_the_published_keys(tmp_path):
    config = LLaDAConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        vocab_size=64,
    )
    assert (config.d_model, config.n_layers, config.n_heads, config.n_kv_heads) == (32, 2, 4, 2)
    assert (config.mlp_hidden_size, config.max_sequence_length, config.head_dim) == (64, 128, 8)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 500000.0}
    assert config.initializer_range == config.init_std and config.tie_word_embeddings is False
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert (saved["d_model"], saved["n_kv_heads"], saved["mlp_hidden_size"]) == (32, 2, 64)
    assert LLaDAModelLM(config).model.transformer.blocks[0].k_proj.weight.shape == (16, 32)


def test_published_config_saves_back_unchanged(tmp_path):
    published = json.loads((FIXTURE / "config.json").read_text())
    LLaDAConfig.from_pretrained(FIXTURE).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert set(saved) == set(published)
    assert {k: v for k, v in saved.items() if k != "transformers_version"} == {
        k: v for k, v in published.items() if k != "transformers_version"
    }


def test_random_init():
    model = tiny_model()
    assert torch.equal(model.model.transformer.ln_f.weight, torch.ones(32))
    assert torch.equal(model.model.transformer.blocks[0].attn_norm.weight, torch.ones(32))
    assert 0.01 < model.model.transformer.ff_out.weight.std() < 0.03  # init_std 0.02


def test_grouped_query_attention_equals_repeated_heads():
    gqa = tiny_model(n_kv_heads=2)
    block = gqa.model.transformer.blocks[0]
    assert block.k_proj.weight.shape == (16, 32) and block.num_key_value_groups == 2
    # The same weights with each key/value head repeated for its two query heads make an equivalent MHA model.
    mha = LLaDAModelLM(tiny_config()).eval()
    state = gqa.state_dict()
    for name, tensor in state.items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = tensor.view(2, 8, 32).repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    ids = random_batch()
    with torch.no_grad():
        assert (gqa(ids).logits - mha(ids).logits).abs().max() <= 1e-5


@pytest.mark.parametrize(
    "variant",
    [
        {"block_type": "sequential"},
        {"alibi": True},
        {"weight_tying": True},
        {"include_bias": True},
        {"include_qkv_bias": True},
        {"layer_norm_type": "default"},
        {"activation_type": "swiglu"},
        {"attention_layer_norm": True},
        {"scale_logits": True},
        {"rope": False},
        {"clip_qkv": 8.0},
        {"n_kv_heads": 3},
    ],
)
def test_unsupported_variants_are_refused_in_one_line(variant):
    with pytest.raises(ValueError, match=f"^LLaDAConfig: {next(iter(variant))}=") as error:
        tiny_config(**variant)
    assert "\n" not in str(error.value)
