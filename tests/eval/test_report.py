"""The AUP report: scoring against y_max over all rows, merging, rendering, and `distill eval` / `distill run` /
`distill report` end to end on a randomly initialised tiny teacher."""

import json
import math

import pytest
import torch
import yaml

from distill.cli import main
from eval.report import aup_lines, load_report, merge_reports, new_report, score_report, write_report
from teachers.interface import save_teacher
from tests.builders import tiny_teacher


def make_row(name, decoder, points, knob_name="threshold", batch_size=4, run="r", **sweep):
    """A report row; `sweep` sets its sweep fields (`sweep`, `one_token_knob`, `cut_short`, `cut_short_reason`)."""
    return {
        "name": name,
        "decoder": decoder,
        "decoder_name": decoder,
        "knob_name": knob_name,
        "settings": {},
        "run": run,
        "hardware": "cpu",
        "batch_size": batch_size,
        **sweep,
        "points": [
            {
                "knob": knob,
                "tpf": tpf,
                "accuracy": accuracy,
                "nfe": 1.0,
                "tokens_per_s": 10.0,
                "samples": 10,
                "seconds": 1.0,
                "log": "x.jsonl",
            }
            for knob, tpf, accuracy in points
        ],
    }


def w(y, y_max):
    return min(math.exp(-3 * (1 - y / y_max)), 1.0)


def small_report(run="r", teacher_points=((0.9, 4.0, 76.0), (1.0, 1.0, 80.0)), batch_size=4, teacher="teacher"):
    rows = [
        make_row(teacher, "confident", teacher_points, batch_size=batch_size, run=run),
        make_row("ar-baseline", "low_confidence", [(32, 1.0, 60.0)], "steps", batch_size=batch_size, run=run),
    ]
    return new_report({"addition": rows}, run=run, alpha=3.0, batch_size=batch_size, recipe_hash="h")


def test_y_max_is_the_best_accuracy_over_all_rows_and_every_aup_uses_it():
    report = small_report()
    task = report["tasks"][0]
    assert task["y_max"] == 80.0
    assert task["y_max_row"] == {"name": "teacher", "decoder": "confident", "knob": 1.0}
    teacher, ar = task["rows"]
    # Sorted by TPF: (1, 80) then (4, 76): 1*80 + 1/2*(4-1)*(76*W(76) + 80*W(80)).
    assert teacher["aup"] == pytest.approx(80 + 1.5 * (76 * w(76, 80) + 80))
    assert ar["aup"] == pytest.approx(60.0)  # an AR row scores its accuracy, whatever y_max is


def test_degenerate_row_keeps_the_report_with_a_reason():
    rows = [make_row("teacher", "confident", [(0.5, 0.0, 0.0)]), make_row("x", "confident", [(0.5, 1.0, 50.0)])]
    report = new_report({"addition": rows}, run="r", alpha=3.0, batch_size=4, recipe_hash="h")
    assert report["tasks"][0]["rows"][0]["aup"] is None
    assert "TPF" in report["tasks"][0]["rows"][0]["aup_error"]
    assert report["tasks"][0]["rows"][1]["aup"] == pytest.approx(50.0)


def test_merge_rescores_against_the_merged_y_max_and_renames_clashing_rows(tmp_path):
    first = small_report(run="a")
    second = small_report(run="b", teacher_points=((0.9, 2.0, 90.0),), batch_size=8)
    for name, report in (("a", first), ("b", second)):
        write_report(report, tmp_path / name / "eval")
    merged = merge_reports([load_report(tmp_path / "a"), load_report(tmp_path / "b")])
    task = merged["tasks"][0]
    assert [(row["name"], row["decoder"]) for row in task["rows"]] == [
        ("teacher", "confident"),
        ("ar-baseline", "low_confidence"),
        ("b/teacher", "confident"),
        ("b/ar-baseline", "low_confidence"),
    ]
    assert task["y_max"] == 90.0 and task["y_max_row"]["name"] == "b/teacher"
    # Run a's teacher is now weighed against 90: 1*80 + 1/2*3*(76*W(76) + 80*W(80)).
    assert task["rows"][0]["aup"] == pytest.approx(80 + 1.5 * (76 * w(76, 90) + 80 * w(80, 90)))
    assert merged["batch_size"] is None and merged["recipe_hash"] == "h" and len(merged["sources"]) == 2
    assert task["rows"][0]["points"][0]["log"] == str((tmp_path / "a" / "eval" / "x.jsonl").resolve())


