"""Decoder semantics, pinned on hand-built logits (a scripted model) and on the tiny model."""

import math

import pytest
import torch
from torch import nn
from transformers import DynamicCache

from distill.decoding import (
    confidence_of,
    decode,
    entropy,
    filter_logits,
    finished_rows,
    sample_tokens,
)
from distill.recipe import DecoderConfig
from teachers.backbones.diffusion_generation import PrefixCache
from teachers.interface import Teacher
from teachers.tokenizer import build_char_tokenizer
from tests.builders import SCRIPTED, keep_logits, tiny_teacher

TOKENIZER = build_char_tokenizer()
MASK, EOS, PAD = TOKENIZER.mask_token_id, TOKENIZER.eos_token_id, TOKENIZER.pad_token_id
VOCAB = 128


class ScriptedModel(nn.Module):
    """Scores response position j as `targets[j]` with probability `confidence[j]`, whatever else the input holds.

    `script` maps a prompt's first token to that prompt's `(targets, confidence)` (key None: every prompt), so
    rows of one batch can differ. A cached forward recognises its rows from the prefix ids the model put in the
    cache at prefill, so a cache sliced to the wrong rows would give the wrong tokens. The response canvas always
    ends the input, so scores are placed from the end. `calls` records `("prefill" | "forward", input length)`.
    """

    def __init__(self, script: dict):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the module a device
        self.script = script
        self.calls: list[tuple[str, int]] = []

    def forward(self, input_ids, attention_mask=None, use_cache=False, cache=None, logits_to_keep=0, **kwargs):
        self.calls.append(("prefill" if use_cache else "forward", input_ids.shape[1]))
        context = input_ids if cache is None else torch.cat([cache.ids, input_ids], dim=1)
        first_real = (context != PAD).float().argmax(-1)
        batch, length = input_ids.shape
        logits = torch.full((batch, length, VOCAB), -30.0)
        for row in range(batch):
            key = int(context[row, first_real[row]])
            targets, confidence = self.script.get(key, self.script.get(None))
            gen = len(targets)
            for j, (token, prob) in enumerate(zip(targets, confidence, strict=True)):
                column = length - gen + j
                if column < 0:
                    continue  # a cached forward sees only the tail of the canvas
                logits[row, column, :] = math.log((1 - prob) / (VOCAB - 1))
                logits[row, column, token] = math.log(prob)
        logits = keep_logits(logits, logits_to_keep)
        return type("Output", (), {"logits": logits, "cache": ScriptedCache(context) if use_cache else None})()


class ScriptedCache:
    """The prefix ids themselves, with the row slicing and length of a transformers cache."""

    def __init__(self, ids: torch.Tensor):
        self.ids = ids

    def get_seq_length(self) -> int:
        return self.ids.shape[1]

    def crop(self, tokens_to_remove: int) -> None:
        assert tokens_to_remove == 0  # the scripted model never appends to the cache

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.ids = self.ids[indices]


def scripted_teacher(targets, confidence) -> Teacher:
    return script_teacher({None: (targets, confidence)})


def script_teacher(script: dict) -> Teacher:
    return Teacher(ScriptedModel(script), TOKENIZER, SCRIPTED, mask_token_id=MASK)


def ids(text: str) -> list[int]:
    return TOKENIZER.encode(text, add_special_tokens=False)


def run(targets, certainty, gen_length=None, **settings):
    teacher = scripted_teacher(targets, certainty)
    return decode(teacher, [ids("q")], DecoderConfig(**settings), gen_length or len(targets))


def sharp_teacher(causal: bool) -> Teacher:
    torch.manual_seed(0)
    teacher = tiny_teacher(32, 64, 2, 2, 1, 64)
    # A sharper head than the random init's keeps greedy choices clear of float-rounding ties.
    nn.init.normal_(teacher.model.get_output_embeddings().weight, std=0.5)
    teacher.model.config.causal = causal
    return teacher.eval() if hasattr(teacher, "eval") else teacher


TINY_PROMPTS = ["12+34=", "7+8=", "sort 3 1 2"]


# ----------------------------------------------------------------------------------------------------------------
# low_confidence (LLaDA generate)


def test_one_token_per_forward_in_confidence_order():
    targets = ids("abcdef")
    result = run(targets, [0.5, 0.9, 0.6, 0.8, 0.7, 0.95])
    assert result.tokens[0].tolist() == targets
    assert result.nfe.tolist() == [6]
    # Highest confidence first: position 5 (0.95) at step 0, position 1 (0.9) at step 1, ...
    assert result.order[0].tolist() == [5, 1, 4, 2, 3, 0]
    assert result.generated.tolist() == [6] and result.tpf.tolist() == [1.0]


