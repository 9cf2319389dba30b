"""`distill bench train`: the distillation step under each DeepSpeed profile, timed, with tokens/s and MFU, as JSON.

For each profile (default: every one shipped in `recipes/deepspeed/`), the recipe's distillation is built exactly as
`distill run` builds it (`build_distillation`: the student read from the teacher's folder, partitioned at
construction under ZeRO-3; the recipe's loss terms and batches), in a scratch phase directory, and
`warmup + steps` optimizer steps run through the trainer's own `Trainer.train_step` (no checkpoints). Per profile
the JSON records every timed step, the median step time, tokens/s (all ranks), the FLOPs of one step counted by
PyTorch's `FlopCounterMode` on a warm step (matmuls and attention of every forward and backward the loss runs; a
d3LLM step with three loss forwards counts three), and MFU = FLOPs / median step time / peak, the peak being the
matmul throughput measured in the same run on the same device in the training precision (on a GPU, also against
`--peak-tflops` when given: a datasheet or the GPU notes' 790 TFLOP/s for bf16 on an H100). Under a launcher
every rank runs the steps and rank 0 writes the JSON; FLOPs and peak are per rank, so MFU is per GPU.

Training records: the run's trajectory set when it exists and matches (`distill run`'s trajectories stage);
otherwise (said on the console) trajectory records made from the task's training split with the reference answers
in left-to-right order (a benchmark needs batches of the right shape, not a teacher's order). An SDTT recipe trains
on the task records themselves.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.flop_counter import FlopCounterMode

from distill.data import encode_records
from distill.distill import build_distillation
from distill.files import write_json
from distill.ranks import join_ranks, prepare_datasets
from distill.recipe import Recipe, deepspeed_profiles
from distill.trajectories import SET_DIR, attach_images, expected_manifest, load_trajectories, training_records
from eval.report import hardware_name, library_versions
from teachers.interface import load_teacher, local_device


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int | None = None, repeats: int = 5) -> float:
    """FLOP/s of a square matmul on `device` in `dtype` (median of `repeats`): the peak MFU is measured against."""
    size = size or (8192 if device.type == "cuda" else 1024)
    left = torch.randn(size, size, device=device, dtype=dtype)
    right = torch.randn(size, size, device=device, dtype=dtype)
    left @ right  # warm-up: kernel selection, first-touch pages
    times = []
    for _ in range(repeats):
        _synchronize(device)
        began = time.perf_counter()
        left @ right
        _synchronize(device)
        times.append(time.perf_counter() - began)
    return 2 * size**3 / statistics.median(times)


def benchmark_records(recipe: Recipe, teacher_dir: Path, out_dir: Path) -> tuple[list[dict], str, list[dict] | None]:
    """The records a distillation step trains on, where they come from (`trajectories` or `reference`), and the
    task training records when training reads them (an SDTT run, `source: task` regularisers), else None."""
    datasets = prepare_datasets(recipe, out_dir)
    task_records = None
    if recipe.distill.reads_task_records:  # SDTT, or a regulariser with `source: task`
        task_records = [record for name in recipe.data.task_names() for record in datasets[name]["train"]]
    if recipe.distill.is_sdtt:
        return task_records, "task", task_records
    records = training_records(recipe, datasets)
    set_dir = out_dir / SET_DIR
    if set_dir.is_dir():
        try:
            rows = load_trajectories(set_dir, **expected_manifest(recipe, teacher_dir, records)).to_list()
            return attach_images(rows, records), "trajectories", task_records
        except ValueError as error:  # a set of another teacher or format: a benchmark needs shapes, not its rows
            print(f"[bench] not using the run's trajectories ({error}); reference answers instead")
    teacher = load_teacher(recipe.teacher.name, teacher_dir, weights=False)
    canvas = recipe.data.max_response_tokens
    examples = encode_records(teacher, records, canvas)
    rows = [
        {
            "sample_id": record["id"],
            "prompt_ids": example.prompt,
            "target_ids": example.response + [teacher.pad_token_id] * (canvas - len(example.response)),
            "order": list(range(canvas)),
            "images": list(example.images),
        }
        for record, example in zip(records, examples, strict=True)
    ]
    return rows, "reference", task_records


def bench_profile(
    recipe: Recipe,
    teacher_dir: Path,
    records: list[dict],
    scratch: Path,
    steps: int,
    warmup: int,
    task_records: list[dict] | None = None,
) -> dict[str, Any]:
    """Time `steps` distillation steps (after `warmup`) under `recipe.train`'s DeepSpeed config in `scratch`."""
    _, trainer = build_distillation(recipe, teacher_dir, records, scratch, task_records)
    device = trainer.engine.device
    trainer.engine.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for index in range(warmup):
        trainer.train_step(index)
    with FlopCounterMode(display=False) as counter:
        trainer.train_step(warmup)  # a warm step, counted once (its time is not used)
    flops = counter.get_total_flops()
    times, tokens = [], []
    for index in range(warmup + 1, warmup + 1 + steps):
        _synchronize(device)
        if trainer.world_size > 1:
            dist.barrier()  # every rank starts the step together: the slowest rank sets the step time
        began = time.perf_counter()
        record = trainer.train_step(index)
        _synchronize(device)
        times.append(time.perf_counter() - began)
        tokens.append(record["tokens"])
    median = statistics.median(times)
    return {
        "zero_stage": trainer.engine.zero_optimization_stage(),
        "world_size": trainer.world_size,
        "micro_batch_size": recipe.train.micro_batch_size,
        "gradient_accumulation_steps": recipe.train.gradient_accumulation_steps,
        "step_s": times,
        "median_step_s": median,
        "tokens_per_step": statistics.median(tokens),
        "tokens_per_s": statistics.median(tokens) / median,
        "flops_per_step": flops,
        "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
    }