def test_written_report_files(tmp_path):
    report = small_report(teacher="<b>teacher</b>")
    written = write_report(report, tmp_path)
    assert sorted(path.name for path in written) == ["report-addition.png", "report.html", "report.json", "report.md"]
    assert (tmp_path / "report-addition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (tmp_path / "report.html").read_text()
    assert "data:image/png;base64," in html and "&lt;b&gt;teacher" in html and "<b>teacher" not in html
    markdown = (tmp_path / "report.md").read_text()
    assert "y_max = 80.00% (<b>teacher</b> · confident at 1.0)" in markdown and "report-addition.png" in markdown
    again = load_report(tmp_path)
    assert again["tasks"] == json.loads(json.dumps(report["tasks"]))
    assert score_report(again)["tasks"][0]["rows"][0]["aup"] == report["tasks"][0]["rows"][0]["aup"]


def test_load_report_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no report.json"):
        load_report(tmp_path)
    (tmp_path / "report.json").write_text(json.dumps({"tasks": []}))
    with pytest.raises(ValueError, match="not a fewstep report"):
        load_report(tmp_path)


def test_report_command_rerenders_and_merges(tmp_path, capsys):
    write_report(small_report(run="a"), tmp_path / "a" / "eval")
    write_report(small_report(run="b"), tmp_path / "b" / "eval")
    (tmp_path / "a" / "eval" / "report.md").unlink()
    assert main(["report", str(tmp_path / "a")]) == 0
    assert (tmp_path / "a" / "eval" / "report.md").is_file()
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert "--out" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "both")]) == 0
    merged = json.loads((tmp_path / "both" / "report.json").read_text())
    assert len(merged["tasks"][0]["rows"]) == 4 and merged["run"] == "a+b"
    assert main(["report", str(tmp_path / "missing")]) == 1


# ----------------------------------------------------------------------------------------------------------------
# Frontier scoring: each model's best decoder, its Pareto frontier, its one-token-per-forward point, the headline


LATE = "does not start at one token per forward (threshold=1.0)"


def frontier_report():
    done = {"sweep": "auto", "cut_short": False, "cut_short_reason": None}
    rows = [
        # (knob, TPF, accuracy). The teacher's confident curve falls past the cut-off at γ 0.5 (60 < 80 - 5).
        make_row(
            "teacher", "confident", [(1.0, 1.0, 80.0), (0.9, 2.0, 80.0), (0.5, 3.0, 60.0)], one_token_knob=1.0, **done
        ),
        make_row("teacher", "low_confidence", [(24, 0.9, 82.0), (12, 1.8, 70.0)], "steps", one_token_knob=24, **done),
        # A pinned sweep without γ 1.0: cut short.
        make_row(
            "teacher",
            "threshold",
            [(0.5, 2.0, 50.0)],
            sweep="pinned",
            one_token_knob=1.0,
            cut_short=True,
            cut_short_reason=LATE,
        ),
        make_row(
            "student", "confident", [(1.0, 1.0, 84.0), (0.9, 4.0, 84.0), (0.5, 6.0, 70.0)], one_token_knob=1.0, **done
        ),
        make_row(
            "student", "multi_block", [(0.0, 1.5, 83.0), (0.5, 5.0, 82.0), (2.0, 8.0, 60.0)], one_token_knob=0.0, **done
        ),
    ]
    return new_report({"addition": rows}, run="r", alpha=3.0, batch_size=4, recipe_hash="h")