def test_blocks_are_never_skipped():
    # The second block is far more confident, yet must wait for the first block to finish.
    result = run(ids("abcdefgh"), [0.2, 0.3, 0.4, 0.5, 0.99, 0.98, 0.97, 0.96], block_length=4)
    order = result.order[0].tolist()
    assert max(order[:4]) < min(order[4:])
    assert order[:4] == [3, 2, 1, 0] and order[4:] == [4, 5, 6, 7]


def test_fewer_steps_commit_several_tokens_per_forward():
    result = run(ids("abcdefgh"), [0.9 - 0.05 * j for j in range(8)], steps=2, block_length=4)
    assert result.nfe.tolist() == [2]
    assert result.order[0].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert result.tpf.tolist() == [4.0]


def test_uneven_split_gives_remainder_to_first_steps():
    result = run(ids("abcde"), [0.9, 0.8, 0.7, 0.6, 0.5], steps=2)
    assert result.order[0].tolist() == [0, 0, 0, 1, 1]  # 5 tokens over 2 steps: 3 then 2


def test_random_remasking_still_commits_one_per_step_within_blocks():
    generator = torch.Generator().manual_seed(0)
    teacher = scripted_teacher(ids("abcdefgh"), [0.5] * 8)
    config = DecoderConfig(remasking="random", block_length=4)
    result = decode(teacher, [ids("q")], config, 8, generator)
    order = result.order[0].tolist()
    assert sorted(order[:4]) == [0, 1, 2, 3] and sorted(order[4:]) == [4, 5, 6, 7]


