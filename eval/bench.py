"""`distill bench decode`: time every eval decoder with each KV cache mode, eagerly and on the static path, side by
side with cached autoregressive decoding, on the same prompts.

For each decoder of the recipe's eval section (at its first sweep value), the same eval prompts are decoded with
cache `none`, `prompt` and, when the canvas has more than one block, `blocks`, on each decoding path: `eager` (the
batch shrinks as samples finish), `static` (fixed shapes, a preallocated cache) and `compiled` (the static path
through `torch.compile`: CUDA graphs on a GPU), at each batch size asked for. Every setting runs once untimed
(warm-up, and compilation), then `repeats` timed runs interleaved across settings, so that background load on a
shared machine falls on all of them alike.

Beside them, the AR baseline (the run's `ar-baseline` checkpoint, or another model of the same size) decodes the
same prompts greedily with an incremental KV cache (`autoregressive_decode`: the prompt encoded once, then one
token per forward appended to the cache), the reference a few-step decoder has to beat in tokens per second.

The JSON written records, per setting: the median and every run's wall time, tokens/s at the median, batch
forwards and prefills, ms per forward, the ratio of that to the weight-read floor (the time to read the model's
weights once at the copy bandwidth measured in the same run: no forward at batch 1 can be faster), mean NFE, TPF,
the speedup over cache `none` on the eager path (ratio of medians), the ratio of tokens/s to the AR baseline's at
the same batch size, accuracy, the fraction of outputs identical to the eager uncached ones (1.0 for a causal
model; for a bidirectional model's cache, how much the approximation changes) and to the eager path's with the
same cache (1.0: the static path decodes the same tokens). Hardware, threads and library versions are recorded
beside them.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from distill.decoding import decode, left_pad
from distill.files import write_json
from distill.recipe import DecoderConfig, Recipe
from eval.report import hardware_name, library_versions
from eval.tasks import build_task_datasets, is_correct
from teachers.interface import Prompt, Teacher, load_teacher
from teachers.vision import collate_vision

PATHS = ("eager", "static", "compiled")


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes per second a device-to-device copy moves (read + write), median of `repeats` timed copies."""
    source = torch.empty(megabytes * 2**20, dtype=torch.uint8, device=device).fill_(1)
    target = torch.empty_like(source)
    target.copy_(source)  # warm-up: first-touch page faults are not bandwidth
    times = []
    for _ in range(repeats):
        _synchronize(device)
        began = time.perf_counter()
        target.copy_(source)
        _synchronize(device)
        times.append(time.perf_counter() - began)
    return 2 * source.numel() / statistics.median(times)


def weight_read_floor(model: torch.nn.Module, bandwidth: float) -> dict:
    """The model's weight bytes and the time to read them once at `bandwidth` bytes/s (a batch-1 forward's floor)."""
    weight_bytes = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    return {"weight_bytes": weight_bytes, "floor_ms": 1000.0 * weight_bytes / bandwidth}


