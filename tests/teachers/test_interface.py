"""The teacher interface over every backbone at a tiny random config: save/reload, loading without fewstep, logit
alignment, attention modes, left padding, the prefix cache, tokens read from the chat template, and the exported
`diffusion_generate` against fewstep's decoding engine."""

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from distill.decoding import decode, decode_settings, left_pad
from distill.recipe import DecoderConfig
from teachers.interface import BACKBONES, load_teacher, save_teacher
from teachers.tokenizer import build_char_tokenizer
from tests.builders import BACKBONE_FIXTURES, BACKBONE_NAMES, tiny_teacher


def tiny(backbone: str = "dream", published_chat: bool = True):
    torch.manual_seed(0)
    return tiny_teacher(32, 64, 2, 4, 2, 64, backbone=backbone, published_chat=published_chat)


def batch(teacher, texts, tail=5):
    prompts = [teacher.encode_prompt(text).ids + [teacher.mask_token_id] * tail for text in texts]
    return left_pad(prompts, teacher.pad_token_id)


def test_char_tokenizer_round_trip_and_compact_chat_format(tmp_path):
    tokenizer = build_char_tokenizer()
    text = "Ann has 5 apples.\n347+285=C:0110 #### 632"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    messages = [{"role": "user", "content": "1+2="}]
    assert reloaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == (
        "<|bos|><|user|>1+2=<|assistant|>"
    )
    assert reloaded.mask_token == "<|mask|>" and reloaded.eos_token == "<|eos|>" and reloaded.pad_token == "<|pad|>"


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_end_of_turn_is_read_from_the_chat_template(backbone):
    teacher = tiny(backbone)
    closing = {"llada": "<|eot_id|>", "dream": "<|im_end|>", "dimple": "<|im_end|>"}[backbone]
    assert teacher.end_token_id == teacher.tokenizer.convert_tokens_to_ids(closing) != teacher.eos_token_id
    assert teacher.encode_response("46")[-1] == teacher.end_token_id
    assert teacher.decode_response(teacher.encode_response("46") + [teacher.pad_token_id] * 3) == "46"
    compact = tiny(backbone, published_chat=False)
    assert compact.end_token_id == compact.eos_token_id


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_save_reload_same_logits_and_published_model_type(tmp_path, backbone):
    teacher = tiny(backbone)
    ids, mask = batch(teacher, ["12+34=", "sort 3 1 2"])
    expected = teacher.forward(ids, mask)
    save_teacher(teacher, tmp_path / "teacher")
    assert not (tmp_path / "teacher.tmp").exists()
    config = (tmp_path / "teacher" / "config.json").read_text()
    assert f'"model_type": "{BACKBONES[backbone].model_type}"' in config and "auto_map" in config
    model = AutoModel.from_pretrained(tmp_path / "teacher")
    assert type(model) is BACKBONES[backbone].model_class
    reloaded = load_teacher(None, tmp_path / "teacher")
    assert reloaded.name == backbone and reloaded.end_token_id == teacher.end_token_id
    assert (reloaded.forward(ids, mask) - expected).abs().max() <= 1e-6
    with pytest.raises(ValueError, match="holds a"):
        load_teacher("llada" if backbone != "llada" else "dream", tmp_path / "teacher")


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_reload_with_remote_code_without_fewstep(tmp_path, backbone):
    teacher = tiny(backbone)
    save_teacher(teacher, tmp_path / "teacher")
    ids, mask = batch(teacher, ["12+34="])
    torch.save(
        {"ids": ids, "mask": mask, "logits": teacher.model(input_ids=ids, attention_mask=mask).logits},
        tmp_path / "ref.pt",
    )
    script = (
        "import sys, torch\n"
        "for name in ('distill', 'teachers', 'eval', 'students'):\n"
        "    try:\n"
        "        __import__(name); raise SystemExit(f'{name} importable')\n"
        "    except ImportError:\n"
        "        pass\n"
        "from transformers import AutoModel\n"
        f"ref = torch.load({str(tmp_path / 'ref.pt')!r})\n"
        f"model = AutoModel.from_pretrained({str(tmp_path / 'teacher')!r}, trust_remote_code=True)\n"
        "diff = (model(input_ids=ref['ids'], attention_mask=ref['mask']).logits - ref['logits']).abs().max()\n"
        "assert diff <= 1e-6, diff\n"
        "print('ok', type(model).__name__)\n"
    )
    # `-S` plus an explicit site-packages path hides the editable install's finder; cwd is not the repo.
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(site), HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-S", "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"ok {BACKBONES[backbone].model_class.__name__}" in result.stdout


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_alignment_and_response_slice(backbone):
    teacher = tiny(backbone)
    ids, mask = batch(teacher, ["12+34=", "7+8="])
    raw = teacher.model(input_ids=ids, attention_mask=mask).logits
    aligned = teacher.forward(ids, mask)
    if teacher.shifted:
        assert torch.equal(aligned[:, 1:], raw[:, :-1]) and torch.equal(aligned[:, 0], raw[:, 0])
    else:
        assert torch.equal(aligned, raw)
    start = ids.shape[1] - 5
    assert (teacher.forward(ids, mask, start=start) - aligned[:, start:]).abs().max() <= 1e-6


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_causal_switch_and_bidirectional_default(backbone):
    teacher = tiny(backbone)
    ids, mask = batch(teacher, ["12+34="])
    changed = ids.clone()
    changed[0, -1] = teacher.tokenizer.convert_tokens_to_ids("7")
    raw = teacher.model(input_ids=ids, attention_mask=mask, causal=True).logits
    raw_changed = teacher.model(input_ids=changed, attention_mask=mask, causal=True).logits
    # Causal: a change at the last position cannot affect any earlier position's raw output.
    assert torch.allclose(raw[:, :-1], raw_changed[:, :-1], atol=1e-6)
    full = teacher.model(input_ids=ids, attention_mask=mask).logits
    full_changed = teacher.model(input_ids=changed, attention_mask=mask).logits
    assert not torch.allclose(full[:, :-1], full_changed[:, :-1], atol=1e-4)


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_left_padding_does_not_change_logits(backbone):
    teacher = tiny(backbone)
    ids, mask = batch(teacher, ["7+8=", "123+456="])
    alone_ids, alone_mask = batch(teacher, ["7+8="])
    padded = teacher.forward(ids, mask)[0, -alone_ids.shape[1] :]
    alone = teacher.forward(alone_ids, alone_mask)[0]
    # Row 0 scores nothing for a shifted model (no predecessor), so it is left out.
    assert (padded[1:] - alone[1:]).abs().max() <= 1e-5


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
def test_prefix_cache_exact_for_causal_and_reusable(backbone):
    teacher = tiny(backbone)
    ids, mask = batch(teacher, ["7+8=", "123+456="], tail=6)
    prompt_len = ids.shape[1] - 6
    cache = teacher.prefill(ids[:, :prompt_len], mask[:, :prompt_len], causal=True)
    full = teacher.forward(ids, mask, causal=True)[:, prompt_len:]
    for _ in range(2):  # a forward on top of the cache leaves it as it was
        cached = teacher.forward(ids[:, prompt_len:], mask[:, prompt_len:], cache=cache, causal=True)
        assert (cached - full).abs().max() <= 1e-5
    # Bidirectional: the cached prompt does not see the response, an approximation, but shapes line up.
    cache = teacher.prefill(ids[:, :prompt_len], mask[:, :prompt_len])
    approx = teacher.forward(ids[:, prompt_len:], mask[:, prompt_len:], cache=cache)
    assert approx.shape == full.shape and torch.isfinite(approx).all()


