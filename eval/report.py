"""The AUP evaluation report: scored from evaluated points, written as JSON (for tools), Markdown and HTML (for people).

`report.json` (schema version 1; accuracy always in percent):

    {"schema_version": 1, "run": str, "created": ISO time,
     "hardware": str, "batch_size": int | null, "versions": {package: version}, "recipe_hash": str | null,
     "tasks": [{"task": str, "alpha": float,
                "y_max": float, "y_max_row": {"name", "decoder", "knob"},     # the row and point that set y_max
                "rows": [{"name": str, "decoder": str, "decoder_name": str, "knob_name": str,
                          "settings": {...},                      # decoder settings, the swept knob left out
                          "aup": float | null, "aup_error": str (only when aup is null),
                          "run": str, "hardware": str, "batch_size": int,
                          "points": [{"knob", "tpf", "accuracy", "nfe", "tokens_per_s", "samples", "seconds",
                                      "log"}]}]}],
     "sources": [...]}                                                    # only in merged reports

`name` is the model row (`teacher`, `ar-baseline`, `student` or a checkpoint's name), `decoder` the decoder's label,
`knob` the value of the decoder's swept setting (`knob_name`: `steps` or `threshold`) at that point, `log` the
per-sample JSONL relative to the report's directory (one file per row and task; its lines carry `decoder`, `knob`,
`prompt`, `output`, `answer`, `correct`, `nfe`, `generated`). `y_max` is the best
accuracy on the task over every row of the report, so merging reports rescores them. `batch_size` and
`recipe_hash` are null in a merged report whose sources differ (each row keeps its own hardware and batch size).
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
from eval.aup import aup_score

SCHEMA_VERSION = 1
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
    """Set each task's `y_max` (best accuracy over all its rows) and each row's AUP against it, in place."""
    for entry in report["tasks"]:
        best = None
        for row in entry["rows"]:
            for point in row["points"]:
                if best is None or point["accuracy"] > best[0]:
                    best = (point["accuracy"], {"name": row["name"], "decoder": row["decoder"], "knob": point["knob"]})
        entry["y_max"], entry["y_max_row"] = best if best else (None, None)
        for row in entry["rows"]:
            row.pop("aup_error", None)
            try:
                points = [(point["tpf"], point["accuracy"]) for point in row["points"]]
                row["aup"] = aup_score(points, entry["y_max"], entry.get("alpha", 3.0))
            except ValueError as error:
                # Kept in the report rather than raised: one degenerate row (e.g. no token generated, TPF 0)
                # must not cost the whole evaluation.
                row["aup"], row["aup_error"] = None, str(error)
    return report


def load_report(path: Path) -> dict:
    """Read a `report.json` (or the one inside a run directory or its `eval/`), checking its schema version."""
    path = Path(path)
    for candidate in (path, path / "report.json", path / "eval" / "report.json"):
        if candidate.is_file():
            try:
                report = json.loads(candidate.read_text())
            except ValueError as error:
                raise ValueError(f"{candidate}: not valid JSON ({error})") from None
            if not isinstance(report, dict) or report.get("schema_version") != SCHEMA_VERSION:
                raise ValueError(f"{candidate}: not a fewstep report (schema_version {SCHEMA_VERSION} expected)")
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
    """One console line per task x row x decoder with its AUP (what `distill eval` and `distill report` print)."""
    lines = []
    for entry in report["tasks"]:
        for row in entry["rows"]:
            aup = "n/a" if row["aup"] is None else f"{row['aup']:.2f}"
            lines.append(f"AUP {entry['task']:14s} {row['name']:20s} {row['decoder']:16s} {aup}")
    return lines


def _row_label(row: dict) -> str:
    return f"{row['name']} · {row['decoder']}"


def _number(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def plot_task(entry: dict) -> bytes:
    """PNG of accuracy (%) against TPF, one line per row, for one task."""
    figure = Figure(figsize=(6.4, 4.2), dpi=110)
    FigureCanvasAgg(figure)  # render with Agg explicitly: no display, no global pyplot state
    axes = figure.add_subplot()
    for row in entry["rows"]:
        points = sorted((point["tpf"], point["accuracy"]) for point in row["points"])
        label = f"{_row_label(row)} (AUP {_number(row['aup'], 1)})"
        axes.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    accuracies = {point["accuracy"] for row in entry["rows"] for point in row["points"]}
    if len(accuracies) == 1:  # a flat report: give the axis a readable range around the one value
        level = accuracies.pop()
        axes.set_ylim(max(0.0, level - 5), min(100.0, level + 5) if level < 100 else 101)
    if entry["y_max"] is not None:
        axes.axhline(entry["y_max"], color="grey", linestyle="--", linewidth=0.8, label=f"y_max {entry['y_max']:.2f}%")
    axes.set_xlabel("tokens per forward (TPF)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title(entry["task"])
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
    return [
        f"run `{report['run']}` · recipe hash `{report['recipe_hash']}` · created {report['created']}",
        f"hardware: {report['hardware']} · batch size: {report['batch_size']} · {versions}",
        "AUP: trapezoid area under accuracy vs TPF, each accuracy weighted by W(y) = min(exp(-α(1 - y/y_max)), 1), "
        "with y_max the best accuracy on the task over all rows of this report; points more than 5 below the "
        "lowest-TPF accuracy are ignored. Accuracy in percent.",
    ]


# Each table is defined once, as (header, numeric column flags, rows of cell strings), and rendered twice.
SUMMARY_COLUMNS = (("row", False), ("decoder", False), ("AUP", True), ("best accuracy %", True), ("max TPF", True))
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


def _summary_rows(entry: dict) -> list[list[str]]:
    rows = []
    for row in entry["rows"]:
        best = max(point["accuracy"] for point in row["points"])
        fastest = max(point["tpf"] for point in row["points"])
        aup = _number(row["aup"]) if row["aup"] is not None else f"— ({row['aup_error']})"
        rows.append([row["name"], row["decoder"], aup, f"{best:.2f}", f"{fastest:.2f}"])
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
    for entry in report["tasks"]:
        lines += [f"## {entry['task']}", "", f"y_max = {_y_max_note(entry)}, α = {entry['alpha']}", ""]
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
    for entry in report["tasks"]:
        parts.append(f"<h2>{escape(entry['task'])}</h2>")
        parts.append(f"<p>y_max = {escape(_y_max_note(entry))}, α = {entry['alpha']}</p>")
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
