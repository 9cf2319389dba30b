"""Standard benchmarks: lm-evaluation-harness runs of a fewstep model, and decoder sweeps of its tasks into AUP reports.

`distill lm-eval` (`lm_eval_command`) and the end of `distill run`'s eval stage (`eval.lm_eval`, `run_recipe_lm_eval`)
come here. The harness itself is lm-eval's (`simple_evaluate`, its task index, filters and metrics); the model is
`eval.lm_eval.FewstepLM`, built once per checkpoint and handed to the harness as an object.

- One run (`single_run`): the harness once at the model's decoder settings, any task type. `results.json` holds the
  harness's results with each task's NFE, TPF and tokens/s beside them, and `<task>.jsonl` one line per document
  (prompt, output, target, the metric's value, NFE, generated tokens).
- A sweep (`sweep_rows`): one harness run per value of a decoder's knob (`EvalDecoderConfig.settings`: an `auto`
  ladder from one token per forward, stopping for each task once its accuracy fell past AUP's cut-off, or the
  pinned values), over the tasks still sweeping. Each task's accuracy (the harness's metric, in percent) and TPF
  become a point of fewstep's AUP report, built and written by `eval/report.py` (same schema, frontier, plots).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from lm_eval.utils import handle_non_serializable, make_table

from distill.files import write_atomically
from distill.recipe import DecoderConfig, EvalDecoderConfig, LmEvalConfig, Recipe
from eval.aup import fell_past_cutoff
from eval.evaluate import report_row, write_sample_log
from eval.lm_eval import FewstepLM, model_settings
from eval.report import aup_lines, hardware_name, new_report, write_report

RESULTS_FILE = "results.json"
# `LmEvalConfig` fields that are model args for `distill lm-eval` (and the recipe's for `distill run`).
MODEL_FIELDS = {"sweep", "mc_num", "batch_size", "gen_length"}


# ----------------------------------------------------------------------------------------------------------------
# The harness


def task_manager(config: LmEvalConfig) -> TaskManager:
    """The harness's task index for `config.tasks`: `include_path` alone when it defines them all (indexing the
    harness's ~15k built-in tasks takes seconds), else the built-in tasks too. ValueError naming an unknown task."""
    include = str(config.include_path) if config.include_path is not None else None
    manager = TaskManager(include_path=include, include_defaults=False) if include else None
    if manager is None or any(task not in manager.all_tasks for task in config.tasks):
        manager = TaskManager(include_path=include)
    unknown = [task for task in config.tasks if task not in manager.all_tasks]
    if unknown:
        where = f" nor under include_path {config.include_path}" if include else ""
        raise ValueError(f"tasks: '{unknown[0]}' is not an lm-eval task or group{where}")
    return manager


def run_harness(lm: FewstepLM, config: LmEvalConfig, manager: TaskManager, tasks: list[str]) -> dict[str, Any]:
    """One `simple_evaluate` of `lm` on `tasks` (per-document samples kept); `lm.measurements` then holds this
    run's generation requests only. The process's global RNGs are left alone (fewstep's decoding and ELBO draw
    from their own seeded generators); few-shot examples are drawn with the harness's default seed."""
    lm.measurements.clear()
    limit = None if config.limit is None else (int(config.limit) if config.limit >= 1 else config.limit)
    return simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=config.num_fewshot,
        limit=limit,
        task_manager=manager,
        apply_chat_template=config.apply_chat_template,
        fewshot_as_multiturn=config.fewshot_as_multiturn,
        confirm_run_unsafe_code=config.confirm_run_unsafe_code,
        log_samples=True,
        random_seed=None,
        numpy_random_seed=None,
        torch_random_seed=None,
    )


def covered_tasks(results: dict[str, Any], names: list[str]) -> dict[str, set[str]]:
    """Each requested name with the harness tasks it covers: itself, and a group's subtasks at every depth."""
    groups = results.get("group_subtasks", {})

    def walk(name: str) -> set[str]:
        return {name}.union(*(walk(sub) for sub in groups.get(name, [])))

    return {name: walk(name) for name in names}


