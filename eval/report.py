"""The AUP evaluation report: scored from evaluated points, written as JSON (for tools), Markdown and HTML (for people).

`report.json` (schema version 2; accuracy always in percent):

    {"schema_version": 2, "run": str, "created": ISO time,
     "hardware": str, "batch_size": int | null, "versions": {package: version}, "recipe_hash": str | null,
     "tasks": [{"task": str, "alpha": float,
                "y_max": float, "y_max_row": {"name", "decoder", "knob"},     # the row and point that set y_max
                "rows": [{"name": str, "decoder": str, "decoder_name": str, "knob_name": str,
                          "settings": {...},                      # decoder settings, the swept knob left out
                          "aup": float | null, "aup_error": str (only when aup is null),
                          "sweep": "auto" | "pinned", "one_token_knob": number | null,
                          "cut_short": bool, "cut_short_reason": str | null,
                          "run": str, "hardware": str, "batch_size": int,
                          "points": [{"knob", "tpf", "accuracy", "nfe", "tokens_per_s", "samples", "seconds",
                                      "log"}]}],
                "frontiers": [{"name": str,                       # one per model, in row order
                               "aup": float | null, "decoder": str | null,   # its best decoder's AUP: the score
                               "pareto_aup": float | null,        # AUP of the Pareto frontier over all its points
                               "pareto": [{"decoder", "knob", "tpf", "accuracy"}],
                               "one_token": {"decoder", "knob_name", "knob", "tpf", "accuracy", "aup"} | null,
                               "cut_short": bool | null}],
                "headline": {"y_max", "y_max_row", "student_frontier_aup", "student_decoder",
                             "teacher_frontier_aup", "teacher_decoder", "teacher_one_token",
                             "frontier_ratio", "one_token_ratio", "cut_short": [model names],
                             "teacher_parallel": {"decoder", "knob", "tpf", "accuracy"} | null,
                             "matched": {"accuracy", "teacher_best", "student_best", "accuracy_drop",
                                         "teacher": point, "student": point | null,   # point: {"decoder",
                                         "tpf_ratio": float | null}} | null}],        #  "knob", "tpf", "accuracy"}
     "sources": [...]}                                                    # only in merged reports

`name` is the model row (`teacher`, `ar-baseline`, `student` or a checkpoint's name), `decoder` the decoder's label,
`knob` the value of the decoder's swept setting (`knob_name`: `steps` or `threshold`) at that point, `log` the
per-sample JSONL relative to the report's directory (one file per row and task; its lines carry `decoder`, `knob`,
`prompt`, `output`, `answer`, `correct`, `nfe`, `generated`). `y_max` is the best
accuracy on the task over every row of the report, so merging reports rescores them. `batch_size` and
`recipe_hash` are null in a merged report whose sources differ (each row keeps its own hardware and batch size).

Frontier scoring (DESIGN.md, "Comparing models with AUP honestly"): `sweep` says how a row's knob was swept
(`eval/evaluate.py:sweep_status`), `one_token_knob` is the knob value that decodes one token per forward, and
`cut_short` marks a curve that lacks that value or stopped before its accuracy fell past AUP's cut-off (null in a
version-1 report, which did not record it). A model's score is its best decoder's AUP; `pareto_aup` scores the
points no decoder of it beats. `one_token` is the model's one-token-per-forward point with the best AUP (that
point's AUP alone, TPF x accuracy). `headline` (when the task has a `teacher` and a `student`) holds the two
ratios: `frontier_ratio` = student frontier AUP / teacher frontier AUP (the honest comparison) and
`one_token_ratio` = student frontier AUP / the teacher's one-token-per-forward AUP (d3LLM's comparison with the
vanilla-decoded teacher), both against the task's `y_max`; `cut_short` names the compared models with a curve
cut short; `teacher_parallel` is the fastest point of a teacher curve that ran its whole ladder without falling
past the cut-off (null when every teacher curve fell): such a teacher is already parallel on the task, and the
report says so, since a student can then gain little on the frontier. `matched` is the speed-up at equal accuracy:
`accuracy` = the teacher's best accuracy less `MATCHED_ACCURACY_MARGIN` (one point), `teacher` / `student` each
model's fastest point (any decoder) at or above it (`student` null when no point of it gets there), `tpf_ratio`
their TPF ratio, `accuracy_drop` = teacher best - student best. A frontier ratio bought by a student that is fast
but several points less accurate shows here as a missing or small equal-accuracy speed-up. Everything but the
rows' sweep fields is derived by `score_report`, which `load_report` reruns, so any report (version 1 too) reads
by today's scoring rules.

The module runs past 400 lines on purpose: the schema above, its scoring and its three renderings (JSON, Markdown,
HTML with the plot) stay in one file, so that a field is added in one place.
"""

