"""`distill run`: one recipe, executed top to bottom.

load recipe -> build data -> teacher (pretrain, reuse from cache, or load) -> trajectories -> distill the student
-> evaluate -> export -> summary.
Each arrow is one named call under a comment header in `run`. Before the first arrow, `check_before_work` runs every
check that can run before work (data files, the teacher's tokenizer and positions, what each stage needs from an
earlier run), so a refused run writes nothing; then the run directory is locked for the whole run (one `distill`
process per directory, `held_run_directory`). The module is long on purpose: the job and what it checks before it
starts read in one place, and the other verbs that write into a run directory (`trajectories`, `eval`) take the
same checks and lock from here. Everything lands in `run.output_dir`:

    distill.lock         while a distill process uses the directory: its lock, holding its pid
    recipe.yaml          the fully resolved recipe (written once the checks pass)
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
    eval/shards/<row>/<task>/ each rank's decoded batches of every point, kept as the cache a rerun reuses
                         (`eval/evaluate.py`)
    eval/lm_eval/        with `eval.lm_eval`: the lm-evaluation-harness sweeps' AUP report and per-document logs
                         (`eval/benchmarks.py`), or each row's `results.json`
    export/              the student as a Hugging Face folder that loads without fewstep (`export.out_dir`;
                         `distill/export.py`), verified
    summary.json         stage times, every report point, each model's frontier and the headline ratios
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

from distill.data import first_unusable
from distill.files import DirectoryLocked, lock_directory, temp_name, write_atomically, write_json
from distill.ranks import join_ranks
from distill.recipe import DecoderConfig, EvalDecoderConfig, FileSource, Recipe, RecipeError, dump_recipe
from distill.trajectories import (
    SET_DIR,
    attach_images,
    data_hash,
    expected_manifest,
    generate_trajectories,
    load_trajectories,
    training_records,
)
from eval.evaluate import SHARDS_DIR, EvalShards, model_identity, report_row, sweep_decoder, write_sample_log
from eval.report import aup_lines, frontier_lines, hardware_name, new_report, write_report
from eval.tasks import read_task_datasets, write_task_datasets
from eval.userdata import record_location
from teachers.interface import (
    Teacher,
    backbone_of,
    load_image_processor,
    load_teacher,
    load_tokenizer,
    mask_token_id_of,
    new_teacher,
)
from teachers.manifest import check_manifest


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
            _fill_cache(cache, out_dir, key)
    return teacher_dir, ar_dir


def _fill_cache(cache: Path, out_dir: Path, key: str) -> None:
    """Copy the pretrained teacher and AR baseline into `cache`. The cache is shared by runs in other directories,
    so the copy is staged under a name of this process's own and renamed into place; when another run filled the
    same key first, its copy is kept (the same key is the same teacher)."""
    staging = temp_name(cache)
    staging.mkdir(parents=True)
    try:
        for name in ("teacher", "ar-baseline"):
            shutil.copytree(out_dir / name, staging / name)
        write_json(staging / "pretrain.json", {"key": key})
        if cache.exists() and not _pretrained_dirs(cache, key):
            shutil.rmtree(cache)  # an incomplete or stale copy under this key
        try:
            staging.rename(cache)
        except OSError:
            if not _pretrained_dirs(cache, key):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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

    Every rank of a launcher calls it, each with its own copy of each row's model: the ranks share out every
    point's batches and read each other's results from the shard files under `out_dir/shards/` (the cache a rerun
    reuses; `eval.evaluate.evaluate_sharded`), so all of them score the same points and stop the same sweeps. Rank
    0 alone prints, writes the per-sample logs and the report. Returns the report (the content of `report.json`) on
    every rank. `distill run`'s eval stage and `distill eval` both call this.
    """
    rank, world_size = join_ranks()
    main = rank == 0
    tasks = recipe.eval.tasks or recipe.data.task_names()
    rows_by_task: dict[str, list[dict]] = {task: [] for task in tasks}
    for row, checkpoint in checkpoints.items():
        teacher = load_teacher(recipe.teacher.name, checkpoint, recipe.teacher.dtype)
        model = model_identity(checkpoint, recipe.teacher.dtype, strict=recipe.run.strict_hash)
        # tokens/s is the whole world's (the slowest rank's time for every rank's tokens): the report says so.
        hardware = hardware_name(teacher.device) + (f" x {world_size} ranks" if world_size > 1 else "")
        for task in tasks:
            records = list(datasets[task]["eval"])
            if recipe.eval.max_samples is not None:
                records = records[: recipe.eval.max_samples]
            log = Path(row) / f"{task}.jsonl"
            shards = EvalShards(out_dir / SHARDS_DIR / row / task, model, rank, world_size)
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
                    shards=shards,
                ):
                    sample_logs += [{"decoder": decoder.report_name, "knob": knob} | line for line in result.logs]
                    reused = f", {result.reused_batches} batches reused" if result.reused_batches else ""
                    if main:
                        print(
                            f"[eval] {row:12s} {task:14s} {decoder.report_name} {decoder.knob}={knob}  "
                            f"accuracy {result.accuracy:6.2f}%  NFE {result.nfe:6.2f}  TPF {result.tpf:5.3f}  "
                            f"{result.tokens_per_s:8.1f} tok/s  ({result.samples} samples{reused})"
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
                run_name, batch_size = recipe.run.name, recipe.eval.batch_size
                scored = report_row(
                    row, decoder, gen_length, points, run=run_name, hardware=hardware, batch_size=batch_size
                )
                if scored["cut_short"] and main:
                    print(f"[eval] {row:12s} {task:14s} {decoder.report_name} cut short: {scored['cut_short_reason']}")
                rows_by_task[task].append(scored)
            if main:
                write_sample_log(sample_logs, out_dir / log)
                shards.prune()
    report = new_report(
        rows_by_task,
        run=recipe.run.name,
        alpha=recipe.eval.alpha,
        batch_size=recipe.eval.batch_size,
        recipe_hash=recipe.section_hash(*type(recipe).model_fields),
    )
    if main:
        write_report(report, out_dir)
        for line in aup_lines(report):
            print(f"[eval] {line}")
        print(f"[eval] report: {out_dir / 'report.md'}")
    return report


def benchmark_rows(recipe: Recipe, checkpoints: dict[str, Path], out_dir: Path) -> dict | None:
    """With `eval.lm_eval`: lm-evaluation-harness on the eval rows with their decoders, into `out_dir`
    (`eval/benchmarks.py`); None without. `distill run`'s eval stage and `distill eval` end with it."""
    if recipe.eval.lm_eval is None:
        return None
    from eval.benchmarks import run_recipe_lm_eval  # imports lm-eval; only for recipes that use it

    decoders = {row: row_decoders(recipe, row) for row in checkpoints}
    return run_recipe_lm_eval(recipe, checkpoints, decoders, out_dir)


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
# Checks before work: whatever can be known to fail is refused before anything is written


TRAINING_STAGES = ("trajectories", "distill")  # and `teacher` when it pretrains


def check_before_work(recipe: Recipe, stages: Sequence[str]) -> dict:
    """Every check of the inputs of `stages` that can run before work; returns the task datasets, read or generated
    in memory (`write_task_datasets` stores them). Writes nothing.

    Refused with RecipeError (one line naming the field, or the file and row): a data file that cannot be read or
    holds no rows; no training records for a stage that trains, no eval records for a task the eval stage scores;
    no teacher for a stage that needs one; a record the teacher's tokenizer cannot encode, whose response exceeds
    the canvas or whose prompt plus canvas exceeds the model's positions; a stage whose input an earlier run must
    have written (a trajectory set, a checkpoint, an eval row) when it is missing. Outputs of an earlier run that
    this one would refuse to resume (pretraining checkpoints of another configuration, a trajectory set of another
    teacher or data) raise the ValueError the stage itself raises, before anything is written.
    """
    out_dir = Path(recipe.run.output_dir)
    try:
        datasets = read_task_datasets(recipe.data, recipe.run.seed, out_dir / "data")
    except ValueError as error:
        raise RecipeError(str(error)) from None
    pretrains = "teacher" in stages and recipe.teacher.path is None
    trains = [stage for stage in stages if stage in TRAINING_STAGES] + (["teacher"] if pretrains else [])
    eval_tasks = (recipe.eval.tasks or recipe.data.task_names()) if "eval" in stages else []
    _check_splits(recipe, datasets, trains, eval_tasks)
    teacher, positions = _tokenizing_teacher(recipe, stages, pretrains)
    if teacher is not None:
        _refuse_causal_objectives(recipe, teacher, stages, pretrains)
        eval_canvas = max(d.gen_length or recipe.data.max_response_tokens for d in recipe.eval.all_decoders())
        for task in recipe.data.task_names() if trains else []:
            canvas = recipe.data.max_response_tokens
            records = list(datasets[task]["train"])
            _refuse_unusable(recipe, task, first_unusable(teacher, records, canvas, positions, canvas))
        for task in eval_tasks:
            records = list(datasets[task]["eval"])[: recipe.eval.max_samples]
            _refuse_unusable(recipe, task, first_unusable(teacher, records, eval_canvas, positions))
    _check_earlier_outputs(recipe, stages, datasets, pretrains)
    if "eval" in stages and recipe.eval.lm_eval is not None:
        from eval.benchmarks import task_manager  # imports lm-eval; only for recipes that use it

        try:
            task_manager(recipe.eval.lm_eval)
        except ValueError as error:
            raise RecipeError(f"eval.lm_eval.{error}") from None
    return datasets


def _source_fields(recipe: Recipe) -> dict[str, tuple[str, Any]]:
    """Task name -> (its dotted recipe path, its config)."""
    fields = {task.name: (f"data.tasks.{index}", task) for index, task in enumerate(recipe.data.tasks)}
    return fields | {source.name: (f"data.files.{index}", source) for index, source in enumerate(recipe.data.files)}


def _check_splits(recipe: Recipe, datasets: dict, trains: list[str], eval_tasks: list[str]) -> None:
    fields = _source_fields(recipe)
    if trains and not any(len(datasets[task]["train"]) for task in recipe.data.task_names()):
        empty = [
            f"{path}.train_path is null" if isinstance(source, FileSource) else f"{path}.train_size is 0"
            for path, source in fields.values()
        ]
        raise RecipeError(f"data: the {trains[0]} stage has no training records ({', '.join(empty)})")
    for task in eval_tasks:
        if not len(datasets[task]["eval"]):
            path, source = fields[task]
            field = f"{path}.eval_path is null" if isinstance(source, FileSource) else f"{path}.eval_size is 0"
            raise RecipeError(
                f"{field}: the eval stage has no eval records of task '{task}' (give it some, or leave it out of "
                "eval.tasks)"
            )


def _tokenizing_teacher(recipe: Recipe, stages: Sequence[str], pretrains: bool) -> tuple[Teacher | None, int | None]:
    """The teacher's tokenizer (behind `Teacher`, without weights) and its positions, from the checkpoint the run
    will use, or from the model `teacher.pretrain` builds; (None, None) when there is none yet and no stage needs one.
    Refuses a stage that needs a teacher when there is none."""
    teacher_dir = Path(recipe.teacher.path or Path(recipe.run.output_dir) / "teacher")
    if pretrains:
        # The very model pretraining starts from (tiny by construction): its tokenizer and its positions. Its
        # random weights are drawn under a forked RNG, so the checks leave the global one as they found it.
        with torch.random.fork_rng(devices=[]):
            built = new_teacher(recipe.teacher.name, recipe.teacher.pretrain.model.model_dump())
        return built, built.model.config.max_position_embeddings
    if (teacher_dir / "config.json").is_file():
        # A folder fewstep wrote is checked against its manifest (ManifestError, as loading it would raise); a
        # published one has none, so its weights' headers are read: a cut-off download is refused here too.
        check_manifest(teacher_dir)
        for weights in sorted(teacher_dir.glob("*.safetensors")):
            _check_safetensors(weights)
        backbone = backbone_of(teacher_dir)
        tokenizer = load_tokenizer(teacher_dir, backbone)
        config = backbone.config_class.from_pretrained(teacher_dir)
        positions = getattr(config, "max_position_embeddings", None)
        mask_id = mask_token_id_of(config, tokenizer, teacher_dir)
        return Teacher(None, tokenizer, backbone, mask_id, load_image_processor(teacher_dir, backbone)), positions
    needing = [stage for stage in stages if stage in TRAINING_STAGES]
    if "eval" in stages and "teacher" in recipe.eval.rows:
        needing.append("eval")
    if needing:
        raise RecipeError(
            f"teacher.path: the {needing[0]} stage needs a teacher and {teacher_dir} holds none; set teacher.path "
            "or add the teacher stage"
        )
    return None, None


def _refuse_causal_objectives(recipe: Recipe, teacher: Teacher, stages: Sequence[str], pretrains: bool) -> None:
    """The AR phase, the AR anchor and the `next_token` term read position i's logits for token i under causal
    attention: right for a shifted head (Dream, Dimple: position i-1 scores token i), a copy task for an unshifted
    one (LLaDA: position i sees the token it scores). Refused before work rather than trained into nonsense."""
    if teacher.shifted:
        return
    why = f"{teacher.name}'s head scores token i at position i, which causal attention lets see token i (a copy task)"
    if pretrains:
        raise RecipeError(f"teacher.pretrain: the AR phase cannot train a {teacher.name} teacher: {why}")
    if "distill" in stages and any(term.kind == "next_token" for term in recipe.distill.losses):
        raise RecipeError(f"distill.losses: next_token cannot train a {teacher.name} student: {why}")


def _check_safetensors(path: Path) -> None:
    """Refuse an empty, truncated or unreadable safetensors file (its header is read, not its tensors)."""
    try:
        with safe_open(path, framework="np"):
            pass
    except (SafetensorError, OSError) as error:
        detail = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise RecipeError(f"teacher.path: {path} is not a readable safetensors file ({detail})") from None


def _refuse_unusable(recipe: Recipe, task: str, found: tuple[dict, str] | None) -> None:
    if found is None:
        return
    record, problem = found
    path, source = _source_fields(recipe)[task]
    where = record_location(source, record["id"]) if isinstance(source, FileSource) else f"{path} ({task})"
    raise RecipeError(f"{where}: record {record['id']}: {problem}")


def _check_earlier_outputs(recipe: Recipe, stages: Sequence[str], datasets: dict, pretrains: bool) -> None:
    """What each stage reads from an earlier run (this run produces none of it): it must exist, and checkpoints or
    trajectories this run would resume must have been written for this recipe."""
    out_dir = Path(recipe.run.output_dir)
    teacher_dir = Path(recipe.teacher.path or out_dir / "teacher")
    produced = {"teacher"} if "teacher" in stages else set()
    produced |= {"ar-baseline"} if pretrains else set()
    produced |= {"student"} if "distill" in stages else set()
    if pretrains:
        train_records = [record for task in datasets.values() for record in task["train"]]
        _check_pretraining_resumable(recipe, train_records)
    if "distill" in stages and not recipe.distill.is_sdtt and "trajectories" not in stages:
        set_dir = out_dir / SET_DIR
        if not set_dir.is_dir():
            raise RecipeError(
                f"run.stages: the distill stage trains on the trajectory set {set_dir}, which does not exist; add the "
                "trajectories stage"
            )
        if not pretrains:  # a teacher pretrained by this run has no hash yet
            records = training_records(recipe, datasets)
            load_trajectories(set_dir, **expected_manifest(recipe, teacher_dir, records))
    if "eval" in stages:
        for row in recipe.eval.rows:
            path = teacher_dir if row == "teacher" else out_dir / row
            if row not in produced and not (path / "config.json").is_file():
                raise RecipeError(
                    f"eval.rows: no checkpoint for row '{row}' at {path}, and no stage of this run makes one"
                )
        for index, checkpoint in enumerate(recipe.eval.checkpoints):
            inside_run = Path(checkpoint.path).resolve().is_relative_to(out_dir.resolve())
            if not inside_run and not (Path(checkpoint.path) / "config.json").is_file():
                raise RecipeError(f"eval.checkpoints.{index}.path: {checkpoint.path} is not a model checkpoint")
    if "export" in stages and "distill" not in stages:
        from distill.trainer import list_checkpoints  # imports DeepSpeed, as the export stage does

        checkpoint_dir = out_dir / "distill" / "checkpoints"
        if not any(complete for _, _, complete in list_checkpoints(checkpoint_dir)):
            raise RecipeError(
                f"run.stages: the export stage exports a distillation checkpoint and {checkpoint_dir} holds none; "
                "add the distill stage"
            )


def _check_pretraining_resumable(recipe: Recipe, train_records: list[dict]) -> None:
    """The pretraining phases' refusal to resume checkpoints of another configuration, checked before work (only
    when the teacher is not reused: a reused one trains nothing)."""
    out_dir = Path(recipe.run.output_dir)
    key = teacher_key(recipe, train_records)
    cache = recipe.run.cache_dir / f"teacher-{key}" if recipe.run.cache_dir else None
    if _pretrained_dirs(out_dir, key) or (cache is not None and _pretrained_dirs(cache, key)):
        return
    spec = recipe.teacher.pretrain
    for phase, config in (("ar", spec.ar), ("diffusion", spec.diffusion)):
        checkpoint_dir = out_dir / f"pretrain-{phase}" / "checkpoints"
        if config.max_steps == 0 or config.resume == "never" or not checkpoint_dir.is_dir():
            continue
        from distill.pretrain import pretrain_fingerprint  # imports DeepSpeed; only when there are checkpoints
        from distill.trainer import foreign_checkpoints, list_checkpoints, read_marker, run_fingerprint

        complete = [path for _, path, done in list_checkpoints(checkpoint_dir) if done]
        # A damaged marker reads as none: the trainer reports it.
        written_by = read_marker(complete[-1]).get("fingerprint") if complete else None
        fingerprint = run_fingerprint(config, phase, pretrain_fingerprint(recipe, phase))
        if written_by is not None and written_by != fingerprint:
            raise foreign_checkpoints(phase, checkpoint_dir, written_by, fingerprint)


@contextmanager
def held_run_directory(out_dir: Path) -> Iterator[None]:
    """Hold the run directory's lock for the block on the main process (the other ranks of a launcher follow it
    through their barriers): a second `distill` on the directory is refused, naming the holder's pid."""
    if not is_main_process():
        yield
        return
    with ExitStack() as stack:
        try:
            stack.enter_context(lock_directory(out_dir))
        except DirectoryLocked as error:
            raise RecipeError(f"run.output_dir: {error}; wait for it to finish or use another run.output_dir") from None
        yield


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

    # ---- checks before work: a refused run writes nothing ---------------------------------------------------
    datasets = check_before_work(recipe, recipe.run.stages)
    with held_run_directory(out_dir):
        # ---- recipe and data ------------------------------------------------------------------------------
        rank, world_size = join_ranks()
        if rank == 0:
            write_resolved_recipe(recipe, out_dir)
            write_task_datasets(datasets, recipe.data, recipe.run.seed, out_dir / "data")
        if world_size > 1:
            dist.barrier()  # every rank holds the same datasets in memory; rank 0 alone writes them
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
            task_records = None
            if recipe.distill.reads_task_records:  # SDTT, or a regulariser with `source: task`
                task_records = [record for name in recipe.data.task_names() for record in datasets[name]["train"]]
            if recipe.distill.is_sdtt:
                # SDTT trains on the task sequences themselves: no trajectory set is read.
                records = task_records
            else:
                records = training_records(recipe, datasets)
                # Training refuses a set made by another teacher, tokenizer, data or decoder (the manifest must match).
                manifest = expected_manifest(recipe, teacher_dir, records)
                rows = load_trajectories(out_dir / "trajectories", **manifest).to_list()
                records = attach_images(rows, records)
            checkpoints["student"] = distill_student(recipe, teacher_dir, records, out_dir, task_records)
            stage_seconds["distill"] = time.perf_counter() - began

        # ---- evaluation ---------------------------------------------------------------------------------------
        results: list[dict] = []
        frontiers: list[dict] = []
        if "eval" in recipe.run.stages:
            # Every rank decodes its share of the eval (`evaluate_rows`); rank 0 alone writes and prints.
            began = time.perf_counter()
            announce(recipe, "eval", start)
            if world_size > 1:
                dist.barrier()  # the checkpoints every rank loads are on disk (a cached teacher is copied by rank 0)
            rows = eval_rows(recipe, checkpoints)
            # An SDTT run also scores each round's starting teacher, for the curve of student vs teacher per round.
            schedule = sdtt_round_rows(recipe) if recipe.distill.is_sdtt and "student" in rows else []
            for step in schedule:
                if step["teacher_path"] and (Path(step["teacher_path"]) / "config.json").is_file():
                    rows[step["teacher"]] = Path(step["teacher_path"])
            report = evaluate_rows(recipe, datasets, rows, out_dir / "eval")
            results, frontiers = report_summary(report), report_frontiers(report)
            if schedule and rank == 0:
                curve = sdtt_curve(report, schedule)
                write_json(out_dir / "eval" / "sdtt_curve.json", curve)
                for point in curve:
                    print(
                        f"[eval] sdtt {point['task']} round {point['round']}: {point['teacher']} at "
                        f"{point['teacher_steps']} steps {point['teacher_accuracy']}% vs {point['student']} at "
                        f"{point['student_steps']} steps {point['student_accuracy']}%"
                    )
            if rank == 0:
                # lm-eval runs in rank 0's process alone; the other ranks wait at the next barrier (export's or
                # the run's last), within the process group's timeout.
                benchmark_rows(recipe, rows, out_dir / "eval" / "lm_eval")
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
                checkpoints["export"] = export_run(
                    out_dir, export_dir, overwrite=recipe.export.overwrite, recipe=recipe
                )
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
