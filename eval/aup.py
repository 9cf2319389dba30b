"""AUP, accuracy under parallelism (d3LLM): one number for a decoder's whole accuracy-vs-tokens-per-forward curve.

For points (ρ_i = TPF, y_i = accuracy in percent) sorted by ρ, with y_1 the accuracy at the smallest ρ and
every point with y_i < y_1 - 5 dropped (a decoder gets no credit for speed bought with a collapse in accuracy):

    AUP = ρ_1·y_1 + ½ Σ_{i>=2} (ρ_i - ρ_{i-1})·(y_i·W(y_i) + y_{i-1}·W(y_{i-1})),
    W(y) = min(exp(-α (1 - y / y_max)), 1),

a trapezoid area under the curve whose heights are discounted by how far they fall below y_max, the best accuracy
on the task among all compared rows (a report must say which row set it). An AR model (ρ = 1, one point) scores
exactly its accuracy.

A model is scored on its frontier (DESIGN.md, "Comparing models with AUP honestly"): every decoder's curve starts
at one token per forward and runs until accuracy falls past the cut-off (`fell_past_cutoff`); the model's score is
its best decoder's AUP, and `pareto_front` gives the points no decoder of it beats, which AUP scores alike.
"""

from __future__ import annotations

import math

# Points more than this many accuracy points below the lowest-TPF accuracy are ignored.
ACCURACY_DROP_LIMIT = 5.0
# A student point "matches" its teacher when it is at most this many points below the teacher's best accuracy:
# the accuracy the report's equal-accuracy speed-up is measured at (fewstep's claim: at most one point lost).
MATCHED_ACCURACY_MARGIN = 1.0


def weight(accuracy: float, y_max: float, alpha: float = 3.0) -> float:
    """W(y) = min(exp(-α (1 - y / y_max)), 1): 1 at y_max, e^-α at 0."""
    return min(math.exp(-alpha * (1.0 - accuracy / y_max)), 1.0)


def kept_points(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points AUP integrates: sorted by TPF (ties by accuracy), without those below y_1 - 5."""
    ordered = sorted((float(tpf), float(accuracy)) for tpf, accuracy in points)
    floor = ordered[0][1] - ACCURACY_DROP_LIMIT
    return [point for point in ordered if point[1] >= floor]


def fell_past_cutoff(points: list[tuple[float, float]]) -> bool:
    """Whether some point lies below AUP's cut-off (y_1 - 5): where a knob sweep has gone far enough to stop."""
    return len(kept_points(points)) < len(points)


def pareto_front(points: list[tuple]) -> list[tuple]:
    """The points (tuples starting `tpf, accuracy`, anything after carried along) that no other point matches or
    beats on both TPF and accuracy while beating it on one, sorted by TPF. Of identical points the first is kept."""
    # Fastest first (ties: most accurate first); a point stays when it is more accurate than every faster one.
    ordered = sorted(enumerate(points), key=lambda item: (-item[1][0], -item[1][1], item[0]))
    front, best = [], -math.inf
    for _, point in ordered:
        if point[1] > best:
            front.append(point)
            best = point[1]
    return front[::-1]


def aup_score(points: list[tuple[float, float]], y_max: float, alpha: float = 3.0) -> float:
    """AUP of one row's `(tpf, accuracy_percent)` points against the task's best accuracy `y_max` (percent).

    Raises ValueError on empty input, NaN/inf, TPF <= 0, accuracies outside [0, 100], accuracies that look like
    fractions (all <= 1 and not all 0: pass percent), and `y_max` below the row's own best accuracy.
    """
    if not points:
        raise ValueError("aup: no points")
    values = [float(value) for point in points for value in point]
    if any(not math.isfinite(value) for value in values + [float(y_max), float(alpha)]):
        raise ValueError(f"aup: points, y_max and alpha must be finite numbers, got {points!r}, {y_max!r}, {alpha!r}")
    if any(tpf <= 0 for tpf, _ in points):
        raise ValueError("aup: TPF must be > 0")
    accuracies = [float(accuracy) for _, accuracy in points]
    if any(not 0 <= accuracy <= 100 for accuracy in accuracies):
        raise ValueError(f"aup: accuracies must be percentages in [0, 100], got {accuracies}")
    if max(accuracies) <= 1 and max(accuracies) > 0:
        raise ValueError(f"aup: accuracies {accuracies} look like fractions; pass percentages (0-100)")
    if y_max < max(accuracies):
        raise ValueError(f"aup: y_max {y_max} is below this row's best accuracy {max(accuracies)}")
    if y_max == 0:
        return 0.0  # every accuracy is 0: nothing to weigh
    kept = kept_points(points)
    heights = [accuracy * weight(accuracy, y_max, alpha) for _, accuracy in kept]
    # The first term is unweighted, as in the definition: at ρ_1 the row is compared with nothing faster.
    area = kept[0][0] * kept[0][1]
    for index in range(1, len(kept)):
        area += 0.5 * (kept[index][0] - kept[index - 1][0]) * (heights[index] + heights[index - 1])
    return area
