"""Sweeping a decoder's knob: the `auto` ladder starts at one token per forward and stops after the first value past
AUP's cut-off; a pinned list is evaluated whole; `sweep_status` marks the curves that are cut short. Accuracy is
scripted (`evaluate_records` is replaced), so each test decides where a curve breaks."""

import pytest

from distill.recipe import DECODER_KNOBS, EvalDecoderConfig
from eval import evaluate
from eval.evaluate import EvalResult, sweep_decoder, sweep_status


@pytest.fixture
def script(monkeypatch):
    """`script(accuracy_at)` makes every evaluation score `accuracy_at(knob)` at TPF 1, 2, 3, ... in call order."""

    def install(accuracy_at):
        def fake(teacher, records, setting, gen_length, batch_size, *, task, row, seed=0):
            knob = getattr(setting, DECODER_KNOBS[setting.name])
            install.calls += 1
            return EvalResult(task, row, {}, 10, accuracy_at(knob), 1.0, float(install.calls), 1.0, 0.0, batch_size)

        install.calls = 0
        monkeypatch.setattr(evaluate, "evaluate_records", fake)

    return install


def curve(decoder: EvalDecoderConfig, gen_length: int = 24) -> list[tuple]:
    """The swept `(knob, tpf, accuracy)` points."""
    results = sweep_decoder(None, [{}], decoder, gen_length, 4, task="t", row="r")
    return [(knob, result.tpf, result.accuracy) for knob, result in results]


def test_steps_ladder_starts_at_one_token_per_forward_and_stops_after_the_cutoff(script):
    # 100% down to 6 steps, 96% at 4 (within 5 points of the first: go on), 90% at 3 (past the cut-off: stop).
    script(lambda steps: 100.0 if steps >= 6 else (96.0 if steps == 4 else 90.0))
    decoder = EvalDecoderConfig(name="low_confidence")
    points = curve(decoder)
    assert [knob for knob, _, _ in points] == [24, 12, 8, 6, 4, 3]  # 2 and 1 never decoded
    assert sweep_status(decoder, 24, points) == {
        "sweep": "auto",
        "one_token_knob": 24,
        "cut_short": False,
        "cut_short_reason": None,
    }


def test_gamma_ladder_runs_from_one_down(script):
    script(lambda gamma: 80.0 if gamma >= 0.5 else 74.0)
    decoder = EvalDecoderConfig(name="confident")
    points = curve(decoder)
    assert [knob for knob, _, _ in points] == [1.0, 0.99, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]
    assert not sweep_status(decoder, 24, points)["cut_short"]


def test_a_curve_that_never_breaks_runs_the_whole_ladder_and_is_complete(script):
    script(lambda bound: 100.0)
    decoder = EvalDecoderConfig(name="multi_block", block_length=8)
    points = curve(decoder)
    assert [knob for knob, _, _ in points] == decoder.ladder(24)
    assert points[0][0] == 0.0 and points[-1][0] == 12.0  # one token per forward ... every token of the blocks
    assert sweep_status(decoder, 24, points)["cut_short"] is False


def test_ladders_per_decoder_and_canvas():
    # Steps per block = ceil(8 / k) for k = 1, 2, 3, 4, 6, 8: 8, 4, 3, 2, 2, 1, times 4 blocks.
    assert EvalDecoderConfig(name="low_confidence", block_length=8).ladder(32) == [32, 16, 12, 8, 4]
    # Left to right (1-token blocks, as the AR baseline): one value, one token per forward.
    assert EvalDecoderConfig(name="low_confidence", block_length=1).ladder(24) == [24]
    negative = EvalDecoderConfig(name="threshold", confidence="neg_entropy", threshold=-0.5)
    assert negative.ladder(24)[:3] == [0.0, -0.01, -0.03] and negative.one_token_knob(24) == 0.0
    assert EvalDecoderConfig(name="confident", confidence="margin").one_token_knob(24) == 1.0
    # `confident` with its fallback schedule fixed never decodes one token per forward.
    assert EvalDecoderConfig(name="confident", steps=8).one_token_knob(24) is None
    # Without a canvas (`distill bench decode` takes the first point) the steps ladder is its first point only.
    ((knob, setting),) = EvalDecoderConfig(name="low_confidence").settings()
    assert knob is None and setting.steps is None


def test_a_pinned_list_is_evaluated_whole_and_marked_when_cut_short(script):
    script(lambda gamma: 90.0 if gamma >= 0.9 else 10.0)
    starts_fast = EvalDecoderConfig(name="threshold", sweep=[0.5, 0.9])
    points = curve(starts_fast)
    assert [knob for knob, _, _ in points] == [0.5, 0.9]  # in the order given, past the fall
    status = sweep_status(starts_fast, 24, points)
    assert status["sweep"] == "pinned" and status["cut_short"]
    assert status["cut_short_reason"] == "does not start at one token per forward (threshold=1.0)"

    script(lambda gamma: 90.0)
    stops_early = EvalDecoderConfig(name="threshold", sweep=[1.0, 0.9, 0.95])
    status = sweep_status(stops_early, 24, curve(stops_early))
    assert status["cut_short"] and "had not fallen more than 5 points" in status["cut_short_reason"]
    assert status["cut_short_reason"].endswith("(threshold=0.9)")  # the fastest value it tried

    # Complete: it reaches the fastest value (γ 0), or its accuracy falls past the cut-off.
    for sweep, accuracy_at in (([1.0, 0.5, 0.0], lambda gamma: 90.0), ([1.0, 0.5], lambda gamma: 90.0 * gamma)):
        script(accuracy_at)
        decoder = EvalDecoderConfig(name="threshold", sweep=sweep)
        assert sweep_status(decoder, 24, curve(decoder))["cut_short"] is False

    # `[]`: one point at the settings given (steps null is one token per forward, reported as 24 steps).
    script(lambda steps: 90.0)
    single = EvalDecoderConfig(name="low_confidence", sweep=[])
    points = curve(single)
    assert [knob for knob, _, _ in points] == [24]
    assert sweep_status(single, 24, points)["cut_short_reason"].endswith("(steps=24)")
    fixed = EvalDecoderConfig(name="confident", steps=8, sweep=[1.0, 0.0])
    assert "steps is set" in sweep_status(fixed, 24, curve(fixed))["cut_short_reason"]