def test_a_models_score_is_its_best_decoder_and_its_pareto_frontier_is_scored_alike():
    task = frontier_report()["tasks"][0]
    assert task["y_max"] == 84.0
    teacher, student = task["frontiers"]
    # Teacher: confident 80 + 1/2*(2-1)*(80*W(80) + 80*W(80)) beats low_confidence's 0.9*82 and threshold's 2*50.
    assert (teacher["name"], teacher["decoder"]) == ("teacher", "confident")
    assert teacher["aup"] == pytest.approx(80 + 80 * w(80, 84))
    assert teacher["cut_short"] is True  # its threshold curve is
    # Student: multi_block 1.5*83 + 1/2*(5-1.5)*(83*W(83) + 82*W(82)) beats confident's 84 + 1/2*3*(84+84) = 336.
    assert (student["decoder"], student["cut_short"]) == ("multi_block", False)
    assert student["aup"] == pytest.approx(1.5 * 83 + 1.75 * (83 * w(83, 84) + 82 * w(82, 84)))
    # Pareto frontier over all six student points: (1, 84) is beaten by (4, 84), (1.5, 83) by (4, 84) too.
    assert [(p["decoder"], p["knob"], p["tpf"], p["accuracy"]) for p in student["pareto"]] == [
        ("confident", 0.9, 4.0, 84.0),
        ("multi_block", 0.5, 5.0, 82.0),
        ("confident", 0.5, 6.0, 70.0),
        ("multi_block", 2.0, 8.0, 60.0),
    ]
    # AUP of the frontier: 70 and 60 are past the cut-off (84 - 5): 4*84 + 1/2*(5-4)*(82*W(82) + 84).
    assert student["pareto_aup"] == pytest.approx(4 * 84 + 0.5 * (82 * w(82, 84) + 84))
    # The one-token-per-forward point with the best AUP (TPF x accuracy): confident's 1*80 over 24 steps' 0.9*82.
    assert teacher["one_token"] == {
        "decoder": "confident",
        "knob_name": "threshold",
        "knob": 1.0,
        "tpf": 1.0,
        "accuracy": 80.0,
        "aup": 80.0,
    }


def test_the_headline_ratios_recomputed_from_the_points(tmp_path):
    report = frontier_report()
    student_aup = 1.5 * 83 + 1.75 * (83 * w(83, 84) + 82 * w(82, 84))
    teacher_aup = 80 + 80 * w(80, 84)
    headline = report["tasks"][0]["headline"]
    assert headline["frontier_ratio"] == pytest.approx(student_aup / teacher_aup)  # the honest comparison
    assert headline["one_token_ratio"] == pytest.approx(student_aup / 80.0)  # d3LLM's: vs vanilla decoding
    assert headline["y_max"] == 84.0 and headline["y_max_row"] == {
        "name": "student",
        "decoder": "confident",
        "knob": 1.0,
    }
    assert (headline["student_decoder"], headline["teacher_decoder"], headline["cut_short"]) == (
        "multi_block",
        "confident",
        ["teacher"],
    )
    write_report(report, tmp_path)
    markdown = (tmp_path / "report.md").read_text()
    ratios = (
        f"student AUP {student_aup:.1f} (multi_block) / teacher AUP {teacher_aup:.1f} (confident) = "
        f"{student_aup / teacher_aup:.2f}x",
        f"(d3LLM's comparison): {student_aup:.1f} / 80.0 (confident threshold=1.0: 80.00% at TPF 1.00) = "
        f"{student_aup / 80:.2f}x",
    )
    assert "## Headline" in markdown and all(ratio in markdown for ratio in ratios)
    assert "y_max 84.00% (student · confident at 1.0)" in markdown and "cut short: teacher" in markdown
    # Cut-short marks: the row's reason in the decoder table, the model's decoders in the frontier table.
    assert f"| teacher | threshold | pinned | 100.00 | 50.00 | 2.00 | yes: {LATE} |" in markdown
    assert f"| teacher | {teacher_aup:.2f} | confident |" in markdown and "| yes: threshold |" in markdown
    html = (tmp_path / "report.html").read_text()
    assert all(ratio.replace("'", "&#x27;") in html for ratio in ratios) and f"yes: {LATE}" in html
    printed = aup_lines(report)
    assert any(line.startswith("AUP addition") and line.endswith(f"cut short: {LATE}") for line in printed)
    assert any(line.startswith("FRONTIER addition") and "cut short" in line for line in printed)
    assert printed[-1].startswith("HEADLINE addition: frontier vs frontier: student AUP")