def run_train_bench(
    recipe: Recipe,
    *,
    profiles: list[str] | None,
    steps: int,
    warmup: int,
    out_path: Path,
    peak_tflops: float | None = None,
) -> dict[str, Any]:
    """Benchmark the recipe's distillation step under each profile; rank 0 writes the JSON to `out_path`."""
    out_dir = Path(recipe.run.output_dir)
    teacher_dir = Path(recipe.teacher.path or out_dir / "teacher")
    if not (teacher_dir / "config.json").is_file():
        raise FileNotFoundError(f"bench train: no teacher checkpoint at {teacher_dir} (set teacher.path)")
    profiles = profiles or deepspeed_profiles()
    rank, world_size = join_ranks()
    records, source, task_records = benchmark_records(recipe, teacher_dir, out_dir)
    device = local_device()
    dtype = torch.bfloat16 if recipe.train.precision == "bf16" else torch.float32
    peak = matmul_peak(device, dtype)
    results = []
    for profile in profiles:
        train = recipe.train.model_dump()
        train.pop("zero_stage")  # the profile decides the stage
        train.update(deepspeed=profile, max_steps=warmup + 1 + steps, checkpoint_every=0, resume="never")
        bench_recipe = recipe.model_copy(update={"train": type(recipe.train).model_validate(train)})
        scratch = out_dir / "bench" / f"train-{profile}"
        result = bench_profile(bench_recipe, teacher_dir, records, scratch, steps, warmup, task_records)
        result["mfu"] = result["flops_per_step"] / result["median_step_s"] / peak
        if peak_tflops:
            result["mfu_vs_given_peak"] = result["flops_per_step"] / result["median_step_s"] / (peak_tflops * 1e12)
        results.append({"profile": profile, **result})
        if world_size > 1:
            dist.barrier()
        if rank == 0:
            shutil.rmtree(scratch, ignore_errors=True)
            print(
                f"[bench] {profile:14s} ZeRO-{result['zero_stage']}  step {1000 * result['median_step_s']:8.1f} ms  "
                f"{result['tokens_per_s']:10.1f} tok/s  {result['flops_per_step'] / 1e9:9.2f} GFLOP/step  "
                f"MFU {100 * result['mfu']:.2f}%"
            )
    payload = {
        "hardware": hardware_name(device),
        "threads": torch.get_num_threads(),
        "world_size": world_size,
        "precision": recipe.train.precision,
        "peak_flops_measured": peak,
        "peak_tflops_given": peak_tflops,
        "records": source,
        "steps": steps,
        "warmup": warmup,
        "losses": [term.kind for term in recipe.distill.losses],
        "student": recipe.student.kind,
        "versions": library_versions(),
        "results": results,
    }
    if rank == 0:
        write_json(Path(out_path), payload)
        print(f"[bench] written to {out_path}")
    return payload
