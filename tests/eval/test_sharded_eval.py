"""Sharded evaluation: `distill eval` under `torchrun --nproc_per_node 2` decodes the same per-sample outputs and
report points as one process, and a rerun reuses the finished shard files instead of decoding again (on a tiny
random teacher; real gloo, real launcher)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from distill.cli import main
from eval.evaluate import SHARDS_DIR
from tests.builders import saved_tiny_teacher
from tests.launch import run_launched

# 14 records in batches of 4: batches of 4, 4, 4 and 2, two per rank under two ranks.
EVAL_SIZE, BATCH_SIZE = 14, 4
TIMINGS = ("tokens_per_s", "seconds")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return saved_tiny_teacher(tmp_path_factory.mktemp("sharded-teacher"))


def recipe_file(root: Path, teacher_dir: Path, name: str) -> Path:
    """An eval-only recipe: a greedy `auto` sweep (five steps values on the 24-token canvas in blocks of 8) and a
    sampled pinned sweep of three γ values (temperature 0.7: each batch draws from its own generator)."""
    tree = {
        "run": {"name": "sharded", "output_dir": str(root / name), "stages": ["eval"]},
        "teacher": {"path": str(teacher_dir)},
        "data": {
            "max_response_tokens": 24,
            "tasks": [{"name": "addition", "train_size": 0, "eval_size": EVAL_SIZE, "max_digits": 3}],
        },
        "eval": {
            "rows": ["teacher"],
            "batch_size": BATCH_SIZE,
            "decoder": {"name": "low_confidence", "block_length": 8, "sweep": "auto"},
            "decoders": [
                {"name": "confident", "label": "sampled", "temperature": 0.7, "cache": "none", "sweep": [1.0, 0.9, 0.5]}
            ],
        },
        "logging": {"progress": False},
    }
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def sample_logs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "eval" / "teacher" / "addition.jsonl").read_text().splitlines()]


def report_points(out: Path) -> list[dict]:
    """Every row of the report with its points, less the timings (and the hardware, which names the ranks)."""
    report = json.loads((out / "eval" / "report.json").read_text())
    rows = []
    for entry in report["tasks"]:
        for row in entry["rows"]:
            points = [{k: v for k, v in point.items() if k not in TIMINGS} for point in row["points"]]
            rows.append({k: v for k, v in row.items() if k not in ("hardware", "points")} | {"points": points})
    return rows


def shard_stamps(out: Path) -> dict[str, int]:
    return {path.name: path.stat().st_mtime_ns for path in (out / "eval" / SHARDS_DIR).rglob("*.jsonl")}


@pytest.fixture(scope="module")
def one_and_two_ranks(teacher_dir, tmp_path_factory) -> tuple[Path, Path, str]:
    """The same eval in this process and under torchrun with two ranks: (one-rank dir, two-rank dir, launch log)."""
    root = tmp_path_factory.mktemp("sharded")
    assert main(["eval", str(recipe_file(root, teacher_dir, "one"))]) == 0
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "distill.cli", "eval", str(recipe_file(root, teacher_dir, "two"))]
    done = run_launched(command, root)
    return root / "one", root / "two", done.stdout


def test_two_ranks_decode_what_one_process_decodes(one_and_two_ranks):
    one, two, printed = one_and_two_ranks
    logs = sample_logs(one)
    # 5 steps values of the auto sweep (never past the cut-off on a random teacher) + 3 pinned, every record each.
    assert len(logs) == 8 * EVAL_SIZE
    assert sample_logs(two) == logs  # every field, in record order (the logs carry no timings)
    assert report_points(two) == report_points(one)
    assert [row["sweep"] for row in report_points(one)] == ["auto", "pinned"]

    # Each rank wrote its share of every point: two files per point, rank 0's batches 0 and 2, rank 1's 1 and 3.
    files = sorted((two / "eval" / SHARDS_DIR / "teacher" / "addition").glob("*.jsonl"))
    assert len(files) == 2 * 8
    for path in files:
        batches = [json.loads(line)["batch"] for line in path.read_text().splitlines()]
        assert batches == ([0, 2] if ".rank000-of-002." in path.name else [1, 3])
    # Rank 0 alone prints: one line per point.
    assert sum("[eval] teacher" in line and "NFE" in line for line in printed.splitlines()) == 8


def test_the_run_eval_stage_shards_over_two_ranks(one_and_two_ranks, teacher_dir, tmp_path):
    one, _, _ = one_and_two_ranks
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += ["-m", "distill.cli", "run", str(recipe_file(tmp_path, teacher_dir, "run"))]
    run_launched(command, tmp_path)
    out = tmp_path / "run"
    assert sample_logs(out) == sample_logs(one) and report_points(out) == report_points(one)
    assert len(list((out / "eval" / SHARDS_DIR).rglob("*.rank001-of-002.jsonl"))) == 8
    summary = json.loads((out / "summary.json").read_text())
    assert [point["knob"] for point in summary["results"]] == [24, 12, 9, 6, 3, 1.0, 0.9, 0.5]


def test_a_rerun_decodes_nothing_again(one_and_two_ranks, tmp_path, capsys):
    one, two, _ = one_and_two_ranks
    # The same command again, report deleted: every batch comes from the shard files, none is rewritten.
    out = tmp_path / "one"
    shutil.copytree(one, out)
    recipe = tmp_path / "one.yaml"
    tree = yaml.safe_load((one.parent / "one.yaml").read_text())
    tree["run"]["output_dir"] = str(out)
    recipe.write_text(yaml.safe_dump(tree))
    before = shard_stamps(out)
    (out / "eval" / "report.json").unlink()
    capsys.readouterr()
    assert main(["eval", str(recipe)]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if "accuracy" in line and "NFE" in line]
    assert len(printed) == 8 and all("4 batches reused" in line for line in printed)
    assert shard_stamps(out) == before
    assert report_points(out) == report_points(one) and sample_logs(out) == sample_logs(one)

    # One process on the two ranks' files: the key does not depend on the world size, so nothing is decoded either.
    shutil.copytree(two, tmp_path / "two")
    tree["run"]["output_dir"] = str(tmp_path / "two")
    recipe.write_text(yaml.safe_dump(tree))
    before = shard_stamps(tmp_path / "two")
    assert main(["eval", str(recipe)]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if "accuracy" in line and "NFE" in line]
    assert all("4 batches reused" in line for line in printed)
    assert shard_stamps(tmp_path / "two") == before

    # A lost shard file: only its batches are decoded again, into this world size's file, with the same outputs.
    lost = sorted((tmp_path / "two" / "eval" / SHARDS_DIR / "teacher" / "addition").glob("*.rank001-of-002.jsonl"))[0]
    lost.unlink()
    assert main(["eval", str(recipe)]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if "accuracy" in line and "NFE" in line]
    assert sum("2 batches reused" in line for line in printed) == 1
    assert lost.with_name(lost.name.replace("rank001-of-002", "rank000-of-001")).is_file()
    assert report_points(tmp_path / "two") == report_points(one) and sample_logs(tmp_path / "two") == sample_logs(one)


def test_a_changed_setting_is_decoded_again_and_its_stale_files_pruned(one_and_two_ranks, tmp_path, capsys):
    one, _, _ = one_and_two_ranks
    out = tmp_path / "one"
    shutil.copytree(one, out)
    tree = yaml.safe_load((one.parent / "one.yaml").read_text())
    tree["run"]["output_dir"] = str(out)
    tree["eval"]["decoders"] = []  # the sampled decoder's points are no longer asked for: their files go
    tree["eval"]["decoder"]["sweep"] = [24, 6]  # the same settings as two of the auto points: reused
    recipe = tmp_path / "changed.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    capsys.readouterr()
    assert main(["eval", str(recipe)]) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if "accuracy" in line and "NFE" in line]
    assert len(printed) == 2 and all("4 batches reused" in line for line in printed)
    assert len(shard_stamps(out)) == 2
