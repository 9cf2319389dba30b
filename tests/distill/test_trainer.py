"""Tests of `distill.trainer`: real DeepSpeed on CPU over gloo, ZeRO 0-3 at one and two ranks, resume, NaN guard.

One-rank runs happen in the pytest process and share its single process group (DeepSpeed caches its groups, so
the group is created once per process and never destroyed). Two-rank runs start `torchrun` or the `deepspeed`
launcher on `trainer_worker.py`, with an empty TORCH_EXTENSIONS_DIR that must stay empty: the trainer's
configuration needs no compiled DeepSpeed op.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.recipe import LoggingConfig, TrainConfig, WandbConfig
from distill.trainer import (
    COMPLETE_MARKER,
    Trainer,
    TrainingDiverged,
    build_deepspeed_config,
    checkpoint_tag,
    list_checkpoints,
    lr_factor,
    micro_step_seed,
)
from tests.distill.trainer_worker import make_batch_fn, masked_next_token_loss, nan_at_call, tiny_model
from tests.launch import LAUNCHER_VARIABLES, free_port, run_launched

STAGES = [0, 1, 2, 3]
LAUNCHED = any(name in os.environ for name in LAUNCHER_VARIABLES if name != "LOCAL_RANK")


@pytest.fixture(autouse=True)
def _wandb_dir(tmp_path, monkeypatch):
    # The trainer points WANDB_DIR at its output directory; restore it so runs do not leak into each other.
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))


def make_trainer(out: Path, *, loss_fn=masked_next_token_loss, distinct_batches=None, wandb="disabled", **settings):
    """A Trainer on the tiny model; `settings` override the small defaults below."""
    values = dict(max_steps=6, micro_batch_size=2, lr=1e-2, warmup_steps=1, log_every=1)
    values.update(settings)
    config = TrainConfig(**values)
    return Trainer(
        tiny_model(),
        config,
        out,
        loss_fn,
        make_batch_fn(config.micro_batch_size, distinct_batches=distinct_batches),
        run_name="test",
        logging=LoggingConfig(wandb=WandbConfig(mode=wandb), progress=False),
        seed=0,
        phase="test",
    )


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[float]:
    return [record["loss"] for record in read_metrics(out)]


def max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> float:
    assert first.keys() == second.keys()
    return max((first[name].float() - second[name].float()).abs().max().item() for name in first)


def checkpoint_steps(out: Path) -> list[tuple[int, bool]]:
    return [(step, complete) for step, _, complete in list_checkpoints(out / "checkpoints")]


# ----------------------------------------------------------------------------------------------------------------
# Pure functions


def test_deepspeed_config_for_default_train_config():
    assert build_deepspeed_config(TrainConfig()) == {
        "train_micro_batch_size_per_gpu": 32,
        "gradient_accumulation_steps": 1,
        "bf16": {"enabled": False},
        "zero_optimization": {"stage": 0},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "gradient_clipping": 1.0,
    }


def test_deepspeed_config_user_entries_merge_deeply():
    config = TrainConfig(
        grad_clip=0,
        precision="bf16",
        zero_stage=2,
        deepspeed={"zero_optimization": {"offload_optimizer": {"device": "cpu"}}, "steps_per_print": 5},
    )
    merged = build_deepspeed_config(config)
    assert "gradient_clipping" not in merged
    assert merged["bf16"] == {"enabled": True}
    assert merged["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    assert merged["steps_per_print"] == 5


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    cosine = TrainConfig(max_steps=10, warmup_steps=2, lr_schedule="cosine", min_lr_ratio=0.1)
    assert [lr_factor(step, cosine) for step in range(3)] == [0.5, 1.0, 1.0]
    assert lr_factor(6, cosine) == pytest.approx(0.55)
    assert lr_factor(10, cosine) == pytest.approx(0.1)
    linear = cosine.model_copy(update={"lr_schedule": "linear"})
    assert lr_factor(6, linear) == pytest.approx(0.55)
    assert lr_factor(10, linear) == pytest.approx(0.1)
    constant = cosine.model_copy(update={"lr_schedule": "constant"})
    assert [lr_factor(step, constant) for step in (0, 1, 5, 10)] == [0.5, 1.0, 1.0, 1.0]


def test_micro_step_seeds_are_deterministic_and_distinct():
    seeds = {micro_step_seed(seed, index, rank) for seed in range(3) for index in range(50) for rank in range(4)}
    assert len(seeds) == 3 * 50 * 4
    assert micro_step_seed(1, 2, 3) == micro_step_seed(1, 2, 3)


# ----------------------------------------------------------------------------------------------------------------
# One rank, in process


@pytest.fixture(scope="module")
def single_rank_reference(tmp_path_factory) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses and final weights of a ZeRO-0 fp32 run that the other one-rank runs are compared with."""
    out = tmp_path_factory.mktemp("reference")
    trainer = make_trainer(out, distinct_batches=1)
    trainer.train()
    return losses(out), trainer.full_state_dict()


