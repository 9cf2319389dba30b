"""The embedded model and the teacher interface: save/reload, logit alignment, attention modes, cache, and the
model's own `diffusion_generate` against the decoding engine."""

import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from distill.decoding import decode, left_pad
from distill.recipe import DecoderConfig
from teachers.interface import load_teacher, new_tiny_teacher, save_teacher
from teachers.tokenizer import build_char_tokenizer


def tiny():
    torch.manual_seed(0)
    teacher = new_tiny_teacher(32, 64, 2, 4, 2, 64)
    teacher.model.eval()
    return teacher


def batch(teacher, texts, tail=5):
    prompts = [teacher.encode_prompt(text) + [teacher.mask_token_id] * tail for text in texts]
    width = max(map(len, prompts))
    ids = torch.tensor([[teacher.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def test_tokenizer_round_trip_and_chat_format(tmp_path):
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


def test_save_reload_same_logits(tmp_path):
    teacher = tiny()
    ids, mask = batch(teacher, ["12+34=", "sort 3 1 2"])
    expected = teacher.forward(ids, mask)
    save_teacher(teacher, tmp_path / "teacher")
    assert not (tmp_path / "teacher.tmp").exists()
    model = AutoModel.from_pretrained(tmp_path / "teacher")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "teacher")
    assert tokenizer.encode("12+34=", add_special_tokens=False) == teacher.tokenizer.encode(
        "12+34=", add_special_tokens=False
    )
    raw = model(input_ids=ids, attention_mask=mask).logits
    assert (torch.cat([raw[:, :1], raw[:, :-1]], 1) - expected).abs().max() <= 1e-6
    assert (load_teacher("tiny", tmp_path / "teacher").forward(ids, mask) - expected).abs().max() <= 1e-6


def test_reload_with_remote_code_without_fewstep(tmp_path):
    teacher = tiny()
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
        "print('ok')\n"
    )
    # `-I` isolates from the current directory and PYTHONPATH; the editable install is hidden by `-S` plus
    # an explicit site-packages path without the fewstep finder.
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(site), HF_MODULES_CACHE=str(tmp_path / "modules"))
    result = subprocess.run(
        [sys.executable, "-S", "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ok" in result.stdout


def test_shifted_alignment():
    teacher = tiny()
    ids, mask = batch(teacher, ["12+34="])
    raw = teacher.model(input_ids=ids, attention_mask=mask).logits
    aligned = teacher.forward(ids, mask)
    assert torch.equal(aligned[:, 1:], raw[:, :-1])


def test_causal_switch_and_bidirectional_default():
    teacher = tiny()
    ids, mask = batch(teacher, ["12+34="])
    changed = ids.clone()
    changed[0, -1] = teacher.tokenizer.convert_tokens_to_ids("7")
    causal = teacher.forward(ids, mask, causal=True)
    causal_changed = teacher.forward(changed, mask, causal=True)
    # Causal: a change at the last position cannot affect any earlier position's raw output.
    assert torch.allclose(causal[:, :-1], causal_changed[:, :-1], atol=1e-6)
    full = teacher.forward(ids, mask)
    full_changed = teacher.forward(changed, mask)
    assert not torch.allclose(full[:, :-1], full_changed[:, :-1], atol=1e-4)


def test_left_padding_does_not_change_logits():
    teacher = tiny()
    ids, mask = batch(teacher, ["7+8=", "123+456="])
    alone_ids, alone_mask = batch(teacher, ["7+8="])
    padded = teacher.forward(ids, mask)[0, -alone_ids.shape[1] :]
    alone = teacher.forward(alone_ids, alone_mask)[0]
    # Row 0 (BOS) scores nothing: shifted alignment has no predecessor for it, so it is left out.
    padded, alone = padded[1:], alone[1:]
    assert (padded - alone).abs().max() <= 1e-5


def test_prefix_cache_exact_for_causal_and_close_for_bidirectional():
    teacher = tiny()
    ids, mask = batch(teacher, ["7+8=", "123+456="], tail=6)
    prompt_len = ids.shape[1] - 6
    cache = teacher.prefill(ids[:, :prompt_len], mask[:, :prompt_len], causal=True)
    cached = teacher.forward(ids[:, prompt_len:], mask[:, prompt_len:], cache=cache, causal=True)
    full = teacher.forward(ids, mask, causal=True)[:, prompt_len:]
    assert (cached - full).abs().max() <= 1e-5
    # Bidirectional: the cached prompt does not see the response, an approximation, but shapes line up.
    cache = teacher.prefill(ids[:, :prompt_len], mask[:, :prompt_len])
    approx = teacher.forward(ids[:, prompt_len:], mask[:, prompt_len:], cache=cache)
    assert approx.shape == full.shape and torch.isfinite(approx).all()


# diffusion_generate restates the decoding engine inside the modeling file (exports load it without fewstep); the
# two must commit the same tokens at the same steps. The LM head is scaled so confidences spread over (0, 1) and
# every threshold below commits some positions by the threshold rule and leaves others to the fallback.
GENERATE_CASES = [
    {"name": "confident", "threshold": 0.5, "block_length": 8},
    {"name": "confident", "threshold": 0.2, "confidence": "margin", "steps": 8},
    {"name": "confident", "threshold": 0.9, "fixed_length": 10, "pins": {-4: "####"}},
    {"name": "threshold", "threshold": 0.5, "block_length": 4},
    {"name": "multi_block", "threshold": 1.0, "block_length": 4},
    {"name": "multi_block", "threshold": 2.0, "block_length": 8, "activate_fraction": 0.3, "eos_fill": False},
    {"name": "low_confidence", "steps": 8, "block_length": 4},
    {"name": "low_confidence", "steps": 16, "block_length": 1},
    {"name": "low_confidence", "remasking": "random", "steps": 8, "temperature": 0.7, "top_k": 20, "top_p": 0.9},
]


@pytest.mark.parametrize("settings", GENERATE_CASES, ids=lambda case: "-".join(map(str, case.values())))
def test_diffusion_generate_matches_the_decoding_engine(settings):
    teacher = tiny()
    with torch.no_grad():
        teacher.model.lm_head.weight.mul_(30)
    questions = ["12+34=", "sort 3 1 2", "7+8=", "999+1=", "hello"]
    prompts = [teacher.encode_prompt(question) for question in questions]
    config = DecoderConfig(**settings, cache="none")
    expected = decode(teacher, prompts, config, 16, torch.Generator().manual_seed(3))
    ids, mask = left_pad(prompts, teacher.pad_token_id)
    pin_ids = {
        str(position): teacher.tokenizer.encode(text, add_special_tokens=False)
        for position, text in config.pins.items()
    }
    fields = ("steps", "block_length", "threshold", "confidence", "remasking", "temperature", "top_k", "top_p")
    fields += ("activate_fraction", "full_activate_fraction", "eos_fill", "fixed_length")
    generation = {"decoder": config.name, "gen_length": 16, "pin_ids": pin_ids} | {
        name: getattr(config, name) for name in fields
    }
    out = teacher.model.diffusion_generate(
        ids, attention_mask=mask, generation_config=generation, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(out.sequences[:, : ids.shape[1]], ids)
    assert torch.equal(out.sequences[:, ids.shape[1] :], expected.tokens)
    assert torch.equal(out.nfe, expected.nfe) and torch.equal(out.order, expected.order)


def test_diffusion_generate_rejects_unknown_settings_and_bad_lengths():
    teacher = tiny()
    ids, mask = left_pad([teacher.encode_prompt("1+1=")], teacher.pad_token_id)
    with pytest.raises(ValueError, match="unknown decoding setting"):
        teacher.model.diffusion_generate(ids, mask, generation_config={}, threshhold=0.5)
    with pytest.raises(ValueError, match="not a multiple of block_length"):
        teacher.model.diffusion_generate(ids, mask, generation_config={"gen_length": 10, "block_length": 4})