def accuracy(results: dict[str, Any], task: str, metric: str | None) -> tuple[str, float]:
    """`(metric, accuracy in percent)` of `task` in the harness's results: `metric` (as the harness names it, with
    its filter: `exact_match,strict-match`), or the first metric the task reports."""
    scores = results["results"].get(task, {})
    names = [
        name
        for name, value in scores.items()
        if "," in name and "_stderr," not in name and isinstance(value, int | float) and not isinstance(value, bool)
    ]
    if metric is None and names:
        metric = names[0]
    if metric not in names:
        have = ", ".join(names) or "none"
        raise ValueError(f"metric: task '{task}' reports no metric '{metric}' (it reports: {have})")
    value = float(scores[metric])
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"metric: '{metric}' of task '{task}' is {value}, not an accuracy in [0, 1]")
    return metric, 100.0 * value


def sample_lines(results: dict[str, Any], covered: set[str], speed: TaskSpeed, metric: str) -> list[dict]:
    """One log line per document of the covered tasks: prompt, output, target, the metric's value, NFE and
    generated tokens (generation requests only)."""
    name = metric.split(",", 1)[0]
    lines = []
    for task in sorted(covered & set(results.get("samples", {}))):
        for sample in results["samples"][task]:
            first = sample["arguments"][0]
            measured = speed.per_doc.get((task, sample["doc_id"]), {})
            lines.append(
                {
                    "task": task,
                    "doc_id": sample["doc_id"],
                    "prompt": first[0],
                    "output": measured.get("output", sample["filtered_resps"][0]),
                    "target": sample["target"],
                    "correct": sample.get(name),
                    "nfe": measured.get("nfe"),
                    "generated": measured.get("generated"),
                }
            )
    return json.loads(json.dumps(lines, default=handle_non_serializable))


@dataclass
class TaskSpeed:
    """One task's decoding cost over a harness run, from `FewstepLM.measurements`."""

    requests: int = 0
    nfe: int = 0
    generated: int = 0
    seconds: float = 0.0
    per_doc: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)

    @property
    def tpf(self) -> float:
        """Generated tokens / forward passes over the task (long answers weigh more, as in `distill eval`)."""
        return self.generated / max(self.nfe, 1)

    def summary(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "nfe": self.nfe / max(self.requests, 1),
            "tpf": self.tpf,
            "tokens_per_s": self.generated / self.seconds if self.seconds else 0.0,
        }


def task_speeds(measurements: list[dict[str, Any]], tasks: dict[str, set[str]]) -> dict[str, TaskSpeed]:
    """Per reported task (`{name: the harness tasks it covers}`, a group covering its subtasks), its requests'
    NFE, generated tokens and decode time."""
    speeds = {name: TaskSpeed() for name in tasks}
    for entry in measurements:
        for name, covered in tasks.items():
            if entry["task"] in covered:
                speed = speeds[name]
                speed.requests += 1
                speed.nfe += entry["nfe"]
                speed.generated += entry["generated"]
                speed.seconds += entry["seconds"]
                speed.per_doc[(entry["task"], entry["doc_id"])] = entry
    return speeds


def model_facts(lm: FewstepLM) -> dict[str, Any]:
    """The model a harness run scored: its name and checkpoint, and how it scores likelihoods."""
    settings = lm.settings
    keys = ("name", "batch_size", "mc_num", "seed", "dtype")
    return {key: getattr(settings, key) for key in keys} | {"checkpoint": str(settings.checkpoint)}


def settings_hash(lm: FewstepLM, config: LmEvalConfig) -> str:
    """A short hash of everything a `distill lm-eval` report depends on (its `recipe_hash`): model, decoder and
    harness settings."""
    payload = {"model": model_facts(lm), "decoder": lm.settings.decoder.model_dump(mode="json")}
    payload["harness"] = config.model_dump(mode="json", exclude=MODEL_FIELDS)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# One run at the model's settings


