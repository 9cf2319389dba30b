"""`distill bench decode`: every cache mode timed on the same prompts, medians, ratios and output agreement."""

import json
import statistics

import pytest
import torch
import yaml

from distill.cli import main
from distill.recipe import DecoderConfig
from eval.bench import bench_decoders
from teachers.interface import save_teacher
from tests.builders import tiny_teacher

RECORDS = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a, b in [(12, 34), (7, 8), (250, 9)]]


def causal_tiny():
    torch.manual_seed(0)
    teacher = tiny_teacher(32, 64, 1, 2, 1, 64)
    teacher.model.config.causal = True
    return teacher


def test_every_cache_mode_is_timed_and_compared_with_no_cache():
    settings = [("lc", DecoderConfig(block_length=4), 8), ("one-block", DecoderConfig(name="confident"), 8)]
    results = bench_decoders(causal_tiny(), RECORDS, settings, batch_size=2, repeats=5)
    assert [(r["decoder"], r["cache"]) for r in results] == [
        ("lc", "none"),
        ("lc", "prompt"),
        ("lc", "blocks"),
        ("one-block", "none"),  # a single block: the block cache would be the prompt cache
        ("one-block", "prompt"),
    ]
    medians = {(r["decoder"], r["cache"]): r["median_s"] for r in results}
    for result in results:
        assert len(result["runs_s"]) == 5 and result["median_s"] == statistics.median(result["runs_s"])
        assert result["speedup"] == pytest.approx(medians[result["decoder"], "none"] / result["median_s"])
        assert result["same_output_fraction"] == 1.0  # a causal model: the cache is exact
        assert result["nfe"] > 0 and 0 <= result["accuracy"] <= 100 and result["settings"]["cache"] == result["cache"]


def test_bench_command_writes_json_and_wants_five_runs(tmp_path, capsys):
    teacher = causal_tiny()
    save_teacher(teacher, tmp_path / "teacher")
    tree = {
        "run": {"name": "b", "output_dir": str(tmp_path / "run")},
        "teacher": {"pretrain": {}},
        "data": {"max_response_tokens": 8, "tasks": [{"name": "addition", "train_size": 10, "eval_size": 4}]},
        "eval": {"batch_size": 2, "decoder": {"name": "threshold", "block_length": 4, "sweep": [0.5, 0.9]}},
    }
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(tree))
    args = ["bench", "decode", str(recipe), "--checkpoint", str(tmp_path / "teacher"), "--samples", "3"]
    assert main(args) == 0
    payload = json.loads((tmp_path / "run" / "bench" / "decode.json").read_text())
    assert payload["samples"] == 3 and payload["repeats"] == 5 and payload["batch_size"] == 2 and payload["causal"]
    assert set(payload) >= {"hardware", "threads", "versions", "prompt_tokens_mean", "results"}
    assert [r["cache"] for r in payload["results"]] == ["none", "prompt", "blocks"]
    assert all(r["settings"]["threshold"] == 0.5 for r in payload["results"])  # the first sweep value
    assert "[bench]" in capsys.readouterr().out
    with pytest.raises(SystemExit) as caught:
        main([*args, "--repeats", "4"])
    assert caught.value.code == 2 and "at least 5" in capsys.readouterr().err
    assert main(["bench", "decode", str(recipe), "--checkpoint", str(tmp_path / "none")]) == 1