@pytest.mark.parametrize("stage", STAGES)
def test_single_rank_zero_stage(stage, tmp_path, single_rank_reference):
    reference_losses, reference_weights = single_rank_reference
    trainer = make_trainer(tmp_path, zero_stage=stage, distinct_batches=1, wandb="offline")
    summary = trainer.train()

    records = read_metrics(tmp_path)
    assert [record["step"] for record in records] == [1, 2, 3, 4, 5, 6]
    for record in records:
        assert {"phase", "step", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s", "masked_fraction"} <= set(
            record
        )
        assert record["phase"] == "test" and math.isfinite(record["loss"]) and record["tokens_per_s"] > 0
    # Each micro-step draws its own masks from its generator.
    assert len({record["masked_fraction"] for record in records}) > 1
    # A repeated batch is fitted visibly within six steps.
    assert records[-1]["loss"] < records[0]["loss"] - 0.3
    # ZeRO partitioning changes where the arithmetic happens, not its result.
    assert losses(tmp_path) == pytest.approx(reference_losses, abs=1e-4)
    weights = trainer.full_state_dict()
    assert max_difference(weights, reference_weights) < 1e-4
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())

    assert summary["step"] == 6 and summary["loss"] == pytest.approx(records[-1]["loss"])
    assert summary["checkpoint_dir"] == str(tmp_path / "checkpoints" / checkpoint_tag(6))
    assert (tmp_path / "checkpoints" / checkpoint_tag(6) / COMPLETE_MARKER).is_file()
    assert checkpoint_steps(tmp_path) == [(6, True)]
    assert json.loads((tmp_path / "ds_config.json").read_text())["zero_optimization"]["stage"] == stage
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_gradient_checkpointing_gives_the_same_losses(tmp_path, single_rank_reference):
    trainer = make_trainer(tmp_path, distinct_batches=1, gradient_checkpointing=True)
    assert trainer.model.is_activation_checkpointing
    trainer.train()
    assert losses(tmp_path) == pytest.approx(single_rank_reference[0], abs=1e-5)


def test_bf16_trains_and_returns_fp32_master_weights(tmp_path):
    trainer = make_trainer(tmp_path, zero_stage=1, precision="bf16", distinct_batches=1)
    trainer.train()
    values = losses(tmp_path)
    assert all(math.isfinite(value) for value in values) and values[-1] < values[0] - 0.3
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    assert all(tensor.dtype == torch.float32 for tensor in trainer.full_state_dict().values())


def test_resume_matches_uninterrupted_run(tmp_path):
    # Constant LR: cosine or linear decay depend on max_steps, so a run first told max_steps=3 would differ.
    settings = dict(lr_schedule="constant", gradient_accumulation_steps=2, checkpoint_every=2)
    uninterrupted = make_trainer(tmp_path / "uninterrupted", **settings)
    uninterrupted.train()

    resumed_dir = tmp_path / "resumed"
    first = make_trainer(resumed_dir, max_steps=3, **settings).train()
    assert first["resumed_from"] is None and checkpoint_steps(resumed_dir) == [(2, True), (3, True)]
    resumed = make_trainer(resumed_dir, **settings)
    summary = resumed.train()
    assert summary["resumed_from"] == 3 and summary["step"] == 6

    expected, got = read_metrics(tmp_path / "uninterrupted"), read_metrics(resumed_dir)
    assert [record["step"] for record in got] == [1, 2, 3, 4, 5, 6]
    for before, after in zip(expected[3:], got[3:], strict=True):
        assert after["loss"] == pytest.approx(before["loss"], abs=1e-6)
        assert after["lr"] == pytest.approx(before["lr"], abs=1e-12)
        assert after["masked_fraction"] == before["masked_fraction"]
    assert max_difference(resumed.full_state_dict(), uninterrupted.full_state_dict()) <= 1e-6

    # Already at max_steps: load the final checkpoint and return without training.
    again = make_trainer(resumed_dir, **settings)
    summary = again.train()
    assert summary["resumed_from"] == 6 and summary["step"] == 6 and summary["loss"] is None
    assert len(read_metrics(resumed_dir)) == 6
    assert max_difference(again.full_state_dict(), uninterrupted.full_state_dict()) <= 1e-6