def single_run(lm: FewstepLM, config: LmEvalConfig, manager: TaskManager, out_dir: Path) -> dict[str, Any]:
    """The harness once on every task at `lm`'s decoder settings; writes `results.json` and the per-document logs
    `<task>.jsonl` into `out_dir`, and prints the harness's table with each task's NFE and TPF. Returns the content
    of `results.json`."""
    results = run_harness(lm, config, manager, config.tasks)
    covered = covered_tasks(results, config.tasks)
    speeds = task_speeds(lm.measurements, covered)
    fewstep = {}
    for task in config.tasks:
        metric, value = accuracy(results, task, config.metric)
        fewstep[task] = {"metric": metric, "accuracy": value} | speeds[task].summary()
        write_sample_log(sample_lines(results, covered[task], speeds[task], metric), out_dir / f"{task}.jsonl")
    content = {
        "model": model_facts(lm),
        "decoder": lm.decoder.model_dump(mode="json"),
        "settings": config.model_dump(mode="json", exclude=MODEL_FIELDS),
        "fewstep": fewstep,
        "harness": {key: results.get(key) for key in ("results", "groups", "group_subtasks", "n-shot", "n-samples")},
        "versions": {"lm_eval": results.get("lm_eval_version"), "tasks": results.get("versions")},
    }
    write_atomically(out_dir / RESULTS_FILE, json.dumps(content, indent=2, default=handle_non_serializable) + "\n")
    print(make_table(results))
    for task, entry in fewstep.items():
        print(
            f"[lm-eval] {lm.settings.name} {task}: {entry['metric']} {entry['accuracy']:.2f}%  NFE {entry['nfe']:.2f}  "
            f"TPF {entry['tpf']:.3f}  ({entry['requests']} generation requests)"
        )
    return content


# ----------------------------------------------------------------------------------------------------------------
# Sweeps into the AUP report


def sweep_rows(
    lm: FewstepLM,
    decoders: list[EvalDecoderConfig],
    config: LmEvalConfig,
    manager: TaskManager,
    out_dir: Path,
    *,
    canvas: int,
    run: str,
) -> dict[str, list[dict]]:
    """Sweep each decoder's knob over the tasks (one harness run per value) and return `{task: [report row]}` for
    `lm`'s model, writing its per-document logs to `<out_dir>/<name>/<task>.jsonl` (each line names its decoder
    and knob value). A decoder's canvas is `config.gen_length`, else its own, else `canvas`. A task with no
    generation request cannot be swept (ValueError)."""
    name = lm.settings.name
    rows: dict[str, list[dict]] = {task: [] for task in config.tasks}
    logs: dict[str, list[dict]] = {task: [] for task in config.tasks}
    hardware = hardware_name(lm.teacher.device)
    for decoder in decoders:
        gen_length = config.gen_length or decoder.gen_length or canvas
        points: dict[str, list[dict]] = {task: [] for task in config.tasks}
        sweeping = list(config.tasks)
        for knob, setting in decoder.settings(gen_length):
            lm.decoder = DecoderConfig.model_validate(setting.model_dump() | {"gen_length": gen_length})
            results = run_harness(lm, config, manager, sweeping)
            covered = covered_tasks(results, sweeping)
            speeds = task_speeds(lm.measurements, covered)
            for task in sweeping:
                speed = speeds[task]
                if not speed.requests:
                    raise ValueError(
                        f"sweep: task '{task}' generates nothing (it scores likelihoods), so its accuracy does not "
                        "depend on the decoder; run it without a sweep"
                    )
                metric, value = accuracy(results, task, config.metric)
                summary = speed.summary()
                points[task].append(
                    {
                        "knob": knob,
                        "tpf": summary["tpf"],
                        "accuracy": value,
                        "nfe": summary["nfe"],
                        "tokens_per_s": summary["tokens_per_s"],
                        "samples": speed.requests,
                        "seconds": speed.seconds,
                        "log": f"{name}/{task}.jsonl",
                    }
                )
                lines = sample_lines(results, covered[task], speed, metric)
                logs[task] += [{"decoder": decoder.report_name, "knob": knob} | line for line in lines]
                print(
                    f"[lm-eval] {name:12s} {task:14s} {decoder.report_name} {decoder.knob}={knob}  {metric} "
                    f"{value:6.2f}%  NFE {summary['nfe']:6.2f}  TPF {summary['tpf']:5.3f}  ({speed.requests} requests)"
                )
            if decoder.sweep == "auto":
                # Each task's curve stops once its accuracy fell past AUP's cut-off, as `sweep_decoder` does.
                sweeping = [t for t in sweeping if not fell_past_cutoff([(p["tpf"], p["accuracy"]) for p in points[t]])]
            if not sweeping:
                break
        for task in config.tasks:
            row = report_row(
                name, decoder, gen_length, points[task], run=run, hardware=hardware, batch_size=lm.settings.batch_size
            )
            if row["cut_short"]:
                print(f"[lm-eval] {name:12s} {task:14s} {decoder.report_name} cut short: {row['cut_short_reason']}")
            rows[task].append(row)
    for task, lines in logs.items():
        write_sample_log(lines, out_dir / name / f"{task}.jsonl")
    return rows


