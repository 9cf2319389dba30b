"""`distill run`: one recipe, executed top to bottom.

load recipe -> build data -> teacher (pretrain, reuse from cache, or load) -> trajectories -> distill the student
-> evaluate -> export -> summary.
Each arrow is one named call under a comment header in `run`. Everything lands in `run.output_dir`:

    recipe.yaml          the fully resolved recipe
    data/<task>/         the task datasets (Arrow, `datasets.load_from_disk`)
    teacher/             the diffusion teacher (safetensors + tokenizer, loads with AutoModel)
    ar-baseline/         the AR-phase checkpoint (causal attention)
    pretrain-ar/, pretrain-diffusion/   trainer phases: checkpoints, metrics.jsonl, wandb
    trajectories/        the teacher's pseudo-trajectories (Arrow + manifest.json; `distill/trajectories.py`)
    trajectories-shards/ their shards, the unit of resume
    distill/             the distillation phase: checkpoints, metrics.jsonl, wandb (SDTT: sdtt-rounds/)
    student/             the distilled student (LoRA merged), loads like the teacher
    eval/report.{json,md,html}, eval/report-<task>.png   the AUP report (`eval/report.py` has the JSON schema)
    eval/<row>/<task>.jsonl   per-sample logs of every decoder and knob value (each line names both)
    export/              the student as a Hugging Face folder that loads without fewstep (`export.out_dir`;
                         `distill/export.py`), verified
    summary.json         stage times, every report point, each model's frontier and the headline ratios
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch.distributed as dist

from distill.files import write_atomically, write_json
from distill.ranks import prepare_datasets
from distill.recipe import DecoderConfig, EvalDecoderConfig, Recipe, dump_recipe
from distill.trajectories import (
    data_hash,
    expected_manifest,
    generate_trajectories,
    load_trajectories,
    training_records,
)
from eval.evaluate import sweep_decoder, sweep_status, write_sample_log
from eval.report import aup_lines, frontier_lines, hardware_name, new_report, write_report
from teachers.interface import load_teacher


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def write_resolved_recipe(recipe: Recipe, out_dir: Path) -> None:
    write_atomically(out_dir / "recipe.yaml", dump_recipe(recipe))


# ----------------------------------------------------------------------------------------------------------------
# Teacher: load a checkpoint, reuse a cached pretraining, or pretrain


def teacher_key(recipe: Recipe, train_records: list[dict]) -> str:
    """What determines a pretrained teacher: the teacher and data sections, the seed and the training records
    themselves (a changed task generator gives other records under the same data section)."""
    return f"{recipe.section_hash('teacher', 'data')}-{data_hash(train_records)[:8]}-{recipe.run.seed}"


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
    key = teacher_key(recipe, train_records)
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
    if row in autoregressive_rows(recipe):
        # One token per forward, strictly left to right: with causal attention this is plain AR decoding.
        return DecoderConfig(name="low_confidence", gen_length=gen_length, steps=gen_length, block_length=1)
    return recipe.eval.decoder


def autoregressive_rows(recipe: Recipe) -> set[str]:
    return {"ar-baseline"} | {checkpoint.name for checkpoint in recipe.eval.checkpoints if checkpoint.autoregressive}


def row_decoders(recipe: Recipe, row: str) -> list[EvalDecoderConfig]:
    """Every decoder (with its sweep) a row is scored with: one left-to-right decoder for AR rows."""
    if row in autoregressive_rows(recipe):
        gen_length = recipe.eval.decoder.gen_length or recipe.data.max_response_tokens
        # Its `auto` ladder is one value (one step per 1-token block): a complete curve of one point at TPF <= 1.
        return [EvalDecoderConfig.model_validate(row_decoder(recipe, row, gen_length).model_dump())]
    return recipe.eval.all_decoders()


def eval_rows(recipe: Recipe, produced: dict[str, Path]) -> dict[str, Path]:
    """The checkpoint of every eval row: this run's models (`produced` by a stage, else `teacher.path` or
    `<run.output_dir>/<row>`) and `eval.checkpoints`. Raises FileNotFoundError naming the missing ones."""
    out_dir = Path(recipe.run.output_dir)
    rows: dict[str, Path] = {}
    for row in recipe.eval.rows:
        own = recipe.teacher.path if row == "teacher" else None
        rows[row] = Path(produced.get(row) or own or out_dir / row)
    for checkpoint in recipe.eval.checkpoints:
        rows[checkpoint.name] = checkpoint.path
    missing = [f"{name} ({path})" for name, path in rows.items() if not (path / "config.json").is_file()]
    if missing:
        raise FileNotFoundError(f"eval: no checkpoint for {', '.join(missing)}")
    return rows


def sdtt_round_rows(recipe: Recipe) -> list[dict]:
    """The SDTT schedule as eval rows: per round, the row of its teacher (`teacher`, then each later round's saved
    starting teacher `sdtt-round-XX`) with its step count, and the row of the student the round trained (the next
    round's teacher, `student` for the last round), which should match the teacher with half the steps."""
    # Imports the decoding engine; only needed for SDTT runs.
    from distill.sdtt import SDTT_ROUNDS_DIR, round_of, saved_round_dir

    targets = recipe.targets
    rounds_dir = Path(recipe.run.output_dir) / "distill" / SDTT_ROUNDS_DIR
    names = ["teacher"] + [f"sdtt-round-{index:02d}" for index in range(1, targets.rounds)] + ["student"]
    schedule = []
    for index in range(targets.rounds):
        current = round_of(targets, index * targets.steps_per_round)
        schedule.append(
            {
                "round": index,
                "teacher": names[index],
                "teacher_path": None if index == 0 else str(saved_round_dir(rounds_dir, index)),
                "teacher_steps": current.teacher_steps,
                "student": names[index + 1],
                "student_steps": current.student_steps,
            }
        )
    return schedule


def sdtt_curve(report: dict, schedule: list[dict]) -> list[dict]:
    """Per task and round: the round's teacher accuracy at its step count and its student's at half as many (from
    the report's `low_confidence` rows; None where the sweep did not include that step count)."""

    def accuracy(rows: list[dict], name: str, steps: int) -> float | None:
        for row in rows:
            if row["name"] == name and row["decoder_name"] == "low_confidence":
                for point in row["points"]:
                    if point["knob"] == steps:
                        return point["accuracy"]
        return None

    curve = []
    for entry in report["tasks"]:
        for step in schedule:
            teacher = accuracy(entry["rows"], step["teacher"], step["teacher_steps"])
            student = accuracy(entry["rows"], step["student"], step["student_steps"])
            gap = None if teacher is None or student is None else round(student - teacher, 2)
            curve.append(
                {"task": entry["task"], **{k: v for k, v in step.items() if k != "teacher_path"}}
                | {"teacher_accuracy": teacher, "student_accuracy": student, "student_minus_teacher": gap}
            )
    return curve


def evaluate_rows(recipe: Recipe, datasets: dict, checkpoints: dict[str, Path], out_dir: Path) -> dict:
    """Score every row x task x decoder x knob value; write the per-sample logs and the report into `out_dir`.

    Returns the report (the content of `report.json`). `distill run`'s eval stage and `distill eval` both call this.
    """
    tasks = recipe.eval.tasks or recipe.data.task_names()
    rows_by_task: dict[str, list[dict]] = {task: [] for task in tasks}
    for row, checkpoint in checkpoints.items():
        teacher = load_teacher(recipe.teacher.name, checkpoint, recipe.teacher.dtype)
        hardware = hardware_name(teacher.device)
        for task in tasks:
            records = list(datasets[task]["eval"])
            if recipe.eval.max_samples is not None:
                records = records[: recipe.eval.max_samples]
            log = Path(row) / f"{task}.jsonl"
            sample_logs: list[dict] = []
            for decoder in row_decoders(recipe, row):
                gen_length = decoder.gen_length or recipe.data.max_response_tokens
                points = []
                # An `auto` sweep stops once accuracy has fallen past AUP's cut-off (eval/evaluate.py).
                for knob, result in sweep_decoder(
                    teacher,
                    records,
                    decoder,
                    gen_length,
                    recipe.eval.batch_size,
                    task=task,
                    row=row,
                    seed=recipe.run.seed,
                ):
                    sample_logs += [{"decoder": decoder.report_name, "knob": knob} | line for line in result.logs]
                    print(
                        f"[eval] {row:12s} {task:14s} {decoder.report_name} {decoder.knob}={knob}  "
                        f"accuracy {result.accuracy:6.2f}%  NFE {result.nfe:6.2f}  TPF {result.tpf:5.3f}  "
                        f"{result.tokens_per_s:8.1f} tok/s  ({result.samples} samples)"
                    )
                    points.append(
                        {
                            "knob": knob,
                            "tpf": result.tpf,
                            "accuracy": result.accuracy,
                            "nfe": result.nfe,
                            "tokens_per_s": result.tokens_per_s,
                            "samples": result.samples,
                            "seconds": result.seconds,
                            "log": str(log),
                        }
                    )
                status = sweep_status(decoder, gen_length, [(p["knob"], p["tpf"], p["accuracy"]) for p in points])
                if status["cut_short"]:
                    print(f"[eval] {row:12s} {task:14s} {decoder.report_name} cut short: {status['cut_short_reason']}")
                rows_by_task[task].append(
                    {
                        "name": row,
                        "decoder": decoder.report_name,
                        "decoder_name": decoder.name,
                        "knob_name": decoder.knob,
                        # The swept knob varies per point, so it is left out of the shared settings.
                        "settings": decoder.model_dump(
                            mode="json", exclude={"label", "sweep"} | ({decoder.knob} if decoder.sweep else set())
                        ),
                        "run": recipe.run.name,
                        "hardware": hardware,
                        "batch_size": recipe.eval.batch_size,
                        **status,
                        "points": points,
                    }
                )
            write_sample_log(sample_logs, out_dir / log)
    report = new_report(
        rows_by_task,
        run=recipe.run.name,
        alpha=recipe.eval.alpha,
        batch_size=recipe.eval.batch_size,
        recipe_hash=recipe.section_hash(*type(recipe).model_fields),
    )
    write_report(report, out_dir)
    for line in aup_lines(report):
        print(f"[eval] {line}")
    print(f"[eval] report: {out_dir / 'report.md'}")
    return report


def report_summary(report: dict) -> list[dict]:
    """The report's points, flattened for the run summary: one entry per task, row, decoder and knob value."""
    keys = ("knob", "accuracy", "nfe", "tpf", "tokens_per_s", "samples")
    return [
        {"task": entry["task"], "row": row["name"], "decoder": row["decoder"], "aup": row["aup"]}
        | {"cut_short": row["cut_short"]}
        | {key: point[key] for key in keys}
        for entry in report["tasks"]
        for row in entry["rows"]
        for point in row["points"]
    ]


def report_frontiers(report: dict) -> list[dict]:
    """Per task, each model's frontier and the headline ratios, as the report holds them (for the run summary)."""
    keys = ("task", "y_max", "y_max_row", "frontiers", "headline")
    return [{key: entry[key] for key in keys} for entry in report["tasks"]]


def summary_lines(summary: dict, tolerance: float = 2.0) -> list[str]:
    """The run summary as printed lines: stage times, then per task, row and decoder its AUP and its fastest point
    that stays within `tolerance` points of the row's best accuracy (marked when its curve was cut short), then
    each model's frontier and the headline ratios (`eval.report.frontier_lines`), then the output paths."""
    stages = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in summary["stage_seconds"].items())
    lines = [f"{summary['run']}: {summary['total_seconds']:.0f} s ({stages})"]
    rows: dict[tuple[str, str, str], list[dict]] = {}
    for point in summary["results"]:
        rows.setdefault((point["task"], point["row"], point["decoder"]), []).append(point)
    if rows:
        lines.append(f"{'task':14s} {'row':14s} {'decoder':22s} {'AUP':>8s} {'accuracy':>9s} {'TPF':>6s}")
    for (task, row, decoder), points in rows.items():
        best = max(point["accuracy"] for point in points)
        fastest = max((point for point in points if point["accuracy"] >= best - tolerance), key=lambda p: p["tpf"])
        aup = "n/a" if points[0]["aup"] is None else f"{points[0]['aup']:.1f}"
        lines.append(
            f"{task:14s} {row:14s} {decoder:22s} {aup:>8s} {fastest['accuracy']:8.2f}% {fastest['tpf']:6.2f}"
            + ("  cut short" if points[0].get("cut_short") else "")
        )
    lines += frontier_lines(summary.get("frontiers", []))
    lines += [f"{name}: {path}" for name, path in summary["checkpoints"].items()]
    return lines


