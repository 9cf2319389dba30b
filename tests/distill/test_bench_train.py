"""`distill bench train`: the recipe's distillation step timed under DeepSpeed profiles, with FLOPs and MFU."""

import json

import pytest
import torch
import yaml

from distill.cli import main
from teachers.interface import save_teacher
from tests.builders import tiny_teacher


@pytest.fixture
def recipe(tmp_path):
    torch.manual_seed(0)
    save_teacher(tiny_teacher(32, 64, 2, 2, 1, 64), tmp_path / "teacher")
    tree = {
        "run": {"name": "bench", "output_dir": str(tmp_path / "run")},
        "teacher": {"path": str(tmp_path / "teacher")},
        "data": {"max_response_tokens": 24, "tasks": [{"name": "addition", "train_size": 32, "eval_size": 4}]},
        "distill": {"curriculum": {"windows": [8, 24]}},
        "train": {"micro_batch_size": 4, "max_steps": 100},
        "logging": {"wandb": {"mode": "disabled"}, "progress": False},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def test_each_profile_is_timed_with_its_flops_and_mfu(recipe, tmp_path, capsys):
    linear = torch.nn.functional.linear
    assert main(["bench", "train", str(recipe), "--profiles", "zero1,zero3", "--steps", "5"]) == 0
    payload = json.loads((tmp_path / "run" / "bench" / "train.json").read_text())
    assert payload["records"] == "reference"  # no trajectory set in the run: reference answers, left to right
    assert payload["world_size"] == 1 and payload["peak_flops_measured"] > 0
    assert [(r["profile"], r["zero_stage"]) for r in payload["results"]] == [("zero1", 1), ("zero3", 3)]
    for result in payload["results"]:
        assert len(result["step_s"]) == 5 and result["median_step_s"] > 0
        assert result["tokens_per_s"] == pytest.approx(result["tokens_per_step"] / result["median_step_s"])
        assert result["mfu"] == pytest.approx(
            result["flops_per_step"] / result["median_step_s"] / payload["peak_flops_measured"]
        )
        assert 0 < result["mfu"] < 1
    # The same model and batches under both profiles: the same work per step, whatever ZeRO does with it.
    first, second = payload["results"]
    assert first["flops_per_step"] == second["flops_per_step"] > 0
    assert first["tokens_per_step"] == second["tokens_per_step"]
    assert not list((tmp_path / "run" / "bench").glob("train-*"))  # scratch phases are removed
    assert "MFU" in capsys.readouterr().out
    # ZeRO-3 (student built under zero.Init, then the engine) leaves torch's linear as it found it: later stages of
    # the process decode with torch's own (DeepSpeed's memory-efficient linear would stay for good).
    assert torch.nn.functional.linear is linear


def test_an_unknown_profile_is_refused_before_any_work(recipe, tmp_path, capsys):
    assert main(["bench", "train", str(recipe), "--profiles", "zero9"]) == 2
    assert "--profiles: unknown profile 'zero9'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