@torch.no_grad()
def autoregressive_decode(teacher: Teacher, prompts: list[Prompt], gen_length: int) -> tuple[torch.Tensor, int]:
    """Greedy left-to-right decoding with an incremental KV cache under causal attention: the prompt is encoded
    once, then every forward encodes only the newest token (and, for an unshifted backbone, the mask it predicts
    from, which is cropped off again) and keeps its keys and values. Returns `[B, gen_length]` tokens and the
    number of forwards. For a causal model it decodes what the engine's left-to-right decoder does
    (`low_confidence`, one-token blocks), without re-encoding the prefix at every step."""
    model, device = teacher.model, teacher.device
    ids, mask = left_pad([prompt.ids for prompt in prompts], teacher.pad_token_id)
    ids, mask = ids.to(device), mask.to(device)
    images = {name: value.to(device) for name, value in collate_vision([p.vision for p in prompts]).items()}
    batch = ids.shape[0]
    masks = torch.full((batch, 1), teacher.mask_token_id, device=device)
    # Shifted: raw position i-1 scores token i, so the prompt's last position already scores the first answer
    # token. Unshifted: position i scores token i from a mask placed there, one more forward.
    out = model(input_ids=ids, attention_mask=mask, use_cache=True, causal=True, logits_to_keep=1, **images)
    if not teacher.shifted:
        mask = torch.cat([mask, torch.ones_like(masks)], dim=1)
        out = model(input_ids=masks, attention_mask=mask, cache=out.cache, causal=True, logits_to_keep=1)
        out.cache.crop(-1)
        mask = mask[:, :-1]
    cache, forwards = out.cache, 1 + int(not teacher.shifted)
    tokens = []
    logits = out.logits[:, -1]
    ends = torch.tensor([teacher.end_token_id, teacher.eos_token_id], device=device)
    ended = torch.zeros(batch, dtype=torch.bool, device=device)
    for position in range(gen_length):
        logits[:, teacher.mask_token_id] = -torch.inf
        token = logits.argmax(-1, keepdim=True)
        tokens.append(token)
        ended |= torch.isin(token[:, 0], ends)
        if position == gen_length - 1 or bool(ended.all()):  # every answer has ended: stop, as the engine does
            break
        step = token if teacher.shifted else torch.cat([token, masks], dim=1)
        mask = torch.cat([mask, torch.ones_like(step)], dim=1)
        out = model(input_ids=step, attention_mask=mask, cache=cache, causal=True, logits_to_keep=1)
        forwards += 1
        if not teacher.shifted:
            cache.crop(-1)  # the mask's keys and values: the next step puts the committed token there
            mask = mask[:, :-1]
        logits = out.logits[:, -1]
    tokens = torch.cat(tokens, dim=1)
    filler = torch.full((batch, gen_length - tokens.shape[1]), teacher.end_token_id, device=device)
    return torch.cat([tokens, filler], dim=1).cpu(), forwards


def answer_length(teacher: Teacher, tokens: torch.Tensor) -> torch.Tensor:
    """[B] response tokens before the first end-of-turn or EOS token."""
    ends = torch.isin(tokens, torch.tensor([teacher.end_token_id, teacher.eos_token_id]))
    length = torch.full((tokens.shape[0],), tokens.shape[1])
    return torch.where(ends.any(-1), ends.float().argmax(-1), length)


def _decode_all(
    teacher: Teacher, prompts: list[Prompt], config: DecoderConfig | None, gen_length: int, batch_size: int
):
    """Decode every prompt in batches (`config` None: the cached AR loop); returns (seconds, outputs, total NFE,
    total generated tokens, batch forwards, prefills)."""
    generator = torch.Generator().manual_seed(0)
    outputs, nfe, generated, forwards, prefills = [], 0, 0, 0, 0
    _synchronize(teacher.device)
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        chunk = prompts[first : first + batch_size]
        if config is None:
            tokens, steps = autoregressive_decode(teacher, chunk, gen_length)
            outputs += [teacher.decode_response(row.tolist()) for row in tokens]
            lengths = answer_length(teacher, tokens)
            forwards += steps
            nfe += int((lengths + 1).clamp(max=gen_length).sum())  # each sample's tokens, its end token included
            generated += int(lengths.sum())
            continue
        vision = [prompt.vision for prompt in chunk]
        result = decode(teacher, [prompt.ids for prompt in chunk], config, gen_length, generator, vision)
        outputs += [teacher.decode_response(row.tolist()) for row in result.tokens]
        nfe += int(result.nfe.sum())
        generated += int(result.generated.sum())
        forwards += result.forwards
        prefills += result.prefills
    _synchronize(teacher.device)
    return time.perf_counter() - start, outputs, nfe, generated, forwards, prefills


def _agreement(outputs: list[str], reference: list[str]) -> float:
    return sum(a == b for a, b in zip(outputs, reference, strict=True)) / len(outputs)


def _path_config(config: DecoderConfig, cache: str, path: str) -> DecoderConfig:
    return config.model_copy(update={"cache": cache, "static": path != "eager", "compile": path == "compiled"})