def test_the_headline_says_when_a_teacher_curve_ran_its_whole_ladder_without_falling(tmp_path):
    assert frontier_report()["tasks"][0]["headline"]["teacher_parallel"] is None  # its complete curves all fell
    done = {"sweep": "auto", "cut_short": False, "cut_short_reason": None}
    rows = [
        # Complete but never below 80 - 5: the sweep reached the ladder's end with the teacher still accurate.
        make_row(
            "teacher", "confident", [(1.0, 1.0, 80.0), (0.5, 6.0, 78.0), (0.0, 9.0, 76.0)], one_token_knob=1.0, **done
        ),
        make_row("teacher", "multi_block", [(0.0, 1.0, 80.0), (0.5, 12.0, 60.0)], one_token_knob=0.0, **done),
        make_row("student", "confident", [(1.0, 1.0, 80.0), (0.0, 9.0, 79.0)], one_token_knob=1.0, **done),
    ]
    report = new_report({"addition": rows}, run="r", alpha=3.0, batch_size=4, recipe_hash="h")
    parallel = report["tasks"][0]["headline"]["teacher_parallel"]
    # The fastest point of the curve that held (multi_block's 12.0 fell past the cut-off, so it does not count).
    assert parallel == {"decoder": "confident", "knob": 0.0, "tpf": 9.0, "accuracy": 76.0}
    write_report(report, tmp_path)
    assert (
        "the teacher is already parallel: its confident curve never fell past the cut-off, 76.00% at TPF 9.00"
        in (tmp_path / "report.md").read_text()
    )


def test_the_headline_compares_student_and_teacher_at_equal_accuracy(tmp_path):
    done = {"sweep": "auto", "cut_short": False, "cut_short_reason": None}
    teacher = [
        make_row("teacher", "confident", [(1.0, 0.9, 97.0), (0.99, 3.4, 96.5), (0.95, 3.8, 94.5)], **done),
        make_row("teacher", "multi_block", [(0.0, 0.9, 95.0), (0.1, 5.0, 89.0)], **done),
    ]
    student = [
        make_row("student", "confident", [(1.0, 1.0, 96.0), (0.9, 7.0, 96.2), (0.5, 12.0, 93.0)], **done),
        make_row("student", "multi_block", [(0.0, 1.0, 95.0), (0.3, 9.0, 95.9)], **done),
    ]
    report = new_report({"chain": teacher + student}, run="r", alpha=3.0, batch_size=4, recipe_hash="h")
    matched = report["tasks"][0]["headline"]["matched"]
    # The teacher's best (97.0) less one point; each model's fastest point at or above 96.0, over all its decoders.
    assert matched["accuracy"] == 96.0 and matched["accuracy_drop"] == pytest.approx(0.8)
    assert matched["teacher"] == {"decoder": "confident", "knob": 0.99, "tpf": 3.4, "accuracy": 96.5}
    assert matched["student"] == {"decoder": "confident", "knob": 0.9, "tpf": 7.0, "accuracy": 96.2}
    assert matched["tpf_ratio"] == pytest.approx(7.0 / 3.4)
    write_report(report, tmp_path)
    assert "student TPF 7.00 (confident at 0.9: 96.20%) = 2.06x" in (tmp_path / "report.md").read_text()

    # A student that is fast but never within a point of the teacher gets no equal-accuracy ratio, however
    # large its frontier AUP.
    fast = [make_row("student", "confident", [(1.0, 1.0, 93.0), (0.5, 20.0, 92.0)], **done)]
    report = new_report({"chain": teacher + fast}, run="r", alpha=3.0, batch_size=4, recipe_hash="h")
    headline = report["tasks"][0]["headline"]
    assert headline["frontier_ratio"] > 3 and headline["matched"]["student"] is None
    assert headline["matched"]["tpf_ratio"] is None and headline["matched"]["accuracy_drop"] == pytest.approx(4.0)
    assert "the student never gets there (best 93.00%, 4.00 points below the teacher's best)" in aup_lines(report)[-1]