from __future__ import annotations

import base64
import html
import io
import json
import platform
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from distill.files import write_atomically
from eval.aup import ACCURACY_DROP_LIMIT, MATCHED_ACCURACY_MARGIN, aup_score, fell_past_cutoff, pareto_front

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 lacks the sweep fields and frontiers; score_report adds what it can
REPORT_FILES = ("report.json", "report.md", "report.html")


# ----------------------------------------------------------------------------------------------------------------
# Where the numbers were measured


def hardware_name(device: torch.device | None = None) -> str:
    """The accelerator's name, or the CPU's model and the threads torch uses (tokens/s depends on both)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({torch.get_num_threads()} threads)"


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("fewstep", "torch", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


# ----------------------------------------------------------------------------------------------------------------
# Building and scoring


def new_report(tasks: dict[str, list[dict]], *, run: str, alpha: float, batch_size: int, recipe_hash: str) -> dict:
    """A scored report from `{task: [row, ...]}` (rows as described in the module docstring, without `aup`)."""
    hardware = sorted({row["hardware"] for rows in tasks.values() for row in rows})
    report = {
        "schema_version": SCHEMA_VERSION,
        "run": run,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware[0] if len(hardware) == 1 else "mixed: " + "; ".join(hardware),
        "batch_size": batch_size,
        "versions": library_versions(),
        "recipe_hash": recipe_hash,
        "tasks": [{"task": task, "alpha": alpha, "rows": rows} for task, rows in tasks.items()],
    }
    return score_report(report)


def score_report(report: dict) -> dict:
    """Set each task's `y_max` (best accuracy over all its rows), each row's AUP against it, each model's frontier
    and the headline ratios, in place."""
    for entry in report["tasks"]:
        best = None
        for row in entry["rows"]:
            for point in row["points"]:
                if best is None or point["accuracy"] > best[0]:
                    best = (point["accuracy"], {"name": row["name"], "decoder": row["decoder"], "knob": point["knob"]})
        entry["y_max"], entry["y_max_row"] = best if best else (None, None)
        for row in entry["rows"]:
            for key in ("sweep", "one_token_knob", "cut_short", "cut_short_reason"):
                row.setdefault(key, None)  # not recorded by a version-1 report
            row.pop("aup_error", None)
            try:
                points = [(point["tpf"], point["accuracy"]) for point in row["points"]]
                row["aup"] = aup_score(points, entry["y_max"], entry.get("alpha", 3.0))
            except ValueError as error:
                # Kept in the report rather than raised: one degenerate row (e.g. no token generated, TPF 0)
                # must not cost the whole evaluation.
                row["aup"], row["aup_error"] = None, str(error)
        entry["frontiers"] = model_frontiers(entry)
        entry["headline"] = headline(entry)
    return report


def _aup_or_none(points: list[tuple[float, float]], y_max: float | None, alpha: float) -> float | None:
    if y_max is None:  # a task without points
        return None
    try:
        return aup_score(points, y_max, alpha)
    except ValueError:  # e.g. TPF 0: no score, as for a degenerate row
        return None


def model_frontiers(entry: dict) -> list[dict]:
    """Per model (rows sharing a `name`), in row order: its score, the AUP of its best decoder; the Pareto frontier
    over the points of all its decoders and that frontier's AUP; its one-token-per-forward point (of the decoder
    where that point scores best); and whether any of its curves was cut short (null: not recorded)."""
    y_max, alpha = entry["y_max"], entry.get("alpha", 3.0)
    frontiers = []
    for name in dict.fromkeys(row["name"] for row in entry["rows"]):
        rows = [row for row in entry["rows"] if row["name"] == name]
        best = max((row for row in rows if row["aup"] is not None), key=lambda row: row["aup"], default=None)
        points = [(p["tpf"], p["accuracy"], row["decoder"], p["knob"]) for row in rows for p in row["points"]]
        front = pareto_front(points)
        one_token = None
        for row in rows:
            for point in row["points"]:
                if row["one_token_knob"] is None or point["knob"] != row["one_token_knob"]:
                    continue
                aup = _aup_or_none([(point["tpf"], point["accuracy"])], y_max, alpha)
                if aup is not None and (one_token is None or aup > one_token["aup"]):
                    one_token = {"decoder": row["decoder"], "knob_name": row["knob_name"], "knob": point["knob"]}
                    one_token |= {"tpf": point["tpf"], "accuracy": point["accuracy"], "aup": aup}
        flags = [row["cut_short"] for row in rows]
        frontiers.append(
            {
                "name": name,
                "aup": best["aup"] if best else None,
                "decoder": best["decoder"] if best else None,
                "pareto_aup": _aup_or_none([point[:2] for point in front], y_max, alpha),
                "pareto": [
                    {"decoder": label, "knob": knob, "tpf": tpf, "accuracy": y} for tpf, y, label, knob in front
                ],
                "one_token": one_token,
                "cut_short": True if True in flags else (None if None in flags else False),
            }
        )
    return frontiers


def headline(entry: dict) -> dict | None:
    """The two ratios of a task with a `teacher` and a `student` model (see the module docstring), else None."""
    models = {frontier["name"]: frontier for frontier in entry["frontiers"]}
    if "teacher" not in models or "student" not in models:
        return None
    student, teacher = models["student"], models["teacher"]

    def ratio(numerator: float | None, denominator: float | None) -> float | None:
        return None if numerator is None or not denominator else numerator / denominator

    one_token = teacher["one_token"]
    held = [
        point | {"decoder": row["decoder"]}
        for row in entry["rows"]
        if row["name"] == "teacher" and row["cut_short"] is False and row["points"]
        if not fell_past_cutoff([(point["tpf"], point["accuracy"]) for point in row["points"]])
        for point in row["points"]
    ]
    fastest = max(held, key=lambda point: (point["tpf"], point["accuracy"]), default=None)
    return {
        "y_max": entry["y_max"],
        "y_max_row": entry["y_max_row"],
        "student_frontier_aup": student["aup"],
        "student_decoder": student["decoder"],
        "teacher_frontier_aup": teacher["aup"],
        "teacher_decoder": teacher["decoder"],
        "teacher_one_token": one_token,
        "frontier_ratio": ratio(student["aup"], teacher["aup"]),
        "one_token_ratio": ratio(student["aup"], one_token["aup"] if one_token else None),
        "cut_short": [model["name"] for model in (student, teacher) if model["cut_short"]],
        "teacher_parallel": {key: fastest[key] for key in ("decoder", "knob", "tpf", "accuracy")} if fastest else None,
        "matched": matched_speedup(teacher, student),
    }


def matched_speedup(teacher: dict, student: dict) -> dict | None:
    """Student vs teacher at equal accuracy (see the module docstring), from the two models' frontiers: the fastest
    point at or above an accuracy lies on a model's Pareto frontier, and so does its best accuracy."""
    if not teacher["pareto"] or not student["pareto"]:
        return None
    teacher_best = max(point["accuracy"] for point in teacher["pareto"])
    student_best = max(point["accuracy"] for point in student["pareto"])
    target = teacher_best - MATCHED_ACCURACY_MARGIN

    def fastest(front: list[dict]) -> dict | None:
        held = [point for point in front if point["accuracy"] >= target]
        return dict(max(held, key=lambda point: point["tpf"])) if held else None

    teacher_point, student_point = fastest(teacher["pareto"]), fastest(student["pareto"])
    return {
        "accuracy": target,
        "teacher_best": teacher_best,
        "student_best": student_best,
        "accuracy_drop": teacher_best - student_best,
        "teacher": teacher_point,
        "student": student_point,
        "tpf_ratio": student_point["tpf"] / teacher_point["tpf"] if student_point and teacher_point["tpf"] else None,
    }


