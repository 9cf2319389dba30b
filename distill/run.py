"""`distill run`: one recipe, executed top to bottom.

load recipe -> build data -> teacher (pretrain, reuse from cache, or load) -> evaluate -> summary.
Each arrow is one named call under a comment header in `run`. Everything lands in `run.output_dir`:

    recipe.yaml          the fully resolved recipe
    data/<task>/         the task datasets (Arrow, `datasets.load_from_disk`)
    teacher/             the diffusion teacher (safetensors + tokenizer, loads with AutoModel)
    ar-baseline/         the AR-phase checkpoint (causal attention)
    pretrain-ar/, pretrain-diffusion/   trainer phases: checkpoints, metrics.jsonl, wandb
    eval/summary.json, eval/<row>/<task>.jsonl
    summary.json         stage times and headline figures
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch.distributed as dist

from distill.recipe import DecoderConfig, Recipe, dump_recipe
from eval.evaluate import EvalResult, evaluate_records, write_sample_log
from eval.tasks import build_task_datasets
from teachers.interface import load_teacher


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def write_json(path: Path, payload: dict) -> None:
    """Write JSON atomically (temp file + rename) so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def write_resolved_recipe(recipe: Recipe, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "recipe.yaml.tmp"
    tmp.write_text(dump_recipe(recipe))
    tmp.replace(out_dir / "recipe.yaml")


# ----------------------------------------------------------------------------------------------------------------
# Teacher: load a checkpoint, reuse a cached pretraining, or pretrain


def teacher_key(recipe: Recipe) -> str:
    """What determines a pretrained teacher: the teacher and data sections plus the seed."""
    return f"{recipe.section_hash('teacher', 'data')}-{recipe.run.seed}"


def _pretrained_dirs(root: Path, key: str) -> tuple[Path, Path] | None:
    marker = root / "pretrain.json"
    if marker.is_file() and json.loads(marker.read_text()).get("key") == key:
        if (root / "teacher" / "config.json").is_file() and (root / "ar-baseline" / "config.json").is_file():
            return root / "teacher", root / "ar-baseline"
    return None


def resolve_teacher(recipe: Recipe, train_records: list[dict], out_dir: Path) -> tuple[Path, Path | None]:
    """Return `(teacher_dir, ar_baseline_dir or None)`, pretraining only when nothing matching exists."""
    if recipe.teacher.path is not None:
        return recipe.teacher.path, None
    key = teacher_key(recipe)
    found = _pretrained_dirs(out_dir, key)
    if found:
        print(f"[teacher] reusing pretrained teacher in {out_dir} (key {key})")
        return found
    cache = recipe.run.cache_dir / f"teacher-{key}" if recipe.run.cache_dir else None
    if cache is not None and _pretrained_dirs(cache, key):
        print(f"[teacher] reusing cached teacher {cache}")
        if is_main_process():
            for name in ("teacher", "ar-baseline"):
                if (out_dir / name).exists():
                    shutil.rmtree(out_dir / name)
                shutil.copytree(cache / name, out_dir / name)
            write_json(out_dir / "pretrain.json", {"key": key, "from_cache": str(cache)})
        return out_dir / "teacher", out_dir / "ar-baseline"

    from distill.pretrain import pretrain_teacher  # imports DeepSpeed; only needed when training

    teacher_dir, ar_dir = pretrain_teacher(recipe, train_records, out_dir)
    if is_main_process():
        write_json(out_dir / "pretrain.json", {"key": key})
        if cache is not None:
            staging = cache.with_name(cache.name + ".tmp")
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
            for name in ("teacher", "ar-baseline"):
                shutil.copytree(out_dir / name, staging / name)
            write_json(staging / "pretrain.json", {"key": key})
            if cache.exists():
                shutil.rmtree(cache)
            staging.rename(cache)
    return teacher_dir, ar_dir


# ----------------------------------------------------------------------------------------------------------------
# Evaluation rows


def row_decoder(recipe: Recipe, row: str, gen_length: int) -> DecoderConfig:
    """The decoder a row is scored with: the recipe's for diffusion rows, left-to-right for the AR baseline."""
    if row == "ar-baseline":
        # One token per forward, strictly left to right: with causal attention this is plain AR decoding.
        return DecoderConfig(name="low_confidence", gen_length=gen_length, steps=gen_length, block_length=1)
    return recipe.eval.decoder


def evaluate_rows(recipe: Recipe, datasets: dict, checkpoints: dict[str, Path], out_dir: Path) -> list[EvalResult]:
    """Evaluate each (row, task) pair; writes per-sample logs and `summary.json` into `out_dir`."""
    gen_length = recipe.eval.decoder.gen_length or recipe.data.max_response_tokens
    results = []
    for row, checkpoint in checkpoints.items():
        model_name = recipe.teacher.name if recipe.teacher.path is not None else "tiny"
        teacher = load_teacher(model_name, checkpoint, recipe.teacher.dtype)
        for task in recipe.eval.tasks or recipe.data.task_names():
            records = list(datasets[task]["eval"])
            if recipe.eval.max_samples is not None:
                records = records[: recipe.eval.max_samples]
            result = evaluate_records(
                teacher,
                records,
                row_decoder(recipe, row, gen_length),
                gen_length,
                recipe.eval.batch_size,
                task=task,
                row=row,
                seed=recipe.run.seed,
            )
            write_sample_log(result, out_dir / row / f"{task}.jsonl")
            print(
                f"[eval] {row:12s} {task:14s} accuracy {result.accuracy:6.2f}%  NFE {result.nfe:6.2f}  "
                f"TPF {result.tpf:5.3f}  {result.tokens_per_s:8.1f} tok/s  ({result.samples} samples)"
            )
            results.append(result)
    write_json(out_dir / "summary.json", {"results": [result.summary() for result in results]})
    return results


# ----------------------------------------------------------------------------------------------------------------
# The run


def run(recipe: Recipe) -> dict:
    """Execute the recipe's stages; returns the run summary (also written to `summary.json`)."""
    out_dir = Path(recipe.run.output_dir)
    stage_seconds: dict[str, float] = {}
    start = time.perf_counter()

    # ---- recipe and data ----------------------------------------------------------------------------------
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        from distill.trainer import init_distributed

        init_distributed()
    if is_main_process():
        write_resolved_recipe(recipe, out_dir)
        datasets = build_task_datasets(recipe.data, recipe.run.seed, out_dir / "data")
    if distributed:
        # Rank 0 generates and writes the data; the others load what it wrote.
        dist.barrier()
        if not is_main_process():
            datasets = build_task_datasets(recipe.data, recipe.run.seed, out_dir / "data")
    stage_seconds["data"] = time.perf_counter() - start

    # ---- teacher ------------------------------------------------------------------------------------------
    checkpoints: dict[str, Path] = {}
    if "teacher" in recipe.run.stages:
        began = time.perf_counter()
        train_records = [record for task in datasets.values() for record in task["train"]]
        teacher_dir, ar_dir = resolve_teacher(recipe, train_records, out_dir)
        checkpoints = {"teacher": teacher_dir}
        if ar_dir is not None:
            checkpoints["ar-baseline"] = ar_dir
        stage_seconds["teacher"] = time.perf_counter() - began
    elif recipe.teacher.path is not None:
        checkpoints = {"teacher": recipe.teacher.path}

    # ---- evaluation ---------------------------------------------------------------------------------------
    results: list[EvalResult] = []
    if "eval" in recipe.run.stages and is_main_process():
        began = time.perf_counter()
        missing = [row for row in recipe.eval.rows if row not in checkpoints]
        if missing:
            raise ValueError(f"eval.rows: no checkpoint for {', '.join(missing)} (it comes from teacher pretraining)")
        rows = {row: checkpoints[row] for row in recipe.eval.rows}
        results = evaluate_rows(recipe, datasets, rows, out_dir / "eval")
        stage_seconds["eval"] = time.perf_counter() - began

    summary = {
        "run": recipe.run.name,
        "output_dir": str(out_dir),
        "stage_seconds": {name: round(value, 1) for name, value in stage_seconds.items()},
        "total_seconds": round(time.perf_counter() - start, 1),
        "checkpoints": {name: str(path) for name, path in checkpoints.items()},
        "results": [result.summary() for result in results],
    }
    if is_main_process():
        write_json(out_dir / "summary.json", summary)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return summary
