"""DeepSpeed profiles (`recipes/deepspeed/*.json`): `train.deepspeed` resolves names and files, every `"auto"` is
filled from the recipe, the profile decides the ZeRO stage, and each profile runs a real DeepSpeed step on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from distill.recipe import AUTO, DEEPSPEED_PROFILES_DIR, LoggingConfig, TrainConfig, WandbConfig, deepspeed_profiles
from distill.trainer import Trainer, build_deepspeed_config
from tests.distill.trainer_worker import make_batch_fn, masked_next_token_loss, tiny_model

REPO = Path(__file__).resolve().parents[2]
PROFILES = ["zero1", "zero2", "zero2_offload", "zero3", "zero3_offload"]


def leaves(tree: dict, prefix: str = "") -> dict:
    found = {}
    for key, value in tree.items():
        found.update(leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return found


def test_profiles_ship_in_the_repository_recipes_folder():
    assert DEEPSPEED_PROFILES_DIR == REPO / "recipes" / "deepspeed"
    assert deepspeed_profiles() == PROFILES


@pytest.mark.parametrize("name", PROFILES)
def test_profile_resolves_and_every_auto_is_filled(name):
    raw = json.loads((DEEPSPEED_PROFILES_DIR / f"{name}.json").read_text())
    stage = raw["zero_optimization"]["stage"]
    config = TrainConfig(deepspeed=name, micro_batch_size=3, gradient_accumulation_steps=2, grad_clip=0.5)
    assert config.deepspeed == raw and config.zero_stage == stage  # the profile decides the stage
    built = build_deepspeed_config(config)
    assert AUTO not in leaves(built).values()
    assert built["train_micro_batch_size_per_gpu"] == 3 and built["gradient_accumulation_steps"] == 2
    assert built["gradient_clipping"] == 0.5 and built["bf16"] == {"enabled": False}
    assert built["zero_optimization"]["stage"] == stage
    assert "train_batch_size" not in built  # DeepSpeed derives it from the world size
    assert built["zero_force_ds_cpu_optimizer"] is False  # torch AdamW under CPU offload
    offload = built["zero_optimization"]
    assert ("offload_optimizer" in offload) is name.endswith("_offload")
    assert ("offload_param" in offload) is (name == "zero3_offload")
    bf16 = TrainConfig(deepspeed=name, precision="bf16", zero_stage=stage)
    assert build_deepspeed_config(bf16)["bf16"] == {"enabled": True}


def test_deepspeed_file_path_and_inline_auto(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_clipping": "auto", "steps_per_print": 7}))
    config = TrainConfig(deepspeed=str(path), grad_clip=0)
    assert config.zero_stage == 2
    built = build_deepspeed_config(config)
    assert built["gradient_clipping"] == 0 and built["steps_per_print"] == 7
    inline = TrainConfig(zero_stage=1, deepspeed={"zero_optimization": {"stage": "auto"}})
    assert build_deepspeed_config(inline)["zero_optimization"] == {"stage": 1}


def test_explicit_zero_stage_must_match_the_profile():
    assert TrainConfig(deepspeed="zero3", zero_stage=3).zero_stage == 3
    with pytest.raises(ValidationError, match="zero_optimization.stage is 3 but zero_stage is 2"):
        TrainConfig(deepspeed="zero3", zero_stage=2)


@pytest.mark.parametrize("name", PROFILES)
def test_profile_runs_a_deepspeed_step(name, tmp_path):
    config = TrainConfig(deepspeed=name, max_steps=1, micro_batch_size=2, lr=1e-2, log_every=1)
    trainer = Trainer(
        tiny_model(),
        config,
        tmp_path,
        masked_next_token_loss,
        make_batch_fn(2),
        run_name="profile",
        logging=LoggingConfig(wandb=WandbConfig(mode="disabled"), progress=False),
        seed=0,
        phase=name,
    )
    assert trainer.engine.zero_optimization_stage() == config.zero_stage
    assert trainer.train()["step"] == 1
    assert json.loads((tmp_path / "ds_config.json").read_text()) == build_deepspeed_config(config)