def test_eos_stops_early_and_counts_only_answer_tokens():
    targets = ids("ab") + [EOS] + [PAD] * 5
    # EOS and the answer are most confident; once they are committed the answer cannot change.
    result = run(targets, [0.9, 0.8, 0.99, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert result.nfe.tolist() == [3]
    assert result.tokens[0].tolist() == ids("ab") + [EOS] * 6
    assert result.order[0].tolist() == [1, 2, 0, -1, -1, -1, -1, -1]
    assert result.generated.tolist() == [2]
    assert result.tpf.tolist() == [pytest.approx(2 / 3)]


def test_finished_rows_rule():
    response = torch.tensor([[10, EOS, MASK], [MASK, EOS, 10], [10, 11, 12]])
    masked = response == MASK
    assert finished_rows(response, masked, EOS).tolist() == [True, False, True]


def test_rejects_settings_that_do_not_fit_the_canvas():
    with pytest.raises(ValueError, match="block_length"):
        run(ids("abcde"), [0.5] * 5, block_length=2)
    with pytest.raises(ValueError, match="steps"):
        run(ids("abcd"), [0.5] * 4, steps=3, block_length=2)
    with pytest.raises(ValueError, match="pins"):
        run(ids("abcd"), [0.5] * 4, pins={3: "##"})
    with pytest.raises(ValueError, match="overlaps"):
        run(ids("abcd"), [0.5] * 4, pins={0: "##", 1: "#"})


def test_tiny_model_one_token_per_forward_and_batch_consistency():
    teacher = sharp_teacher(causal=False)
    prompts = [teacher.encode_prompt("12+34=").ids, teacher.encode_prompt("7+8=").ids]
    result = decode(teacher, prompts, DecoderConfig(), gen_length=8)
    for row in range(2):
        committed = [step for step in result.order[row].tolist() if step >= 0]
        # Exactly one position per forward: the committed steps are 0..nfe-1, each once.
        assert sorted(committed) == list(range(int(result.nfe[row])))
    # Decoding a prompt alone gives the same tokens as decoding it inside a left-padded batch.
    alone = decode(teacher, prompts[1:], DecoderConfig(), gen_length=8)
    assert torch.equal(alone.tokens[0], result.tokens[1])


def test_block_length_one_on_a_causal_model_decodes_left_to_right():
    teacher = sharp_teacher(causal=True)
    prompt = teacher.encode_prompt("7+8=").ids
    result = decode(teacher, [prompt], DecoderConfig(steps=8, block_length=1), gen_length=8)
    committed = [step for step in result.order[0].tolist() if step >= 0]
    assert committed == list(range(len(committed)))
    # Each token is the greedy next token given everything before it.
    ids_so_far = torch.tensor([prompt])
    for token in result.tokens[0].tolist()[: len(committed)]:
        next_logits = teacher.forward(torch.cat([ids_so_far, torch.tensor([[MASK]])], dim=1))[0, -1]
        next_logits[MASK] = -torch.inf
        assert int(next_logits.argmax()) == token
        ids_so_far = torch.cat([ids_so_far, torch.tensor([[token]])], dim=1)


# ----------------------------------------------------------------------------------------------------------------
# Token choice: sampling filters and confidence kinds


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([0.5, 0.3, 0.2]).log()
    assert torch.isinf(filter_logits(logits, 2, 1.0)).tolist() == [False, False, True]
    # Nucleus: keep a token while the tokens ranked above it hold less than p.
    assert torch.isinf(filter_logits(logits, None, 0.7)).tolist() == [False, False, True]
    assert torch.isinf(filter_logits(logits, None, 0.5)).tolist() == [False, True, True]
    assert torch.isinf(filter_logits(logits, None, 0.51)).tolist() == [False, False, True]


def test_confidence_kinds_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    tokens = torch.tensor([0])
    assert confidence_of(probs, tokens, "probability").item() == pytest.approx(0.5)
    assert confidence_of(probs, tokens, "margin").item() == pytest.approx(0.2)
    by_hand = 0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)
    assert confidence_of(probs, tokens, "neg_entropy").item() == pytest.approx(by_hand)
    assert entropy(torch.tensor([1.0, 0.0])).item() == 0.0


def test_sampling_with_top_k_one_is_greedy():
    logits = torch.randn(2, 5, VOCAB, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(0)
    sampled, _ = sample_tokens(logits, DecoderConfig(temperature=1.0, top_k=1), generator)
    greedy, probs = sample_tokens(logits, DecoderConfig(), None)
    assert torch.equal(sampled, greedy) and torch.equal(greedy, logits.argmax(-1))
    assert torch.allclose(probs.sum(-1), torch.ones(2, 5))


# ----------------------------------------------------------------------------------------------------------------
# confident (Dimple) and threshold (Fast-dLLM)


def test_confident_commits_everything_above_gamma_and_falls_back_to_the_schedule():
    targets = ids("abcd")
    result = run(targets, [0.95, 0.5, 0.92, 0.3], name="confident", threshold=0.9, cache="none")
    # Step 0: both tokens above 0.9. Step 1: none above, so the schedule's ceil(2 left / 3 steps left) = 1 token.
    assert result.order[0].tolist() == [0, 1, 0, 2]
    assert result.nfe.tolist() == [3] and result.tokens[0].tolist() == targets


def test_confident_margin_and_entropy_confidence():
    targets = ids("abcd")
    confidence = [0.95, 0.5, 0.92, 0.3]
    # Margin = p - (1 - p) / 127, so 0.9 still separates 0.95 and 0.92 from the rest.
    margin = run(targets, confidence, name="confident", threshold=0.9, confidence="margin", cache="none")
    assert margin.order[0].tolist() == [0, 1, 0, 2]
    # Negative entropy of p = 0.95 is about -0.44 and of 0.92 about -0.67; a bound of -0.5 keeps only the first.
    neg = run(targets, confidence, name="confident", threshold=-0.5, confidence="neg_entropy", cache="none")
    assert neg.order[0].tolist()[0] == 0 and neg.order[0].tolist()[2] > 0


def test_confident_with_gamma_one_is_one_token_per_forward():
    confidence = [0.5, 0.9, 0.6, 0.8, 0.7, 0.9999]
    result = run(ids("abcdef"), confidence, name="confident", threshold=1.0, cache="none")
    assert result.nfe.tolist() == [6] and sorted(result.order[0].tolist()) == list(range(6))
    assert torch.equal(result.order, run(ids("abcdef"), confidence).order)


def test_confident_never_exceeds_its_steps():
    # Nothing ever clears gamma: the schedule of 2 steps decides, and the last step commits what is left.
    result = run(ids("abcd"), [0.3, 0.4, 0.5, 0.6], name="confident", steps=2, cache="none")
    assert result.nfe.tolist() == [2] and result.order[0].tolist() == [1, 1, 0, 0]


def test_confident_gamma_one_matches_low_confidence_on_the_tiny_model():
    teacher = sharp_teacher(causal=False)
    prompts = [teacher.encode_prompt(text).ids for text in TINY_PROMPTS]
    for block_length in (None, 4):
        confident = decode(
            teacher, prompts, DecoderConfig(name="confident", threshold=1.0, block_length=block_length, cache="none"), 8
        )
        baseline = decode(teacher, prompts, DecoderConfig(block_length=block_length), 8)
        assert torch.equal(confident.tokens, baseline.tokens) and torch.equal(confident.order, baseline.order)
        for row in range(len(prompts)):
            assert sorted(s for s in confident.order[row].tolist() if s >= 0) == list(range(int(confident.nfe[row])))


def test_threshold_commits_above_threshold_plus_the_best_within_the_block():
    targets = ids("abcd")
    one_block = run(targets, [0.95, 0.5, 0.92, 0.3], name="threshold", threshold=0.9, cache="none")
    assert one_block.order[0].tolist() == [0, 1, 0, 2]
    # With blocks of 2, the 0.92 of block 1 waits for block 0 although it clears the threshold.
    blocks = run(targets, [0.95, 0.5, 0.92, 0.3], name="threshold", threshold=0.9, block_length=2, cache="none")
    assert blocks.order[0].tolist() == [0, 1, 2, 3]


# ----------------------------------------------------------------------------------------------------------------
# multi_block (d3LLM)


def test_multi_block_never_commits_past_an_inactive_block():
    # Every token is certain, so only block activation limits what a forward commits.
    result = run(ids("abcdefghijkl"), [0.999] * 12, name="multi_block", block_length=4, cache="none")
    assert result.order[0].tolist() == [0] * 4 + [1] * 4 + [2] * 4


@pytest.mark.parametrize("threshold", [2.0, 4.7, 50.0])
def test_multi_block_on_the_tiny_model_commits_only_in_active_blocks(threshold):
    teacher = sharp_teacher(causal=False)
    prompts = [teacher.encode_prompt(text).ids for text in TINY_PROMPTS]
    config = DecoderConfig(name="multi_block", threshold=threshold, block_length=4, cache="none", eos_fill=False)
    result = decode(teacher, prompts, config, 16)
    for row in range(len(prompts)):
        order = result.order[row].view(4, 4)
        for block in range(1, 4):
            for step in order[block][order[block] >= 0].tolist():
                # When the block committed at `step`, its predecessor was >= 10% decoded by earlier forwards.
                decoded_before = ((order[block - 1] >= 0) & (order[block - 1] < step)).float().mean()
                assert decoded_before >= 0.1
    if threshold == 50.0:  # every token passes: exactly one block per forward
        assert result.order[0].tolist()[:8] == [0] * 4 + [1] * 4


def test_multi_block_activation_and_forced_lowest_entropy_token():
    targets = ids("abcdefgh")
    # Entropy threshold 0.5 nats: p = 0.99 (entropy ~0.1) passes, p <= 0.4 (entropy > 3) does not.
    confidence = [0.99, 0.3, 0.4, 0.35, 0.99, 0.99, 0.99, 0.99]
    result = run(targets, confidence, name="multi_block", block_length=4, cache="none")
    # Step 0: block 1 inactive (block 0 is 0% decoded). Step 1: block 0 is 25% decoded, so block 1 opens and all of
    # it passes; block 0's lowest-entropy mask (p = 0.4) is forced. Then one forced token per step.
    assert result.order[0].tolist() == [0, 3, 1, 2, 1, 1, 1, 1]
    late = run(targets, confidence, name="multi_block", block_length=4, activate_fraction=0.5, cache="none")
    assert late.order[0].tolist() == [0, 3, 1, 2, 2, 2, 2, 2]
    # With full activation at 25%, block 1 is fully active at step 1 and supplies the forced (lowest-entropy) token.
    full = run(targets, confidence, name="multi_block", block_length=4, full_activate_fraction=0.25, cache="none")
    assert full.order[0].tolist() == [0, 4, 2, 3, 1, 1, 1, 1]


def test_multi_block_fills_after_eos_and_stops():
    targets = ids("ab") + [EOS] + ids("cdefg")
    # After the EOS the tokens are more certain than before it but still above the entropy threshold.
    confidence = [0.3, 0.35, 0.999, 0.5, 0.5, 0.5, 0.5, 0.5]
    filled = run(targets, confidence, name="multi_block", cache="none")
    assert filled.order[0].tolist() == [2, 1, 0, -1, -1, -1, -1, -1]
    assert filled.nfe.tolist() == [3] and filled.generated.tolist() == [2]
    assert filled.tokens[0].tolist() == ids("ab") + [EOS] * 6
    # Without the fill, forwards are spent on positions after the answer.
    unfilled = run(targets, confidence, name="multi_block", cache="none", eos_fill=False)
    assert unfilled.nfe.tolist() == [8] and unfilled.generated.tolist() == [2]


# ----------------------------------------------------------------------------------------------------------------
# Structure priors


def test_pins_and_fixed_length_are_committed_before_decoding():
    targets = ids("abcdefgh")
    result = run(targets, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2], pins={2: "##"}, fixed_length=6)
    assert result.tokens[0].tolist() == ids("ab##ef") + [EOS, EOS]
    assert result.order[0].tolist() == [0, 1, -1, -1, 2, 3, -1, -1]
    # Four free positions, one per forward; pinned tokens do not count as generated.
    assert result.nfe.tolist() == [4] and result.generated.tolist() == [4]
    from_end = run(targets, [0.5] * 8, pins={-2: "#"}, fixed_length=6)
    assert from_end.tokens[0].tolist()[4] == ids("#")[0]


def test_fully_pinned_response_takes_no_forward():
    result = run(ids("ab"), [0.5, 0.5], pins={0: "x"}, fixed_length=1)
    assert result.nfe.tolist() == [0] and result.tokens[0].tolist() == ids("x") + [EOS]


# ----------------------------------------------------------------------------------------------------------------
# KV cache: plumbing on the scripted model, exactness on a causal tiny model, approximation on a bidirectional one


def test_prompt_cache_encodes_the_prompt_once():
    teacher = scripted_teacher(ids("abcd"), [0.9, 0.8, 0.7, 0.6])
    uncached = decode(teacher, [ids("qq")], DecoderConfig(cache="none"), 4)
    teacher.model.calls.clear()
    cached = decode(teacher, [ids("qq")], DecoderConfig(cache="prompt"), 4)
    assert torch.equal(cached.tokens, uncached.tokens) and torch.equal(cached.order, uncached.order)
    # The first step decodes from a full forward (prompt 2 + response 4) and builds the cache; then only the response.
    assert teacher.model.calls == [("prefill", 2), ("forward", 6)] + [("forward", 4)] * 3
    assert cached.nfe.tolist() == [4]


@pytest.mark.parametrize("delay,rebuild_steps", [(0, [0, 2, 4, 6]), (1, [0, 3, 5, 7])])
def test_block_cache_grows_after_the_delay(delay, rebuild_steps):
    teacher = scripted_teacher(ids("abcdefgh"), [0.9 - 0.05 * j for j in range(8)])
    config = DecoderConfig(block_length=2, cache="blocks", cache_delay=delay)
    result = decode(teacher, [ids("qq")], config, 8)
    assert result.tokens[0].tolist() == ids("abcdefgh") and result.nfe.tolist() == [8]
    step, prefills = 0, []
    for kind, length in teacher.model.calls:
        if kind == "prefill":
            prefills.append((step, length))
        else:
            step += 1
    cached = [2 + 2 * index for index in range(4)]  # prompt, then prompt + 1, 2, 3 finished blocks
    assert prefills == list(zip(rebuild_steps, cached, strict=True))
    # A step that rebuilds the cache is a full forward (prompt 2 + response 8); the others encode what is not cached.
    forwards = [length for kind, length in teacher.model.calls if kind == "forward"]
    expected = [10 if i in rebuild_steps else 8 - (max(c for s, c in prefills if s <= i) - 2) for i in range(8)]
    assert forwards == expected


def test_refresh_every_runs_full_forwards_periodically():
    teacher = scripted_teacher(ids("abcdef"), [0.9 - 0.1 * j for j in range(6)])
    decode(teacher, [ids("qq")], DecoderConfig(cache="prompt", refresh_every=3), 6)
    forwards = [length for kind, length in teacher.model.calls if kind == "forward"]
    # The first forward builds the cache; every third one refreshes: both encode prompt (2) + response (6).
    assert forwards == [8, 6, 8, 6, 6, 8]


def test_cache_follows_rows_as_samples_finish():
    # Prompt "x" finishes after one step (its EOS is certain); "y" keeps decoding on a cache sliced to its row.
    script = {
        ids("x")[0]: ([EOS] + ids("zzz"), [0.99, 0.5, 0.5, 0.5]),
        ids("y")[0]: (ids("abcd"), [0.9, 0.8, 0.7, 0.6]),
    }
    prompts = [ids("x"), ids("yy")]
    uncached = decode(script_teacher(script), prompts, DecoderConfig(cache="none"), 4)
    teacher = script_teacher(script)
    cached = decode(teacher, prompts, DecoderConfig(cache="prompt"), 4)
    assert uncached.tokens[1].tolist() == ids("abcd") and uncached.nfe.tolist() == [1, 4]
    assert torch.equal(cached.tokens, uncached.tokens) and torch.equal(cached.nfe, uncached.nfe)
    assert [kind for kind, _ in teacher.model.calls].count("prefill") == 1  # sliced, not rebuilt


def test_prefix_cache_selects_rows_of_a_transformers_cache():
    kv = DynamicCache()
    kv.update(torch.arange(3.0)[:, None, None, None].expand(3, 1, 2, 1), torch.zeros(3, 1, 2, 1), 0)
    rest = dict(attention_mask=torch.ones(3, 2), carry_ids=torch.zeros(3, 1), carry_mask=torch.ones(3, 1))
    sliced = PrefixCache(kv=kv, **rest).select_rows(torch.tensor([1, 2]))
    assert sliced.kv.layers[0].keys[:, 0, 0, 0].tolist() == [1.0, 2.0] and sliced.attention_mask.shape == (2, 2)


DECODER_SETTINGS = [
    dict(name="low_confidence", steps=8, block_length=4),
    dict(name="confident", threshold=0.3, block_length=4),
    dict(name="threshold", threshold=0.3, block_length=4),
    dict(name="multi_block", threshold=2.0, block_length=4),
]


@pytest.mark.parametrize("settings", DECODER_SETTINGS, ids=[s["name"] for s in DECODER_SETTINGS])
def test_cached_and_uncached_give_the_same_tokens_on_a_causal_model(settings):
    teacher = sharp_teacher(causal=True)
    prompts = [teacher.encode_prompt(text).ids for text in TINY_PROMPTS]
    uncached = decode(teacher, prompts, DecoderConfig(**settings, cache="none"), 16)
    for cache, delay in [("prompt", 1), ("blocks", 0), ("blocks", 2)]:
        cached = decode(teacher, prompts, DecoderConfig(**settings, cache=cache, cache_delay=delay), 16)
        assert torch.equal(cached.tokens, uncached.tokens), (cache, delay)
        assert torch.equal(cached.order, uncached.order) and torch.equal(cached.nfe, uncached.nfe)


@pytest.mark.parametrize("settings", DECODER_SETTINGS, ids=[s["name"] for s in DECODER_SETTINGS])
def test_cache_on_a_bidirectional_model_is_an_approximation_that_runs(settings):
    teacher = sharp_teacher(causal=False)
    prompts = [teacher.encode_prompt(text).ids for text in TINY_PROMPTS]
    uncached = decode(teacher, prompts, DecoderConfig(**settings, cache="none"), 16)
    for cache in ("prompt", "blocks"):
        cached = decode(teacher, prompts, DecoderConfig(**settings, cache=cache), 16)
        assert (cached.tokens != MASK).all() and (cached.nfe >= 1).all() and (cached.nfe <= 16).all()
        for row in range(len(prompts)):
            steps = {step for step in cached.order[row].tolist() if step >= 0}
            assert steps == set(range(int(cached.nfe[row])))  # every forward committed something
        # Refreshing at every forward never uses the cache: exact again.
        always_fresh = decode(teacher, prompts, DecoderConfig(**settings, cache=cache, refresh_every=1), 16)
        assert torch.equal(always_fresh.tokens, uncached.tokens)


def test_cached_prefix_logits_are_close_on_a_bidirectional_model():
    # The approximation, measured: the first step's response logits with the prompt cached vs encoded jointly.
    teacher = sharp_teacher(causal=False)
    prompt = torch.tensor([teacher.encode_prompt("12+34=").ids])
    response = torch.full((1, 8), MASK)
    full = teacher.forward(torch.cat([prompt, response], dim=1))[:, prompt.shape[1] :]
    cached = teacher.forward(response, cache=teacher.prefill(prompt))
    assert cached.shape == full.shape
    assert not torch.allclose(cached, full, atol=1e-5)  # it is an approximation...
    agree = (cached.argmax(-1) == full.argmax(-1)).float().mean()
    assert agree >= 0.5  # ...that keeps most greedy choices on this model
