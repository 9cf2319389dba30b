"""AUP: every expected value below is worked out by hand from the formula in DESIGN.md."""

import math

import pytest

from eval.aup import aup_score, fell_past_cutoff, kept_points, pareto_front, weight


def test_autoregressive_row_scores_its_accuracy():
    # Published: LLaDA GSM8K-CoT 72.55% at TPF 1, on a task whose y_max is 74.68.
    assert aup_score([(1.0, 72.55)], y_max=74.68) == pytest.approx(72.55)
    assert aup_score([(1.0, 40.0)], y_max=90.0) == pytest.approx(40.0)


def test_row_at_y_max_everywhere_scores_the_plain_trapezoid_area():
    points = [(1.0, 80.0), (2.0, 80.0), (4.0, 80.0)]
    # rho_1*y_1 + 1/2*(2-1)*(80+80) + 1/2*(4-2)*(80+80) = 80 + 80 + 160.
    assert aup_score(points, y_max=80.0) == pytest.approx(320.0)
    # The first term is unweighted; in the trapezoid 60 = y_max keeps W = 1 and 50 gets exp(-3*(1-50/60)).
    expected = 50 + 0.5 * 3 * (60 + 50 * math.exp(-0.5))
    assert aup_score([(1.0, 50.0), (4.0, 60.0)], y_max=60.0) == pytest.approx(expected)


def test_accuracy_below_y_max_is_discounted_by_w():
    # W(47) with y_max 50 = exp(-3 * 0.06) = exp(-0.18); W(50) = 1.
    expected = 1 * 50 + 0.5 * (3 - 1) * (47 * math.exp(-0.18) + 50 * 1)
    assert aup_score([(3.0, 47.0), (1.0, 50.0)], y_max=50.0) == pytest.approx(expected)
    assert weight(50.0, 50.0) == 1.0 and weight(0.0, 50.0) == pytest.approx(math.exp(-3))
    assert weight(60.0, 50.0) == 1.0  # capped
    assert aup_score([(1.0, 40.0), (2.0, 40.0)], y_max=50.0, alpha=0.0) == pytest.approx(80.0)


def test_point_more_than_five_below_y1_is_ignored():
    with_drop = [(1.0, 80.0), (2.0, 74.9), (3.0, 80.0)]
    without = [(1.0, 80.0), (3.0, 80.0)]
    assert kept_points(with_drop) == without
    assert aup_score(with_drop, y_max=80.0) == pytest.approx(aup_score(without, y_max=80.0)) == pytest.approx(240.0)
    # Exactly 5 below is kept: 80 + 1/2*(2-1)*(75*W(75) + 80).
    expected = 80 + 0.5 * (75 * math.exp(-3 * (1 - 75 / 80)) + 80)
    assert aup_score([(1.0, 80.0), (2.0, 75.0)], y_max=80.0) == pytest.approx(expected)


def test_y1_is_the_accuracy_at_the_lowest_tpf_whatever_the_input_order():
    points = [(4.0, 70.0), (1.0, 72.0), (2.0, 66.0)]  # 66 < 72 - 5: dropped
    expected = 72 + 0.5 * 3 * (70 * weight(70, 72) + 72)
    assert aup_score(points, y_max=72.0) == pytest.approx(expected)


def test_published_scores_respect_the_rectangle_bound():
    # The published curves are not in DESIGN.md, only their fastest points, so they cannot be recomputed; what can
    # be derived by hand: W <= 1 bounds any curve ending at TPF rho_max by rho_max * y_max, the score of a flat
    # curve at y_max (y_max 74.68 on LLaDA GSM8K-CoT). Fast-dLLM's point *is* at y_max, so it sits at the bound.
    y_max = 74.68
    for rho_max, published in [(9.11, 637.7), (5.14, 358.1), (2.77, 205.8)]:
        bound = aup_score([(1.0, y_max), (rho_max, y_max)], y_max=y_max)
        assert bound == pytest.approx(rho_max * y_max)
        assert published <= bound
    assert 205.8 == pytest.approx(2.77 * y_max, rel=0.01)


@pytest.mark.parametrize(
    "points,y_max,message",
    [
        ([], 80.0, "no points"),
        ([(1.0, 0.72), (2.0, 0.70)], 0.72, "look like fractions"),
        ([(1.0, float("nan"))], 80.0, "finite"),
        ([(float("nan"), 50.0)], 80.0, "finite"),
        ([(1.0, 50.0)], float("nan"), "finite"),
        ([(0.0, 50.0)], 80.0, "TPF"),
        ([(1.0, 120.0)], 120.0, "percentages"),
        ([(1.0, 80.0)], 70.0, "below this row's best"),
    ],
)
def test_rejects_bad_input(points, y_max, message):
    with pytest.raises(ValueError, match=message):
        aup_score(points, y_max)


def test_all_zero_accuracy_scores_zero():
    assert aup_score([(1.0, 0.0), (3.0, 0.0)], y_max=0.0) == 0.0
    assert aup_score([(1.0, 0.0), (3.0, 0.0)], y_max=50.0) == 0.0


def test_fell_past_cutoff_is_the_points_aup_drops():
    assert not fell_past_cutoff([(1.0, 80.0), (2.0, 75.0)])  # exactly 5 below: kept
    assert fell_past_cutoff([(1.0, 80.0), (2.0, 74.9)])
    assert fell_past_cutoff([(3.0, 70.0), (1.0, 80.0)])  # y_1 is the lowest-TPF accuracy, whatever the order
    assert not fell_past_cutoff([(1.0, 0.0), (8.0, 0.0)])


def test_pareto_front_keeps_the_points_nothing_beats_on_both_axes():
    points = [(1, 80, "a"), (2, 80, "b"), (2, 79, "c"), (3, 70, "d"), (1.5, 85, "e"), (3, 70, "f")]
    # a: beaten by e (faster, more accurate); c: by b (as fast, more accurate); f: identical to d, which comes first.
    assert pareto_front(points) == [(1.5, 85, "e"), (2, 80, "b"), (3, 70, "d")]
    assert pareto_front([(2.0, 50.0)]) == [(2.0, 50.0)]