def bench_decoders(
    teacher: Teacher,
    records: list[dict],
    settings: list[tuple[str, DecoderConfig, int]],
    batch_size: int | list[int],
    repeats: int,
    paths: tuple[str, ...] = ("eager",),
    ar_teacher: Teacher | None = None,
    floor_ms: float | None = None,
) -> list[dict]:
    """Time each `(label, decoder, gen_length)` with every cache mode on every decoding path in `paths`, at every
    batch size, and (with `ar_teacher`) cached AR decoding on the same prompts; one result dict per setting.

    `floor_ms` is the weight-read floor of a forward (`weight_read_floor`); with it each result has
    `floor_ratio`."""
    unknown = sorted(set(paths) - set(PATHS))
    if unknown:
        raise ValueError(f"bench: unknown decoding path {unknown[0]} (known: {', '.join(PATHS)})")
    batch_sizes = [batch_size] if isinstance(batch_size, int) else list(batch_size)
    prompts = [teacher.encode_prompt(record["prompt"], record.get("images") or ()) for record in records]
    cases: list[tuple[str, str, Teacher, DecoderConfig | None, int, int]] = []
    for size in batch_sizes:
        for label, config, gen_length in settings:
            blocks = gen_length // (config.block_length or gen_length)
            for cache in ("none", "prompt", "blocks") if blocks > 1 else ("none", "prompt"):
                for path in paths:
                    cases.append((label, path, teacher, _path_config(config, cache, path), gen_length, size))
        if ar_teacher is not None:
            gen_length = max(length for _, _, length in settings)
            cases.append(("autoregressive", "eager", ar_teacher, None, gen_length, size))
    first_runs = [_decode_all(t, prompts, config, length, size) for _, _, t, config, length, size in cases]
    runs: list[list[float]] = [[] for _ in cases]
    for _ in range(repeats):
        for index, (_, _, model, config, gen_length, size) in enumerate(cases):
            runs[index].append(_decode_all(model, prompts, config, gen_length, size)[0])

    results = []
    reference: dict[tuple[str, int], tuple[float, list[str]]] = {}
    eager_outputs: dict[tuple[str, int, str], list[str]] = {}
    ar_speed: dict[int, float] = {}
    for index, (label, path, _, config, _, size) in enumerate(cases):
        _, outputs, nfe, generated, forwards, prefills = first_runs[index]
        median = statistics.median(runs[index])
        if config is None:
            ar_speed[size] = generated / median
        elif path == "eager":
            eager_outputs[label, size, config.cache] = outputs
            if config.cache == "none":
                reference[label, size] = (median, outputs)
        reference_median, reference_outputs = reference.get((label, size), (median, outputs))
        same_path = eager_outputs.get((label, size, config.cache if config else ""), outputs)
        correct = sum(
            is_correct(output, record["answer"], record.get("task"))
            for output, record in zip(outputs, records, strict=True)
        )
        ms_per_forward = 1000.0 * median / max(forwards + prefills, 1)
        results.append(
            {
                "decoder": label,
                "path": path,
                "cache": "autoregressive" if config is None else config.cache,
                "batch_size": size,
                "settings": None if config is None else config.model_dump(mode="json"),
                "median_s": median,
                "runs_s": runs[index],
                "tokens_per_s": generated / median,
                "forwards": forwards,
                "prefills": prefills,
                "ms_per_forward": ms_per_forward,
                "floor_ratio": None if floor_ms is None else ms_per_forward / floor_ms,
                "nfe": nfe / len(records),
                "tpf": generated / max(nfe, 1),
                "speedup": reference_median / median,
                # Agreement with the same decoder's eager uncached outputs (none for the AR rows: another model).
                "same_output_fraction": None if config is None else _agreement(outputs, reference_outputs),
                # The static and compiled paths must decode what the eager path does with the same cache: 1.0.
                "same_as_eager": None if config is None else _agreement(outputs, same_path),
                "accuracy": 100.0 * correct / len(records),
            }
        )
    for result in results:
        ar = ar_speed.get(result["batch_size"])
        result["vs_autoregressive"] = None if ar is None else result["tokens_per_s"] / ar
    return results


