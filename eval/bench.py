"""`distill bench decode`: time every eval decoder with and without its KV cache, side by side on the same prompts.

For each decoder of the recipe's eval section (at its first sweep value), the same eval prompts are decoded with
cache `none`, `prompt` and, when the canvas has more than one block, `blocks`. Every setting runs once untimed
(warm-up), then `repeats` timed runs interleaved across settings, so that background load on a shared machine
falls on all of them alike. The JSON written records, per setting: the median and every run's wall time, tokens/s
at the median, mean NFE, TPF, the speedup over `none` (ratio of medians), accuracy, and the fraction of outputs
identical to the uncached ones (1.0 for a causal model; for a bidirectional one, how much the approximation
changes). Hardware, threads, batch size and library versions are recorded beside them.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from distill.decoding import decode
from distill.files import write_json
from distill.recipe import DecoderConfig, Recipe
from eval.report import hardware_name, library_versions
from eval.tasks import build_task_datasets, is_correct
from teachers.interface import Prompt, Teacher, load_teacher


def _decode_all(teacher: Teacher, prompts: list[Prompt], config: DecoderConfig, gen_length: int, batch_size: int):
    """Decode every prompt in batches; returns (seconds, outputs, total NFE, total generated tokens)."""
    generator = torch.Generator().manual_seed(0)
    outputs, nfe, generated = [], 0, 0
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first : first + batch_size]
        vision = [prompt.vision for prompt in chunk]
        result = decode(teacher, [prompt.ids for prompt in chunk], config, gen_length, generator, vision)
        outputs += [teacher.decode_response(row.tolist()) for row in result.tokens]
        nfe += int(result.nfe.sum())
        generated += int(result.generated.sum())
    return time.perf_counter() - start, outputs, nfe, generated


def bench_decoders(
    teacher: Teacher,
    records: list[dict],
    settings: list[tuple[str, DecoderConfig, int]],
    batch_size: int,
    repeats: int,
) -> list[dict]:
    """Time each `(label, decoder, gen_length)` with every cache mode; one result dict per (decoder, cache)."""
    prompts = [teacher.encode_prompt(record["prompt"], record.get("images") or ()) for record in records]
    cases = []
    for label, config, gen_length in settings:
        blocks = gen_length // (config.block_length or gen_length)
        for cache in ("none", "prompt", "blocks") if blocks > 1 else ("none", "prompt"):
            cases.append((label, config.model_copy(update={"cache": cache}), gen_length))
    runs: list[list[float]] = [[] for _ in cases]
    first_outputs = []
    for _, config, gen_length in cases:  # warm-up, also the outputs compared below
        _, outputs, nfe, generated = _decode_all(teacher, prompts, config, gen_length, batch_size)
        first_outputs.append((outputs, nfe, generated))
    for _ in range(repeats):
        for index, (_, config, gen_length) in enumerate(cases):
            runs[index].append(_decode_all(teacher, prompts, config, gen_length, batch_size)[0])

    results = []
    baseline: dict[str, tuple[float, list[str]]] = {}
    for index, (label, config, _) in enumerate(cases):
        outputs, nfe, generated = first_outputs[index]
        median = statistics.median(runs[index])
        if config.cache == "none":
            baseline[label] = (median, outputs)
        reference_median, reference_outputs = baseline[label]
        same = sum(a == b for a, b in zip(outputs, reference_outputs, strict=True)) / len(outputs)
        correct = sum(
            is_correct(output, record["answer"], record.get("task"))
            for output, record in zip(outputs, records, strict=True)
        )
        results.append(
            {
                "decoder": label,
                "cache": config.cache,
                "settings": config.model_dump(mode="json"),
                "median_s": median,
                "runs_s": runs[index],
                "tokens_per_s": generated / median,
                "nfe": nfe / len(records),
                "tpf": generated / max(nfe, 1),
                "speedup": reference_median / median,
                "same_output_fraction": same,
                "accuracy": 100.0 * correct / len(records),
            }
        )
    return results


def run_decode_bench(
    recipe: Recipe, checkpoint: Path, *, task: str | None, samples: int, repeats: int, out_path: Path
) -> dict:
    """Benchmark the recipe's eval decoders on `samples` eval prompts of `task` and write the JSON to `out_path`."""
    task = task or (recipe.eval.tasks or recipe.data.task_names())[0]
    datasets = build_task_datasets(recipe.data, recipe.run.seed, Path(recipe.run.output_dir) / "data")
    records = list(datasets[task]["eval"])[:samples]
    if not records:
        raise ValueError(f"bench: task '{task}' has no eval samples")
    teacher = load_teacher(recipe.teacher.name, checkpoint, recipe.teacher.dtype)
    settings = []
    for decoder in recipe.eval.all_decoders():
        gen_length = decoder.gen_length or recipe.data.max_response_tokens
        _, config = decoder.settings(gen_length)[0]  # the sweep's first point: one token per forward under `auto`
        settings.append((decoder.report_name, config, gen_length))
    batch_size = min(recipe.eval.batch_size, len(records))
    results = bench_decoders(teacher, records, settings, batch_size, repeats)
    payload = {
        "hardware": hardware_name(teacher.device),
        "threads": torch.get_num_threads(),
        "batch_size": batch_size,
        "samples": len(records),
        "repeats": repeats,
        "task": task,
        "checkpoint": str(checkpoint),
        "causal": bool(getattr(teacher.model.config, "causal", False)),
        "prompt_tokens_mean": sum(len(teacher.encode_prompt(r["prompt"], r.get("images") or ()).ids) for r in records)
        / len(records),
        "versions": library_versions(),
        "results": results,
    }
    out_path = Path(out_path)
    write_json(out_path, payload)
    for result in results:
        print(
            f"[bench] {result['decoder']:16s} cache={result['cache']:6s} median {result['median_s'] * 1000:8.1f} ms  "
            f"{result['tokens_per_s']:8.1f} tok/s  x{result['speedup']:.2f}  NFE {result['nfe']:.2f}  "
            f"same output {100 * result['same_output_fraction']:.0f}%  accuracy {result['accuracy']:.1f}%"
        )
    print(f"[bench] written to {out_path}")
    return payload