# The exported `diffusion_generate` and fewstep's engine run the same decoding module; these pin that the two call
# paths (raw model + generation config vs Teacher + recipe decoder) agree. The LM head is scaled so confidences
# spread over (0, 1) and every threshold below commits some positions by the threshold rule and leaves others to
# the fallback.
GENERATE_CASES = [
    {"name": "confident", "threshold": 0.5, "block_length": 8},
    {"name": "confident", "threshold": 0.2, "confidence": "margin", "steps": 8, "cache": "prompt"},
    {"name": "confident", "threshold": 0.9, "fixed_length": 10, "pins": {-4: "####"}},
    {"name": "threshold", "threshold": 0.5, "block_length": 4, "cache": "blocks"},
    {"name": "multi_block", "threshold": 1.0, "block_length": 4},
    {"name": "multi_block", "threshold": 2.0, "block_length": 8, "activate_fraction": 0.3, "eos_fill": False},
    {"name": "low_confidence", "steps": 8, "block_length": 4},
    {"name": "low_confidence", "remasking": "random", "steps": 8, "temperature": 0.7, "top_k": 20, "top_p": 0.9},
]


@pytest.mark.parametrize("backbone", BACKBONE_NAMES)
@pytest.mark.parametrize("settings", GENERATE_CASES, ids=lambda case: "-".join(map(str, case.values())))
def test_diffusion_generate_matches_the_decoding_engine(backbone, settings):
    teacher = tiny(backbone)
    with torch.no_grad():
        teacher.model.get_output_embeddings().weight.mul_(30)
    questions = ["12+34=", "sort 3 1 2", "7+8=", "999+1=", "hello"]
    prompts = [teacher.encode_prompt(question).ids for question in questions]
    config = DecoderConfig(**({"cache": "none"} | settings))
    expected = decode(teacher, prompts, config, 16, torch.Generator().manual_seed(3))
    ids, mask = left_pad(prompts, teacher.pad_token_id)
    generation = decode_settings(teacher, config, 16).to_dict() | {"eos_token_id": teacher.end_token_id}
    out = teacher.model.diffusion_generate(
        ids, attention_mask=mask, generation_config=generation, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
    assert torch.equal(out.sequences[:, ids.shape[1] :], expected.tokens)
    assert torch.equal(out.nfe, expected.nfe) and torch.equal(out.order, expected.order)


def test_diffusion_generate_rejects_unknown_settings_and_bad_lengths():
    teacher = tiny()
    ids, mask = left_pad([teacher.encode_prompt("1+1=").ids], teacher.pad_token_id)
    with pytest.raises(ValueError, match="unknown decoding setting"):
        teacher.model.diffusion_generate(ids, mask, generation_config={}, threshhold=0.5)
    with pytest.raises(ValueError, match="not a multiple of block_length"):
        teacher.model.diffusion_generate(ids, mask, generation_config={"gen_length": 10, "block_length": 4})


def test_dimple_reads_its_image_processor_and_keeps_it_on_save(tmp_path):
    teacher = load_teacher(None, BACKBONE_FIXTURES / "dimple")
    # The published folder names Dimple's remote processor class; Qwen2-VL's PIL processor reads its settings.
    image = Image.fromarray((torch.rand(56, 56, 3) * 255).to(torch.uint8).numpy())
    out = teacher.image_processor(images=[image], return_tensors="pt")
    assert out["pixel_values"].shape == (16, 1176) and out["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert load_teacher(None, BACKBONE_FIXTURES / "dream").image_processor is None
    save_teacher(tiny("dimple"), tmp_path / "dimple")
    assert (tmp_path / "dimple" / "preprocessor_config.json").is_file()
    assert load_teacher(None, tmp_path / "dimple").image_processor is not None


FIXTURE_CASES = [("llada", "unpadded"), ("llada", "padded")]
FIXTURE_CASES += [(name, case) for name in ("dream", "dimple") for case in ("unpadded", "padded")] + [
    ("dimple", "image")
]


@pytest.mark.parametrize(("fixture", "case"), FIXTURE_CASES, ids=lambda value: str(value))
def test_published_layout_fixtures_reproduce_through_the_teacher_interface(fixture, case):
    # The fixture holds the RAW logits the published code computed; the interface aligns them (position i scores
    # token i), as decoding and training see them.
    teacher = load_teacher(None, BACKBONE_FIXTURES / fixture)
    reference = load_file(BACKBONE_FIXTURES / fixture / "reference.safetensors")
    ids = reference[f"{case}.input_ids"]
    mask = reference.get(f"{case}.attention_mask", torch.ones_like(ids))
    images = {
        name: reference[f"{case}.{name}"]
        for name in ("pixel_values", "image_grid_thw")
        if f"{case}.{name}" in reference
    }
    with torch.no_grad():
        logits = teacher.forward(ids, mask, **images)
    raw = reference[f"{case}.logits"]
    expected = torch.cat([raw[:, :1], raw[:, :-1]], dim=1) if teacher.shifted else raw
    # Compared where the published code's output is defined: real queries (and, shifted, a real predecessor).
    valid = mask.bool()
    if teacher.shifted:
        valid = valid & torch.cat([valid[:, :1], valid[:, :-1]], dim=1)
    assert valid.sum() >= ids.numel() - 6
    assert (logits - expected)[valid].abs().max() <= 1e-4