# ----------------------------------------------------------------------------------------------------------------
# The run

STAGE_ORDER = ("teacher", "trajectories", "distill", "eval", "export")


def announce(recipe: Recipe, stage: str, start: float) -> None:
    """One line per stage on the main process (`[run] 2/5 trajectories (+212 s)`): the run's progress across
    stages, between the stages' own progress lines."""
    if is_main_process():
        stages = [name for name in STAGE_ORDER if name in recipe.run.stages]
        elapsed = time.perf_counter() - start
        print(f"[run] {stages.index(stage) + 1}/{len(stages)} {stage} (+{elapsed:.0f} s)", flush=True)


def run(recipe: Recipe) -> dict:
    """Execute the recipe's stages; returns the run summary (also written to `summary.json`)."""
    out_dir = Path(recipe.run.output_dir)
    stage_seconds: dict[str, float] = {}
    start = time.perf_counter()

    # ---- recipe and data ----------------------------------------------------------------------------------
    if is_main_process():
        write_resolved_recipe(recipe, out_dir)
    datasets = prepare_datasets(recipe, out_dir)
    stage_seconds["data"] = time.perf_counter() - start

    # ---- teacher ------------------------------------------------------------------------------------------
    checkpoints: dict[str, Path] = {}
    if "teacher" in recipe.run.stages:
        began = time.perf_counter()
        announce(recipe, "teacher", start)
        train_records = [record for task in datasets.values() for record in task["train"]]
        teacher_dir, ar_dir = resolve_teacher(recipe, train_records, out_dir)
        checkpoints = {"teacher": teacher_dir}
        if ar_dir is not None:
            checkpoints["ar-baseline"] = ar_dir
        stage_seconds["teacher"] = time.perf_counter() - began
    elif recipe.teacher.path is not None:
        checkpoints = {"teacher": recipe.teacher.path}

    # ---- trajectories -------------------------------------------------------------------------------------
    if "trajectories" in recipe.run.stages:
        began = time.perf_counter()
        announce(recipe, "trajectories", start)
        teacher_dir = checkpoints.get("teacher", out_dir / "teacher")
        generate_trajectories(recipe, teacher_dir, training_records(recipe, datasets), out_dir)
        stage_seconds["trajectories"] = time.perf_counter() - began

    # ---- distillation -------------------------------------------------------------------------------------
    if "distill" in recipe.run.stages:
        from distill.distill import distill_student  # imports DeepSpeed; only needed when training

        began = time.perf_counter()
        announce(recipe, "distill", start)
        teacher_dir = checkpoints.get("teacher", out_dir / "teacher")
        if recipe.distill.is_sdtt:
            # SDTT trains on the task sequences themselves: no trajectory set is read.
            records = [record for name in recipe.data.task_names() for record in datasets[name]["train"]]
        else:
            records = training_records(recipe, datasets)
            # Training refuses a set made by another teacher, tokenizer, data or decoder (the manifest must match).
            manifest = expected_manifest(recipe, teacher_dir, records)
            records = load_trajectories(out_dir / "trajectories", **manifest).to_list()
        checkpoints["student"] = distill_student(recipe, teacher_dir, records, out_dir)
        stage_seconds["distill"] = time.perf_counter() - began

    # ---- evaluation ---------------------------------------------------------------------------------------
    results: list[dict] = []
    frontiers: list[dict] = []
    if "eval" in recipe.run.stages and is_main_process():
        began = time.perf_counter()
        announce(recipe, "eval", start)
        rows = eval_rows(recipe, checkpoints)
        # An SDTT run also scores each round's starting teacher, for the curve of student vs teacher per round.
        schedule = sdtt_round_rows(recipe) if recipe.distill.is_sdtt and "student" in rows else []
        for step in schedule:
            if step["teacher_path"] and (Path(step["teacher_path"]) / "config.json").is_file():
                rows[step["teacher"]] = Path(step["teacher_path"])
        report = evaluate_rows(recipe, datasets, rows, out_dir / "eval")
        results, frontiers = report_summary(report), report_frontiers(report)
        if schedule:
            curve = sdtt_curve(report, schedule)
            write_json(out_dir / "eval" / "sdtt_curve.json", curve)
            for point in curve:
                print(
                    f"[eval] sdtt {point['task']} round {point['round']}: {point['teacher']} at "
                    f"{point['teacher_steps']} steps {point['teacher_accuracy']}% vs {point['student']} at "
                    f"{point['student_steps']} steps {point['student_accuracy']}%"
                )
        stage_seconds["eval"] = time.perf_counter() - began

    # ---- export -------------------------------------------------------------------------------------------
    if "export" in recipe.run.stages:
        if dist.is_available() and dist.is_initialized():
            dist.barrier()  # the checkpoint's files from every rank are on disk before rank 0 reads them
        if is_main_process():
            from distill.export import export_run  # imports DeepSpeed; only needed when exporting

            began = time.perf_counter()
            announce(recipe, "export", start)
            export_dir = recipe.export.out_dir or out_dir / "export"
            checkpoints["export"] = export_run(out_dir, export_dir, overwrite=recipe.export.overwrite, recipe=recipe)
            print(f"[export] {export_dir}" + (" (verified)" if recipe.export.verify else ""))
            stage_seconds["export"] = time.perf_counter() - began

    summary = {
        "run": recipe.run.name,
        "output_dir": str(out_dir),
        "stage_seconds": {name: round(value, 1) for name, value in stage_seconds.items()},
        "total_seconds": round(time.perf_counter() - start, 1),
        "checkpoints": {name: str(path) for name, path in checkpoints.items()},
        "results": results,
        "frontiers": frontiers,
    }
    if is_main_process():
        write_json(out_dir / "summary.json", summary)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return summary