def test_a_version_1_report_loads_and_is_scored_on_frontiers(tmp_path):
    report = small_report()
    for entry in report["tasks"]:
        del entry["frontiers"], entry["headline"]
        for row in entry["rows"]:
            for key in ("sweep", "one_token_knob", "cut_short", "cut_short_reason"):
                del row[key]
    (tmp_path / "report.json").write_text(json.dumps(report | {"schema_version": 1}))
    loaded = load_report(tmp_path)
    assert loaded["schema_version"] == 2 and loaded["tasks"][0]["rows"][0]["cut_short"] is None
    teacher = loaded["tasks"][0]["frontiers"][0]
    assert teacher["aup"] == pytest.approx(report["tasks"][0]["rows"][0]["aup"])
    assert teacher["cut_short"] is None and teacher["one_token"] is None  # not recorded in version 1
    write_report(loaded, tmp_path / "again")
    assert "? (not recorded)" in (tmp_path / "again" / "report.md").read_text()


# ----------------------------------------------------------------------------------------------------------------
# End to end on a random tiny teacher (accuracy ~0; what is checked is the plumbing and the schema)


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    teacher = tiny_teacher(32, 64, 1, 2, 1, 64)
    save_teacher(teacher, root / "teacher")
    teacher.model.config.causal = True
    save_teacher(teacher, root / "ar")
    return root