def load_report(path: Path) -> dict:
    """Read a `report.json` (or the one inside a run directory or its `eval/`), checking its schema version."""
    path = Path(path)
    for candidate in (path, path / "report.json", path / "eval" / "report.json"):
        if candidate.is_file():
            try:
                report = json.loads(candidate.read_text())
            except ValueError as error:
                raise ValueError(f"{candidate}: not valid JSON ({error})") from None
            if not isinstance(report, dict) or report.get("schema_version") not in READABLE_VERSIONS:
                expected = " or ".join(str(version) for version in READABLE_VERSIONS)
                raise ValueError(f"{candidate}: not a fewstep report (schema_version {expected} expected)")
            # Everything but the rows is derived: rescored, a report written by older code reads by today's rules.
            report = score_report(report) | {"schema_version": SCHEMA_VERSION}
            report["_dir"] = str(candidate.parent)
            return report
    raise FileNotFoundError(f"{path}: no report.json there or in {path / 'eval'}")


def merge_reports(reports: list[dict]) -> dict:
    """One report over the rows of several, rescored against the merged y_max; log paths become absolute.

    Rows are labelled with their source run; a row whose `(name, decoder)` repeats one already taken is renamed
    `<run>/<name>`.
    """
    tasks: dict[str, dict] = {}
    sources = []
    for report in reports:
        source_dir = Path(report.get("_dir", "."))
        sources.append({key: report.get(key) for key in ("run", "hardware", "batch_size", "versions", "recipe_hash")})
        sources[-1]["dir"] = str(source_dir)
        for entry in report["tasks"]:
            merged = tasks.setdefault(entry["task"], {"task": entry["task"], "alpha": entry["alpha"], "rows": []})
            if merged["alpha"] != entry["alpha"]:
                alphas = f"{merged['alpha']} and {entry['alpha']}"
                raise ValueError(f"task {entry['task']}: the reports use different AUP alpha ({alphas})")
            taken = {(row["name"], row["decoder"]) for row in merged["rows"]}
            for row in entry["rows"]:
                row = json.loads(json.dumps(row))
                row.setdefault("run", report.get("run"))
                if (row["name"], row["decoder"]) in taken:
                    row["name"] = f"{row['run']}/{row['name']}"
                for point in row["points"]:
                    if point.get("log"):
                        point["log"] = str((source_dir / point["log"]).resolve())
                merged["rows"].append(row)
                taken.add((row["name"], row["decoder"]))

    def common(key):
        values = {json.dumps(source[key], sort_keys=True) for source in sources}
        return sources[0][key] if len(values) == 1 else None

    hardware = sorted({source["hardware"] for source in sources})
    report = {
        "schema_version": SCHEMA_VERSION,
        "run": "+".join(str(source["run"]) for source in sources),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "hardware": hardware[0] if len(hardware) == 1 else "mixed: " + "; ".join(hardware),
        "batch_size": common("batch_size"),
        "versions": common("versions") or sources[0]["versions"],
        "recipe_hash": common("recipe_hash"),
        "tasks": list(tasks.values()),
        "sources": sources,
    }
    return score_report(report)