def write_sweep_report(
    rows_by_task: dict[str, list[dict]],
    out_dir: Path,
    *,
    run: str,
    alpha: float,
    batch_size: int,
    recipe_hash: str | None,
) -> dict:
    """Score and write the AUP report of the swept rows (`eval/report.py`), print its AUP lines; returns it."""
    report = new_report(rows_by_task, run=run, alpha=alpha, batch_size=batch_size, recipe_hash=recipe_hash)
    write_report(report, out_dir)
    for line in aup_lines(report):
        print(f"[lm-eval] {line}")
    print(f"[lm-eval] report: {out_dir / 'report.md'}")
    return report


# ----------------------------------------------------------------------------------------------------------------
# Entry points


def prepare(model_args: dict[str, Any], config: LmEvalConfig, sweep: str | list[float] | None) -> tuple:
    """What `distill lm-eval` checks before loading weights: `(model settings, the swept decoder or None, the task
    index)`. One-line ValueErrors name the bad argument."""
    settings = model_settings(model_args)
    decoder = None
    if sweep is not None:
        fields = settings.decoder.model_dump(exclude={"gen_length"}) | {"sweep": sweep}
        try:
            decoder = EvalDecoderConfig.model_validate(fields)
        except ValueError as error:
            detail = error.errors()[0]["msg"] if hasattr(error, "errors") else str(error)
            raise ValueError(f"--sweep: {detail.removeprefix('Value error, ')}") from None
        for value, setting in decoder.settings(settings.decoder.gen_length):
            try:
                setting.check_lengths(settings.decoder.gen_length)
            except ValueError as error:
                raise ValueError(f"--sweep: {error} (value {value})") from None
    return settings, decoder, task_manager(config)


def lm_eval_command(prepared: tuple, config: LmEvalConfig, out_dir: Path) -> dict:
    """`distill lm-eval` after `prepare`: one harness run (`results.json`), or with a swept decoder a sweep of its
    knob into `report.{json,md,html}`, under `out_dir`."""
    settings, decoder, manager = prepared
    lm = FewstepLM.from_settings(settings)
    out_dir = Path(out_dir)
    if decoder is None:
        return single_run(lm, config, manager, out_dir)
    rows = sweep_rows(lm, [decoder], config, manager, out_dir, canvas=settings.decoder.gen_length, run=out_dir.name)
    return write_sweep_report(
        rows,
        out_dir,
        run=out_dir.name,
        alpha=3.0,
        batch_size=settings.batch_size,
        recipe_hash=settings_hash(lm, config),
    )


def run_recipe_lm_eval(
    recipe: Recipe, checkpoints: dict[str, Path], decoders: dict[str, list[EvalDecoderConfig]], out_dir: Path
) -> dict:
    """`distill run`'s `eval.lm_eval`: every eval row (`checkpoints`) with its report decoders, swept into
    `out_dir/report.*`, or with `sweep: false` run once at its first decoder's settings into
    `out_dir/<row>/results.json`. Returns the report (or `{row: results}`)."""
    config: LmEvalConfig = recipe.eval.lm_eval
    manager = task_manager(config)
    batch_size = config.batch_size or recipe.eval.batch_size
    rows_by_task: dict[str, list[dict]] = {task: [] for task in config.tasks}
    singles = {}
    for row, checkpoint in checkpoints.items():
        gen_length = config.gen_length or decoders[row][0].gen_length or recipe.data.max_response_tokens
        first = DecoderConfig.model_validate(
            decoders[row][0].model_dump(exclude={"label", "sweep"}) | {"gen_length": gen_length}
        )
        args = {"pretrained": checkpoint, "decoder": first, "batch_size": batch_size, "mc_num": config.mc_num}
        settings = model_settings(args | {"seed": recipe.run.seed, "dtype": recipe.teacher.dtype})
        settings.name = row
        lm = FewstepLM.from_settings(settings)
        if not config.sweep:
            singles[row] = single_run(lm, config, manager, out_dir / row)
            continue
        canvas = recipe.data.max_response_tokens
        for task, rows in sweep_rows(
            lm, decoders[row], config, manager, out_dir, canvas=canvas, run=recipe.run.name
        ).items():
            rows_by_task[task] += rows
    if not config.sweep:
        return singles
    return write_sweep_report(
        rows_by_task,
        out_dir,
        run=recipe.run.name,
        alpha=recipe.eval.alpha,
        batch_size=batch_size,
        recipe_hash=recipe.section_hash(*type(recipe).model_fields),
    )