def run_decode_bench(
    recipe: Recipe,
    checkpoint: Path,
    *,
    task: str | None,
    samples: int,
    repeats: int,
    out_path: Path,
    batch_sizes: list[int] | None = None,
    paths: tuple[str, ...] | None = None,
    ar_checkpoint: Path | None = None,
) -> dict:
    """Benchmark the recipe's eval decoders on `samples` eval prompts of `task` and write the JSON to `out_path`.

    `batch_sizes` default to `eval.batch_size`; `paths` to eager and static (and compiled on a GPU); the AR
    baseline is `ar_checkpoint` when given (none: no AR rows)."""
    task = task or (recipe.eval.tasks or recipe.data.task_names())[0]
    datasets = build_task_datasets(recipe.data, recipe.run.seed, Path(recipe.run.output_dir) / "data")
    records = list(datasets[task]["eval"])[:samples]
    if not records:
        raise ValueError(f"bench: task '{task}' has no eval samples")
    teacher = load_teacher(recipe.teacher.name, checkpoint, recipe.teacher.dtype)
    ar_teacher = None if ar_checkpoint is None else load_teacher(None, ar_checkpoint, recipe.teacher.dtype)
    if paths is None:
        paths = PATHS if teacher.device.type == "cuda" else ("eager", "static")
    settings = []
    for decoder in recipe.eval.all_decoders():
        gen_length = decoder.gen_length or recipe.data.max_response_tokens
        _, config = decoder.settings(gen_length)[0]  # the sweep's first point: one token per forward under `auto`
        settings.append((decoder.report_name, config, gen_length))
    batch_sizes = [min(size, len(records)) for size in (batch_sizes or [recipe.eval.batch_size])]
    bandwidth = copy_bandwidth(teacher.device)
    floor = weight_read_floor(teacher.model, bandwidth)
    results = bench_decoders(teacher, records, settings, batch_sizes, repeats, paths, ar_teacher, floor["floor_ms"])
    payload = {
        "hardware": hardware_name(teacher.device),
        "threads": torch.get_num_threads(),
        "batch_sizes": batch_sizes,
        "paths": list(paths),
        "samples": len(records),
        "repeats": repeats,
        "task": task,
        "checkpoint": str(checkpoint),
        "ar_checkpoint": None if ar_checkpoint is None else str(ar_checkpoint),
        "causal": bool(getattr(teacher.model.config, "causal", False)),
        "dtype": recipe.teacher.dtype,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        **floor,
        "prompt_tokens_mean": sum(len(teacher.encode_prompt(r["prompt"], r.get("images") or ()).ids) for r in records)
        / len(records),
        "versions": library_versions(),
        "results": results,
    }
    out_path = Path(out_path)
    write_json(out_path, payload)
    print(
        f"[bench] {payload['hardware']}: weights {floor['weight_bytes'] / 1e6:.1f} MB, copy "
        f"{payload['copy_bandwidth_gb_s']:.1f} GB/s, weight-read floor {floor['floor_ms']:.3f} ms per forward"
    )
    for result in results:
        versus = "" if result["vs_autoregressive"] is None else f"  x{result['vs_autoregressive']:.2f} vs AR"
        print(
            f"[bench] b={result['batch_size']:<3d} {result['decoder']:16s} {result['path']:8s} "
            f"cache={result['cache']:14s} {result['ms_per_forward']:8.2f} ms/forward "
            f"(x{result['floor_ratio']:.1f} floor)  {result['tokens_per_s']:8.1f} tok/s{versus}  "
            f"NFE {result['nfe']:.2f}  "
            + (
                ""
                if result["same_output_fraction"] is None
                else f"same output {100 * result['same_output_fraction']:.0f}%  "
            )
            + f"accuracy {result['accuracy']:.1f}%"
        )
    print(f"[bench] written to {out_path}")
    return payload
