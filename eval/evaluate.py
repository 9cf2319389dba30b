"""Decode a task's eval split with one model and one decoder, and score it by exact match; sweep a decoder's knob.

`evaluate_records` returns accuracy (percent), mean NFE, TPF (total generated tokens / total forward passes, so
long answers weigh more, as in d3LLM's reports), tokens/s (wall time of the decode calls, prompt encoding
included) at the given batch size, and one log line per sample (prompt, output, answer, correct, nfe, generated
tokens). `sweep_decoder` evaluates a decoder at each value of its knob (an `auto` sweep stops once accuracy has
fallen past AUP's cut-off) and `sweep_status` says whether the curve is complete or cut short; `report_row` makes a
report row of a swept curve. The report is built on them in `distill/run.py:evaluate_rows`, `eval/benchmarks.py`
(the lm-eval sweeps) and `eval/report.py`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from distill.decoding import decode
from distill.files import write_atomically
from distill.recipe import DecoderConfig, EvalDecoderConfig
from eval.aup import ACCURACY_DROP_LIMIT, fell_past_cutoff
from eval.tasks import is_correct
from teachers.interface import Teacher


@dataclass
class EvalResult:
    task: str
    row: str
    decoder: dict
    samples: int
    accuracy: float  # percent
    nfe: float  # mean forward passes per sample
    tpf: float  # generated tokens / forward passes, over the whole split
    tokens_per_s: float
    seconds: float
    batch_size: int
    logs: list[dict] = field(default_factory=list, repr=False)

    def summary(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "logs"}


def evaluate_records(
    teacher: Teacher,
    records: list[dict],
    decoder: DecoderConfig,
    gen_length: int,
    batch_size: int,
    *,
    task: str,
    row: str,
    seed: int = 0,
) -> EvalResult:
    """Decode every record's prompt in batches of `batch_size` and score the outputs."""
    if not records:
        raise ValueError(f"eval: task '{task}' has no eval samples")
    generator = torch.Generator().manual_seed(seed)
    logs: list[dict] = []
    total_nfe = total_generated = 0
    start = time.perf_counter()
    for first in range(0, len(records), batch_size):
        chunk = records[first : first + batch_size]
        prompts = [teacher.encode_prompt(r["prompt"], r.get("images") or ()) for r in chunk]
        vision = [prompt.vision for prompt in prompts]
        result = decode(teacher, [prompt.ids for prompt in prompts], decoder, gen_length, generator, vision)
        for index, record in enumerate(chunk):
            output = teacher.decode_response(result.tokens[index].tolist())
            logs.append(
                {
                    "id": record["id"],
                    "prompt": record["prompt"],
                    "output": output,
                    "answer": record["answer"],
                    "correct": is_correct(output, record["answer"], record["task"]),
                    "nfe": int(result.nfe[index]),
                    "generated": int(result.generated[index]),
                }
            )
        total_nfe += int(result.nfe.sum())
        total_generated += int(result.generated.sum())
    seconds = time.perf_counter() - start
    return EvalResult(
        task=task,
        row=row,
        decoder=decoder.model_dump(mode="json") | {"gen_length": gen_length},
        samples=len(logs),
        accuracy=100.0 * sum(log["correct"] for log in logs) / len(logs),
        nfe=total_nfe / len(logs),
        tpf=total_generated / max(total_nfe, 1),
        tokens_per_s=total_generated / seconds,
        seconds=seconds,
        batch_size=batch_size,
        logs=logs,
    )


def sweep_decoder(
    teacher: Teacher,
    records: list[dict],
    decoder: EvalDecoderConfig,
    gen_length: int,
    batch_size: int,
    *,
    task: str,
    row: str,
    seed: int = 0,
) -> Iterator[tuple[float | int | None, EvalResult]]:
    """Evaluate `decoder` at each value of its knob in turn, yielding `(knob value, result)` as each is measured.

    An `auto` sweep walks its ladder from one token per forward and stops after the first value whose accuracy
    fell past AUP's cut-off (`eval.aup.fell_past_cutoff`); a pinned list is evaluated whole.
    """
    curve: list[tuple[float, float]] = []
    for knob, setting in decoder.settings(gen_length):
        result = evaluate_records(teacher, records, setting, gen_length, batch_size, task=task, row=row, seed=seed)
        yield knob, result
        curve.append((result.tpf, result.accuracy))
        if decoder.sweep == "auto" and fell_past_cutoff(curve):
            return


def sweep_status(decoder: EvalDecoderConfig, gen_length: int, points: list[tuple]) -> dict:
    """How far a row's curve went: `{"sweep": "auto" | "pinned", "one_token_knob", "cut_short", "cut_short_reason"}`.

    `points` are the row's `(knob, tpf, accuracy)`. A curve is complete when it holds the decoder's
    one-token-per-forward value and either its accuracy fell past AUP's cut-off or it reached the fastest value of
    the decoder's ladder (nothing faster left to try); otherwise it is cut short, and the reason says why.
    """
    one_token = decoder.one_token_knob(gen_length)
    knobs = [knob for knob, _, _ in points]
    fastest = decoder.ladder(gen_length)[-1]
    fastest_tried = knobs[0]
    for knob in knobs:
        fastest_tried = knob if decoder.faster_or_equal(knob, fastest_tried) else fastest_tried
    reason = None
    if one_token is None:
        reason = f"no {decoder.knob} value decodes one token per forward (steps is set)"
    elif one_token not in knobs:
        reason = f"does not start at one token per forward ({decoder.knob}={one_token})"
    elif not fell_past_cutoff([(tpf, accuracy) for _, tpf, accuracy in points]) and not decoder.faster_or_equal(
        fastest_tried, fastest
    ):
        tried = f"{decoder.knob}={fastest_tried}"
        reason = f"accuracy had not fallen more than {ACCURACY_DROP_LIMIT:g} points when the sweep stopped ({tried})"
    return {
        "sweep": "auto" if decoder.sweep == "auto" else "pinned",
        "one_token_knob": one_token,
        "cut_short": reason is not None,
        "cut_short_reason": reason,
    }


def report_row(
    name: str,
    decoder: EvalDecoderConfig,
    gen_length: int,
    points: list[dict],
    *,
    run: str,
    hardware: str,
    batch_size: int,
) -> dict:
    """One model's row of the AUP report (`eval/report.py`'s schema, without `aup`) for one decoder: its measured
    `points` (`knob`, `tpf`, `accuracy`, ...) and how far its sweep went (`sweep_status`)."""
    status = sweep_status(decoder, gen_length, [(point["knob"], point["tpf"], point["accuracy"]) for point in points])
    return {
        "name": name,
        "decoder": decoder.report_name,
        "decoder_name": decoder.name,
        "knob_name": decoder.knob,
        # The swept knob varies per point, so it is left out of the shared settings.
        "settings": decoder.model_dump(
            mode="json", exclude={"label", "sweep"} | ({decoder.knob} if decoder.sweep else set())
        ),
        "run": run,
        "hardware": hardware,
        "batch_size": batch_size,
        **status,
        "points": points,
    }


def write_sample_log(logs: list[dict], path: Path) -> None:
    """Per-sample JSONL, written atomically."""
    write_atomically(path, "".join(json.dumps(log) + "\n" for log in logs))
