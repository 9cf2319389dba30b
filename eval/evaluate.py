"""Decode a task's eval split with one model and one decoder, and score it by exact match.

`evaluate_records` returns accuracy (percent), mean NFE, TPF (total generated tokens / total forward passes, so
long answers weigh more, as in d3LLM's reports), tokens/s (wall time of the decode calls, prompt encoding
included) at the given batch size, and one log line per sample (prompt, output, answer, correct, nfe, generated
tokens). Sweeps, AUP and reports are built on it in `distill/run.py:evaluate_rows` and `eval/report.py`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from distill.decoding import decode
from distill.files import write_atomically
from distill.recipe import DecoderConfig
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
        result = decode(teacher, [teacher.encode_prompt(r["prompt"]) for r in chunk], decoder, gen_length, generator)
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


def write_sample_log(logs: list[dict], path: Path) -> None:
    """Per-sample JSONL, written atomically."""
    write_atomically(path, "".join(json.dumps(log) + "\n" for log in logs))
