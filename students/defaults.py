"""The decoding defaults a distilled student is exported with (`generation_config.json`, `diffusion_generate`).

The student's best point in the run's AUP report when it has one, else the recipe's first eval decoder, with its
KV-cache mode: the exported `diffusion_generate` runs fewstep's own decoding module, cache included.
"""

from __future__ import annotations

from typing import Any

from distill.decoding import decode_settings
from distill.recipe import DecoderConfig, Recipe, knob_speed
from teachers.interface import Teacher


def recommended_decoder(recipe: Recipe, report: dict | None) -> tuple[DecoderConfig, str]:
    """The decoder the export recommends (`gen_length` set) and where it came from.

    With a report holding `student` rows: the decoder with the best mean AUP over tasks, at its fastest knob value
    (highest mean TPF) whose mean accuracy is within 1 point of that decoder's best (ties: the more conservative
    value). Without one: the recipe's first eval decoder at its own settings.
    """
    rows: dict[str, list[dict]] = {}
    for entry in (report or {}).get("tasks", []):
        for row in entry["rows"]:
            if row["name"] == "student" and row.get("aup") is not None:
                rows.setdefault(row["decoder"], []).append(row)
    if not rows:
        base = recipe.eval.decoder
        settings = base.model_dump(exclude={"label", "sweep"})
        source = f"the recipe's eval decoder `{base.report_name}` (no student rows in the run's report)"
    else:
        label = max(rows, key=lambda name: sum(row["aup"] for row in rows[name]) / len(rows[name]))
        chosen = rows[label]
        by_knob: dict[Any, list[dict]] = {}
        for row in chosen:
            for point in row["points"]:
                by_knob.setdefault(point["knob"], []).append(point)
        mean = {
            knob: (sum(p["accuracy"] for p in points) / len(points), sum(p["tpf"] for p in points) / len(points))
            for knob, points in by_knob.items()
        }
        best_accuracy = max(accuracy for accuracy, _ in mean.values())
        near_best = [knob for knob, (accuracy, _) in mean.items() if accuracy >= best_accuracy - 1.0]
        # Among equally fast points prefer the one that commits less per forward (sorted slowest first).
        decoder_name = chosen[0]["decoder_name"]
        slowest_first = sorted(near_best, key=lambda value: knob_speed(decoder_name, value))
        knob = max(slowest_first, key=lambda value: mean[value][1])
        settings = dict(chosen[0]["settings"]) | {chosen[0]["knob_name"]: knob}
        accuracy, tpf = mean[knob]
        mean_aup = sum(row["aup"] for row in chosen) / len(chosen)
        source = (
            f"the run's report: student · {label} at {chosen[0]['knob_name']}={knob} (accuracy {accuracy:.2f}%, "
            f"TPF {tpf:.2f}, AUP {mean_aup:.1f}, mean over {len(chosen)} task(s))"
        )
    settings |= {"gen_length": settings.get("gen_length") or recipe.data.max_response_tokens}
    return DecoderConfig.model_validate(settings), source


def generation_settings(decoder: DecoderConfig, teacher: Teacher) -> dict[str, Any]:
    """The `diffusion` entry of generation_config.json: what the exported `diffusion_generate` reads."""
    return decode_settings(teacher, decoder, decoder.gen_length).to_dict()