# ----------------------------------------------------------------------------------------------------------------
# Rendering


def aup_lines(report: dict) -> list[str]:
    """Console lines (what `distill eval` and `distill report` print): one per task x row x decoder with its AUP and
    whether its curve was cut short, then each model's frontier and the task's headline (`frontier_lines`)."""
    lines = []
    for entry in report["tasks"]:
        for row in entry["rows"]:
            aup = "n/a" if row["aup"] is None else f"{row['aup']:.2f}"
            cut = f"  cut short: {row['cut_short_reason']}" if row.get("cut_short") else ""
            lines.append(f"AUP {entry['task']:14s} {row['name']:20s} {row['decoder']:16s} {aup}{cut}")
    return lines + frontier_lines(report["tasks"])


def frontier_lines(tasks: list[dict]) -> list[str]:
    """Per task (entries holding `task`, `frontiers` and `headline`, as the report's): one line per model with its
    frontier AUP (best decoder) and Pareto-frontier AUP, then the headline. The run summary prints them too."""
    lines = []
    for entry in tasks:
        for model in entry["frontiers"]:
            cut = {True: "  cut short", None: "  (sweep not recorded)"}.get(model["cut_short"], "")
            lines.append(
                f"FRONTIER {entry['task']:14s} {model['name']:20s} AUP {_number(model['aup'], 1):>8s} "
                f"({model['decoder'] or 'no decoder scored'}), Pareto AUP {_number(model['pareto_aup'], 1)}{cut}"
            )
        if entry["headline"] is not None:
            lines.append(f"HEADLINE {entry['task']}: {headline_text(entry['headline'])}")
    return lines