def eval_recipe(tmp_path, checkpoints) -> str:
    tree = {
        "run": {"name": "tiny-eval", "output_dir": str(tmp_path / "run"), "stages": ["eval"]},
        "teacher": {"pretrain": {}},
        "data": {
            "max_response_tokens": 16,
            "tasks": [
                {"name": "addition", "train_size": 10, "eval_size": 6},
                {"name": "word_problems", "train_size": 10, "eval_size": 4},
            ],
        },
        "eval": {
            "rows": [],
            "checkpoints": [
                {"name": "teacher", "path": str(checkpoints / "teacher")},
                {"name": "ar-baseline", "path": str(checkpoints / "ar"), "autoregressive": True},
            ],
            "batch_size": 4,
            "decoder": {"name": "confident", "sweep": [0.5, 0.9, 1.0]},
            "decoders": [
                {"name": "multi_block", "block_length": 4, "sweep": [0.5, 2.0]},
                {"name": "low_confidence", "block_length": 8},  # sweep: auto
            ],
        },
        "logging": {"progress": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_eval_writes_the_report_and_run_writes_the_same_one(tmp_path, tiny_checkpoints, capsys):
    recipe = eval_recipe(tmp_path, tiny_checkpoints)
    assert main(["eval", recipe]) == 0
    eval_dir = tmp_path / "run" / "eval"
    report = json.loads((eval_dir / "report.json").read_text())
    assert set(report) >= {"tasks", "hardware", "batch_size", "versions", "recipe_hash", "schema_version"}
    assert report["batch_size"] == 4 and "threads" in report["hardware"]
    assert [task["task"] for task in report["tasks"]] == ["addition", "word_problems"]
    for task in report["tasks"]:
        rows = {(row["name"], row["decoder"]): row for row in task["rows"]}
        assert list(rows) == [
            ("teacher", "confident"),
            ("teacher", "multi_block"),
            ("teacher", "low_confidence"),
            ("ar-baseline", "low_confidence"),
        ]
        # Pinned lists are decoded whole and in order; γ 1.0 is there, but a random model's accuracy never falls
        # and γ 0 was not tried; multi_block's list lacks its one-token-per-forward bound 0.
        confident, multi_block = rows["teacher", "confident"], rows["teacher", "multi_block"]
        assert [point["knob"] for point in confident["points"]] == [0.5, 0.9, 1.0]
        assert (confident["sweep"], confident["one_token_knob"], confident["cut_short"]) == ("pinned", 1.0, True)
        assert "had not fallen" in confident["cut_short_reason"]
        assert [point["knob"] for point in multi_block["points"]] == [0.5, 2.0]
        assert multi_block["cut_short_reason"] == "does not start at one token per forward (threshold=0.0)"
        # The auto ladder over 2 blocks of 8: 16, 8, 6, 4, 2 steps, stopped after the first point past the cut-off.
        auto = rows["teacher", "low_confidence"]
        knobs, accuracies = [p["knob"] for p in auto["points"]], [p["accuracy"] for p in auto["points"]]
        assert knobs == [16, 8, 6, 4, 2][: len(knobs)] and auto["sweep"] == "auto" and auto["cut_short"] is False
        broke = [accuracy < accuracies[0] - 5 for accuracy in accuracies]
        assert not any(broke[:-1]) and (broke[-1] or knobs[-1] == 2)
        assert "steps" not in auto["settings"]  # the swept knob lives in the points
        ar = rows["ar-baseline", "low_confidence"]
        (ar_point,) = ar["points"]
        assert ar_point["knob"] == 16 and ar_point["tpf"] <= 1.0
        assert ar["settings"]["block_length"] == 1
        assert (ar["sweep"], ar["one_token_knob"], ar["cut_short"]) == ("auto", 16, False)  # left to right: complete
        assert [model["name"] for model in task["frontiers"]] == ["teacher", "ar-baseline"]
        assert task["frontiers"][0]["cut_short"] and task["headline"] is None  # no student row
        for row in task["rows"]:
            for point in row["points"]:
                assert set(point) >= {"knob", "tpf", "accuracy", "nfe", "tokens_per_s"}
                assert 0 <= point["accuracy"] <= 100 and point["nfe"] >= 1
        assert task["y_max"] == max(p["accuracy"] for row in task["rows"] for p in row["points"])
        assert (eval_dir / f"report-{task['task']}.png").is_file()
    lines = [json.loads(line) for line in (eval_dir / "teacher" / "addition.jsonl").read_text().splitlines()]
    points = sum(len(row["points"]) for row in report["tasks"][0]["rows"] if row["name"] == "teacher")
    assert len(lines) == 6 * points  # 6 samples x (3 confident + 2 multi_block + the auto ladder's points)
    assert set(lines[0]) >= {"decoder", "knob", "prompt", "output", "answer", "correct", "nfe"}
    assert (eval_dir / "report.md").is_file() and (eval_dir / "report.html").is_file()
    printed = capsys.readouterr().out
    assert "AUP" in printed and "TPF" in printed and "FRONTIER addition" in printed and "cut short" in printed

    # `distill run`'s eval stage calls the same function: the same rows and (deterministic) points.
    assert main(["run", recipe, f"run.output_dir={tmp_path / 'run2'}"]) == 0
    again = json.loads((tmp_path / "run2" / "eval" / "report.json").read_text())

    def numbers(rep):
        return [
            (t["task"], r["name"], r["decoder"], p["knob"], p["accuracy"], p["tpf"], p["nfe"])
            for t in rep["tasks"]
            for r in t["rows"]
            for p in r["points"]
        ]

    assert numbers(again) == numbers(report)
    summary = json.loads((tmp_path / "run2" / "summary.json").read_text())
    assert {(r["row"], r["task"]) for r in summary["results"]} == {
        (row, task) for row in ("teacher", "ar-baseline") for task in ("addition", "word_problems")
    }
    assert [entry["frontiers"] for entry in summary["frontiers"]] == [entry["frontiers"] for entry in again["tasks"]]
    assert "[run] FRONTIER addition" in capsys.readouterr().out  # the run's summary lines


def test_eval_names_missing_checkpoints(tmp_path, capsys):
    recipe = eval_recipe(tmp_path, tmp_path / "nowhere")
    code = main(["eval", recipe])
    err = capsys.readouterr().err
    assert code == 2, err  # refused before any work
    assert "eval.checkpoints.0.path:" in err and "nowhere/teacher is not a model checkpoint" in err


@pytest.mark.parametrize("verb", [["report"], ["bench"], ["bench", "decode"]])
def test_help(verb, capsys):
    with pytest.raises(SystemExit) as caught:
        main([*verb, "--help"])
    assert caught.value.code == 0 and "usage: distill" in capsys.readouterr().out