class SimulatedCrash(Exception):
    """Stands for the process being killed in the middle of a step."""


def loss_with_global_rng_noise(model, batch, generator):
    """The test loss plus a small term drawn from the global Python, NumPy and torch RNGs (as dropout would)."""
    loss, metrics = masked_next_token_loss(model, batch, generator)
    noise = random.random() + np.random.rand() + torch.rand(()).item()
    return loss + 1e-2 * noise, metrics


def test_resume_after_crash_skips_incomplete_checkpoint(tmp_path, caplog):
    settings = dict(lr_schedule="cosine", checkpoint_every=2, zero_stage=2, loss_fn=loss_with_global_rng_noise)
    uninterrupted = make_trainer(tmp_path / "uninterrupted", **settings)
    uninterrupted.train()

    def crash_at_call_6(model, batch, generator):
        crash_at_call_6.calls += 1
        if crash_at_call_6.calls == 6:
            raise SimulatedCrash
        return loss_with_global_rng_noise(model, batch, generator)

    crash_at_call_6.calls = 0
    crashed = tmp_path / "crashed"
    with pytest.raises(SimulatedCrash):
        make_trainer(crashed, **{**settings, "loss_fn": crash_at_call_6}).train()
    assert [record["step"] for record in read_metrics(crashed)] == [1, 2, 3, 4, 5]
    # A save of step 5 that died half-way: DeepSpeed files but no COMPLETE marker.
    partial = crashed / "checkpoints" / checkpoint_tag(5)
    partial.mkdir()
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"truncated")

    with caplog.at_level(logging.WARNING, logger="distill.trainer"):
        resumed = make_trainer(crashed, **settings)
        summary = resumed.train()
    assert "ignoring incomplete checkpoint" in caplog.text and checkpoint_tag(5) in caplog.text
    assert summary["resumed_from"] == 4
    # Lines logged after the checkpoint were dropped and re-logged: the file reads as one uninterrupted history.
    assert [record["step"] for record in read_metrics(crashed)] == [1, 2, 3, 4, 5, 6]
    assert losses(crashed) == pytest.approx(losses(tmp_path / "uninterrupted"), abs=1e-6)
    assert max_difference(resumed.full_state_dict(), uninterrupted.full_state_dict()) <= 1e-6
    assert checkpoint_steps(crashed) == [(4, True), (6, True)]


def test_nan_loss_raises_and_keeps_last_good_checkpoint(tmp_path):
    trainer = make_trainer(tmp_path, loss_fn=nan_at_call(masked_next_token_loss, 3), checkpoint_every=2, zero_stage=2)
    with pytest.raises(TrainingDiverged, match=r"^test: loss is nan at step 3 .*left intact: .*step-00000002"):
        trainer.train()
    assert checkpoint_steps(tmp_path) == [(2, True)]
    assert [record["step"] for record in read_metrics(tmp_path)] == [1, 2]
    # No update was applied with the NaN: the weights are still those of step 2, and finite.
    after_divergence = trainer.full_state_dict()
    assert all(tensor.isfinite().all() for tensor in after_divergence.values())

    reloaded = make_trainer(tmp_path, max_steps=2, checkpoint_every=2, zero_stage=2)
    summary = reloaded.train()
    assert summary["resumed_from"] == 2
    assert max_difference(reloaded.full_state_dict(), after_divergence) == 0


def test_keep_last_prunes_old_checkpoints(tmp_path):
    make_trainer(tmp_path, max_steps=5, checkpoint_every=1, keep_last=2).train()
    assert checkpoint_steps(tmp_path) == [(4, True), (5, True)]


def test_resume_never_starts_over(tmp_path):
    make_trainer(tmp_path, max_steps=2, checkpoint_every=1).train()
    summary = make_trainer(tmp_path, max_steps=3, resume="never").train()
    assert summary["resumed_from"] is None
    assert [record["step"] for record in read_metrics(tmp_path)] == [1, 2, 3]
    assert checkpoint_steps(tmp_path) == [(3, True)]