def headline_text(headline: dict) -> str:
    """The two ratios in words, each with the AUPs it divides, and the y_max they were scored against."""
    student, teacher = _number(headline["student_frontier_aup"], 1), _number(headline["teacher_frontier_aup"], 1)
    one_token = headline["teacher_one_token"]
    at_one = "— (no one-token-per-forward point)"
    if one_token is not None:
        at_one = (
            f"{one_token['aup']:.1f} ({one_token['decoder']} {one_token['knob_name']}={one_token['knob']}: "
            f"{one_token['accuracy']:.2f}% at TPF {one_token['tpf']:.2f})"
        )
    source = headline["y_max_row"] or {}
    text = (
        f"frontier vs frontier: student AUP {student} ({headline['student_decoder']}) / teacher AUP {teacher} "
        f"({headline['teacher_decoder']}) = {_ratio(headline['frontier_ratio'])}; "
        f"vs the teacher at one token per forward (d3LLM's comparison): {student} / {at_one} = "
        f"{_ratio(headline['one_token_ratio'])}; "
        f"y_max {_number(headline['y_max'])}% ({source.get('name')} · {source.get('decoder')} at {source.get('knob')})"
    )
    matched = headline["matched"]
    if matched:
        text += f"; {matched_text(matched)}"
    if headline["cut_short"]:
        text += f"; cut short: {', '.join(headline['cut_short'])} (a ratio of curves that stopped early)"
    parallel = headline["teacher_parallel"]
    if parallel:
        text += (
            f"; the teacher is already parallel: its {parallel['decoder']} curve never fell past the cut-off, "
            f"{_number(parallel['accuracy'])}% at TPF {_number(parallel['tpf'])} at the end of its ladder "
            "(little for a student to gain)"
        )
    return text


def matched_text(matched: dict) -> str:
    """The equal-accuracy comparison in words: the accuracy it is measured at, both fastest points, their ratio."""
    teacher, student = matched["teacher"], matched["student"]
    text = (
        f"at equal accuracy (>= {matched['accuracy']:.2f}%, the teacher's best less {MATCHED_ACCURACY_MARGIN:g} "
        f"point): teacher TPF {teacher['tpf']:.2f} ({teacher['decoder']} at {teacher['knob']}: "
        f"{teacher['accuracy']:.2f}%), "
    )
    if student is None:
        return text + (
            f"the student never gets there (best {matched['student_best']:.2f}%, "
            f"{matched['accuracy_drop']:.2f} points below the teacher's best)"
        )
    return text + (
        f"student TPF {student['tpf']:.2f} ({student['decoder']} at {student['knob']}: {student['accuracy']:.2f}%) = "
        f"{_ratio(matched['tpf_ratio'])}"
    )


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}x"


