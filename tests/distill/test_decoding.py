"""Decoder semantics, pinned on hand-built logits and on the tiny model."""

import math

import pytest
import torch
from torch import nn

from distill.decoding import decode, finished_rows
from distill.recipe import DecoderConfig
from teachers.interface import Teacher, new_tiny_teacher
from teachers.tokenizer import build_char_tokenizer

TOKENIZER = build_char_tokenizer()
MASK, EOS, PAD = TOKENIZER.mask_token_id, TOKENIZER.eos_token_id, TOKENIZER.pad_token_id


class ScriptedModel(nn.Module):
    """Predicts `targets[j]` at response position j with probability `confidence[j]`, whatever the input."""

    def __init__(self, targets: list[int], confidence: list[float], vocab: int = 128):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device
        self.targets = targets
        self.confidence = confidence
        self.vocab = vocab
        self.calls = 0

    def forward(self, input_ids, attention_mask=None, use_cache=False, **kwargs):
        self.calls += 1
        batch, length = input_ids.shape
        gen = len(self.targets)
        logits = torch.full((batch, length, self.vocab), -30.0)
        for j, (token, prob) in enumerate(zip(self.targets, self.confidence, strict=True)):
            others = (1 - prob) / (self.vocab - 1)
            logits[:, length - gen + j, :] = math.log(others)
            logits[:, length - gen + j, token] = math.log(prob)
        return type("Output", (), {"logits": logits})()


def scripted_teacher(targets, confidence) -> Teacher:
    return Teacher(ScriptedModel(targets, confidence), TOKENIZER, name="scripted", shifted=False, mask_token_id=MASK)


def ids(text: str) -> list[int]:
    return TOKENIZER.encode(text, add_special_tokens=False)


def test_one_token_per_forward_in_confidence_order():
    targets = ids("abcdef")
    confidence = [0.5, 0.9, 0.6, 0.8, 0.7, 0.95]
    teacher = scripted_teacher(targets, confidence)
    result = decode(teacher, [ids("q")], DecoderConfig(), gen_length=6)
    assert result.tokens[0].tolist() == targets
    assert result.nfe.tolist() == [6]
    # Highest confidence first: position 5 (0.95) at step 0, position 1 (0.9) at step 1, ...
    assert result.order[0].tolist() == [5, 1, 4, 2, 3, 0]
    assert result.generated.tolist() == [6] and result.tpf.tolist() == [1.0]


def test_blocks_are_never_skipped():
    targets = ids("abcdefgh")
    # The second block is far more confident, yet must wait for the first block to finish.
    confidence = [0.2, 0.3, 0.4, 0.5, 0.99, 0.98, 0.97, 0.96]
    result = decode(scripted_teacher(targets, confidence), [ids("q")], DecoderConfig(block_length=4), 8)
    order = result.order[0].tolist()
    assert max(order[:4]) < min(order[4:])
    assert order[:4] == [3, 2, 1, 0] and order[4:] == [4, 5, 6, 7]


def test_fewer_steps_commit_several_tokens_per_forward():
    targets = ids("abcdefgh")
    confidence = [0.9 - 0.05 * j for j in range(8)]
    result = decode(scripted_teacher(targets, confidence), [ids("q")], DecoderConfig(steps=2, block_length=4), 8)
    assert result.nfe.tolist() == [2]
    assert result.order[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert result.tpf.tolist() == [4.0]


def test_uneven_split_gives_remainder_to_first_steps():
    targets = ids("abcde")
    confidence = [0.9, 0.8, 0.7, 0.6, 0.5]
    result = decode(scripted_teacher(targets, confidence), [ids("q")], DecoderConfig(steps=2), 5)
    assert result.order[0].tolist() == [0, 0, 0, 1, 1]  # 5 tokens over 2 steps: 3 then 2


def test_eos_stops_early_and_counts_only_answer_tokens():
    targets = ids("ab") + [EOS] + [PAD] * 5
    # EOS and the answer are most confident; once they are committed the answer cannot change.
    confidence = [0.9, 0.8, 0.99, 0.5, 0.5, 0.5, 0.5, 0.5]
    result = decode(scripted_teacher(targets, confidence), [ids("q")], DecoderConfig(), 8)
    assert result.nfe.tolist() == [3]
    assert result.tokens[0].tolist() == ids("ab") + [EOS] * 6
    assert result.order[0].tolist() == [1, 2, 0, -1, -1, -1, -1, -1]
    assert result.generated.tolist() == [2]
    assert result.tpf.tolist() == [pytest.approx(2 / 3)]


def test_finished_rows_rule():
    response = torch.tensor([[10, EOS, MASK], [MASK, EOS, 10], [10, 11, 12]])
    masked = response == MASK
    assert finished_rows(response, masked, EOS).tolist() == [True, False, True]


def test_rejects_uneven_block_split():
    with pytest.raises(ValueError, match="block_length"):
        decode(scripted_teacher(ids("abcde"), [0.5] * 5), [ids("q")], DecoderConfig(block_length=2), 5)
    with pytest.raises(ValueError, match="steps"):
        decode(scripted_teacher(ids("abcd"), [0.5] * 4), [ids("q")], DecoderConfig(steps=3, block_length=2), 4)


def test_tiny_model_one_token_per_forward_and_batch_consistency():
    torch.manual_seed(0)
    teacher = new_tiny_teacher(32, 64, 2, 2, 1, 64)
    teacher.model.eval()
    prompts = [teacher.encode_prompt("12+34="), teacher.encode_prompt("7+8=")]
    result = decode(teacher, prompts, DecoderConfig(), gen_length=8)
    for row in range(2):
        committed = [step for step in result.order[row].tolist() if step >= 0]
        # Exactly one position per forward: the committed steps are 0..nfe-1, each once.
        assert sorted(committed) == list(range(int(result.nfe[row])))
    # Decoding a prompt alone gives the same tokens as decoding it inside a left-padded batch.
    alone = decode(teacher, prompts[1:], DecoderConfig(), gen_length=8)
    assert torch.equal(alone.tokens[0], result.tokens[1])