def test_resume_refuses_checkpoints_of_another_configuration(tmp_path):
    make_trainer(tmp_path, max_steps=2, checkpoint_every=1).train()
    # Resume-safe options may change (here the step budget and logging)...
    assert make_trainer(tmp_path, max_steps=3, log_every=2).train()["resumed_from"] == 2
    # ...an option that changes what the steps computed may not.
    with pytest.raises(ValueError, match="written by a different configuration"):
        make_trainer(tmp_path, max_steps=4, lr=0.5).train()
    assert checkpoint_steps(tmp_path)[-1] == (3, True)


@pytest.mark.skipif(LAUNCHED, reason="pytest itself runs under a launcher")
def test_world_of_one_exports_no_rendezvous_variables(tmp_path):
    # A child process inheriting RANK / MASTER_PORT would take itself for a launched rank and collide with this
    # process's store.
    make_trainer(tmp_path, max_steps=0)
    assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"} & set(os.environ)


def test_zero_max_steps_skips_the_phase(tmp_path):
    summary = make_trainer(tmp_path, max_steps=0).train()
    assert summary["step"] == 0 and summary["loss"] is None and summary["checkpoint_dir"] is None
    assert not (tmp_path / "checkpoints").exists()


# ----------------------------------------------------------------------------------------------------------------
# Two ranks, under launchers


WORKER = ["-m", "tests.distill.trainer_worker", "--max-steps", "4", "--distinct-batches", "1"]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """One torchrun with two ranks: a phase per ZeRO stage, then a phase whose loss is NaN on rank 1 only."""
    out = tmp_path_factory.mktemp("two_ranks")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run_launched(
        command + WORKER + ["--out", str(out), "--zero-stages", *map(str, STAGES), "--diverge-on-rank", "1"], out
    )
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_zero_stage(stage, two_ranks):
    phase = f"zero{stage}"
    for rank in (0, 1):
        result = json.loads((two_ranks / f"result-{phase}-rank{rank}.json").read_text())
        assert result["rank"] == rank and result["world_size"] == 2 and result["summary"]["step"] == 4
    values = losses(two_ranks / phase)
    assert len(values) == 4 and all(math.isfinite(value) for value in values)
    assert values[-1] < values[0] - 0.3
    assert values == pytest.approx(losses(two_ranks / "zero0"), abs=1e-4)

    full = torch.load(two_ranks / f"full-{phase}.pt")
    assert all(tensor.isfinite().all() for tensor in full.values())
    assert max_difference(full, torch.load(two_ranks / "full-zero0.pt")) < 1e-4
    if stage < 3:
        # Data parallel replicas: both ranks end with bit-identical weights.
        rank0, rank1 = (torch.load(two_ranks / f"local-{phase}-rank{rank}.pt") for rank in (0, 1))
        assert max_difference(rank0, rank1) == 0

    checkpoint = two_ranks / phase / "checkpoints" / checkpoint_tag(4)
    assert {"COMPLETE", "rng-rank0000.pt", "rng-rank0001.pt"} <= {path.name for path in checkpoint.iterdir()}


def test_two_ranks_nan_on_one_rank_stops_every_rank(two_ranks):
    for rank in (0, 1):
        error = json.loads((two_ranks / f"result-diverge-rank{rank}.json").read_text())["error"]
        assert error is not None and "loss is nan at step 3" in error and "step-00000002" in error
    assert checkpoint_steps(two_ranks / "diverge") == [(2, True)]


def test_deepspeed_launcher_two_ranks(tmp_path, two_ranks):
    launcher = Path(sys.executable).parent / "deepspeed"
    if not launcher.exists():
        pytest.skip("the deepspeed launcher script is not installed next to this Python")
    command = [sys.executable, str(launcher), "--num_gpus", "2", "--master_port", str(free_port())]
    run_launched(
        command + ["tests/distill/trainer_worker.py", *WORKER[2:], "--out", str(tmp_path), "--zero-stages", "1"],
        tmp_path,
    )
    for rank in (0, 1):
        assert json.loads((tmp_path / f"result-zero1-rank{rank}.json").read_text())["world_size"] == 2
    assert losses(tmp_path / "zero1") == pytest.approx(losses(two_ranks / "zero1"), abs=1e-6)