def _number(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _cut_short_cell(flag: bool | None, reason: str | None = None) -> str:
    if flag is None:
        return "? (not recorded)"
    return f"yes: {reason}" if flag and reason else ("yes" if flag else "no")


def plot_task(entry: dict) -> bytes:
    """PNG of accuracy (%) against TPF for one task: each model's Pareto frontier over all its decoders (bold,
    labelled with its frontier AUP), over its decoders' own curves (thin, dotted, same colour)."""
    figure = Figure(figsize=(6.4, 4.2), dpi=110)
    FigureCanvasAgg(figure)  # render with Agg explicitly: no display, no global pyplot state
    axes = figure.add_subplot()
    for index, model in enumerate(entry["frontiers"]):
        colour = f"C{index % 10}"
        for row in entry["rows"]:
            if row["name"] == model["name"]:
                points = sorted((point["tpf"], point["accuracy"]) for point in row["points"])
                axes.plot([p[0] for p in points], [p[1] for p in points], ":", marker=".", color=colour, alpha=0.5)
        label = f"{model['name']}: AUP {_number(model['aup'], 1)} ({model['decoder']})"
        label += f", Pareto {_number(model['pareto_aup'], 1)}"
        label += ", cut short" if model["cut_short"] else ""
        front = model["pareto"]
        axes.plot([p["tpf"] for p in front], [p["accuracy"] for p in front], marker="o", color=colour, label=label)
    accuracies = {point["accuracy"] for row in entry["rows"] for point in row["points"]}
    if len(accuracies) == 1:  # a flat report: give the axis a readable range around the one value
        level = accuracies.pop()
        axes.set_ylim(max(0.0, level - 5), min(100.0, level + 5) if level < 100 else 101)
    if entry["y_max"] is not None:
        axes.axhline(entry["y_max"], color="grey", linestyle="--", linewidth=0.8, label=f"y_max {entry['y_max']:.2f}%")
    axes.set_xlabel("tokens per forward (TPF)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(f"{entry['task']}: each model's frontier (dotted: its decoders)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _y_max_note(entry: dict) -> str:
    if entry["y_max"] is None:
        return "no points"
    source = entry["y_max_row"]
    return f"{entry['y_max']:.2f}% ({source['name']} · {source['decoder']} at {source['knob']})"


def _header_lines(report: dict) -> list[str]:
    versions = ", ".join(f"{name} {version}" for name, version in report["versions"].items())
    drop = f"{ACCURACY_DROP_LIMIT:g}"
    return [
        f"run `{report['run']}` · recipe hash `{report['recipe_hash']}` · created {report['created']}",
        f"hardware: {report['hardware']} · batch size: {report['batch_size']} · {versions}",
        "AUP: trapezoid area under accuracy vs TPF, each accuracy weighted by W(y) = min(exp(-α(1 - y/y_max)), 1), "
        f"with y_max the best accuracy on the task over all rows of this report; points more than {drop} below the "
        "lowest-TPF accuracy are ignored. Accuracy in percent.",
        "Frontier scoring: every decoder's curve starts at one token per forward and its knob is swept until "
        f"accuracy falls more than {drop} points below that first point (a curve that does not is marked cut "
        "short); a model's score is its best decoder's AUP, and the Pareto AUP scores the points no decoder of it "
        "beats.",
    ]


def _headline_lines(report: dict) -> list[str]:
    return [
        f"{entry['task']}: {headline_text(entry['headline'])}"
        for entry in report["tasks"]
        if entry["headline"] is not None
    ]


# Each table is defined once, as (header, numeric column flags, rows of cell strings), and rendered twice.
FRONTIER_COLUMNS = (
    ("model", False),
    ("frontier AUP", True),
    ("best decoder", False),
    ("Pareto AUP", True),
    ("one token per forward", False),
    ("cut short", False),
)
SUMMARY_COLUMNS = (
    ("row", False),
    ("decoder", False),
    ("sweep", False),
    ("AUP", True),
    ("best accuracy %", True),
    ("max TPF", True),
    ("cut short", False),
)
POINT_COLUMNS = (
    ("row", False),
    ("decoder", False),
    ("knob", False),
    ("accuracy %", True),
    ("TPF", True),
    ("NFE", True),
    ("tokens/s", True),
    ("samples", True),
)


def _frontier_rows(entry: dict) -> list[list[str]]:
    rows = []
    for model in entry["frontiers"]:
        one_token = model["one_token"]
        at_one = "—"
        if one_token is not None:
            at_one = (
                f"{one_token['decoder']} {one_token['knob_name']}={one_token['knob']}: {one_token['accuracy']:.2f}% "
                f"at TPF {one_token['tpf']:.2f} (AUP {one_token['aup']:.1f})"
            )
        cut = [row["decoder"] for row in entry["rows"] if row["name"] == model["name"] and row["cut_short"]]
        cells = [model["name"], _number(model["aup"]), model["decoder"] or "—", _number(model["pareto_aup"])]
        rows.append(cells + [at_one, _cut_short_cell(model["cut_short"], ", ".join(cut))])
    return rows


def _summary_rows(entry: dict) -> list[list[str]]:
    rows = []
    for row in entry["rows"]:
        best = max(point["accuracy"] for point in row["points"])
        fastest = max(point["tpf"] for point in row["points"])
        aup = _number(row["aup"]) if row["aup"] is not None else f"— ({row['aup_error']})"
        sweep = row["sweep"] or "?"
        cut = _cut_short_cell(row["cut_short"], row["cut_short_reason"])
        rows.append([row["name"], row["decoder"], sweep, aup, f"{best:.2f}", f"{fastest:.2f}", cut])
    return rows


def _point_rows(entry: dict) -> list[list[str]]:
    return [
        [
            row["name"],
            row["decoder"],
            f"{row['knob_name']}={point['knob']}",
            f"{point['accuracy']:.2f}",
            f"{point['tpf']:.3f}",
            f"{point['nfe']:.2f}",
            f"{point['tokens_per_s']:.1f}",
            str(point["samples"]),
        ]
        for row in entry["rows"]
        for point in row["points"]
    ]


def _markdown_table(columns: tuple, rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(name for name, _ in columns) + " |"]
    lines.append("|" + "|".join("---:" if numeric else "---" for _, numeric in columns) + "|")
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return lines


def _html_table(columns: tuple, rows: list[list[str]]) -> list[str]:
    """The table as HTML parts: the header row, one part per row, the closing tag."""
    header = "".join(f"<th>{html.escape(name)}</th>" for name, _ in columns)
    parts = [f"<table><tr>{header}</tr>"]
    for cells in rows:
        tds = (
            f"<td class=n>{html.escape(cell)}</td>" if numeric else f"<td>{html.escape(cell)}</td>"
            for cell, (_, numeric) in zip(cells, columns, strict=True)
        )
        parts.append("<tr>" + "".join(tds) + "</tr>")
    return parts + ["</table>"]


def render_markdown(report: dict) -> str:
    lines = ["# fewstep evaluation report", ""]
    lines += [line + "  " for line in _header_lines(report)] + [""]
    headlines = _headline_lines(report)
    if headlines:
        lines += ["## Headline", ""] + [f"- {line}" for line in headlines] + [""]
    for entry in report["tasks"]:
        lines += [f"## {entry['task']}", "", f"y_max = {_y_max_note(entry)}, α = {entry['alpha']}", ""]
        lines += _markdown_table(FRONTIER_COLUMNS, _frontier_rows(entry)) + [""]
        lines += _markdown_table(SUMMARY_COLUMNS, _summary_rows(entry))
        lines += ["", f"![accuracy vs TPF on {entry['task']}](report-{entry['task']}.png)", ""]
        lines += _markdown_table(POINT_COLUMNS, _point_rows(entry))
        lines.append("")
    return "\n".join(lines)


def render_html(report: dict, plots: dict[str, bytes]) -> str:
    escape = html.escape
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>fewstep evaluation report</title>",
        "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;}table{border-collapse:collapse;"
        "margin:1em 0;}td,th{border:1px solid #ccc;padding:3px 8px;}td.n{text-align:right;}</style></head><body>",
        "<h1>fewstep evaluation report</h1>",
    ]
    parts += [f"<p>{escape(line).replace('`', '')}</p>" for line in _header_lines(report)]
    headlines = _headline_lines(report)
    if headlines:
        parts += ["<h2>Headline</h2>", "<ul>"] + [f"<li>{escape(line)}</li>" for line in headlines] + ["</ul>"]
    for entry in report["tasks"]:
        parts.append(f"<h2>{escape(entry['task'])}</h2>")
        parts.append(f"<p>y_max = {escape(_y_max_note(entry))}, α = {entry['alpha']}</p>")
        parts += _html_table(FRONTIER_COLUMNS, _frontier_rows(entry))
        parts += _html_table(SUMMARY_COLUMNS, _summary_rows(entry))
        if entry["task"] in plots:
            encoded = base64.b64encode(plots[entry["task"]]).decode()
            parts.append(f"<img alt='accuracy vs TPF' src='data:image/png;base64,{encoded}'>")
        parts += _html_table(POINT_COLUMNS, _point_rows(entry))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(report: dict, out_dir: Path) -> list[Path]:
    """Write report.json, report.md, report.html and one report-<task>.png per task into `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {key: value for key, value in report.items() if not key.startswith("_")}
    plots = {entry["task"]: plot_task(entry) for entry in report["tasks"]}
    written = []
    for task, png in plots.items():
        written.append(out_dir / f"report-{task}.png")
        write_atomically(written[-1], png)
    contents = {
        "report.json": json.dumps(report, indent=2) + "\n",
        "report.md": render_markdown(report),
        "report.html": render_html(report, plots),
    }
    for name, text in contents.items():
        written.append(out_dir / name)
        write_atomically(written[-1], text)
    return written
