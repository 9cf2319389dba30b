"""The one training loop of fewstep: a DeepSpeed engine driven by a loss function and a batch function.

The module is longer than most on purpose: the whole loop, with the checkpoint and resume rules it must keep,
reads in one place. Every phase that updates weights (teacher pretraining, every distillation loss) runs through
`Trainer`; what differs between them is only the `LossFn` and the `BatchFn` it is given. The trainer owns
distributed start-up, the DeepSpeed config (generated from `TrainConfig`, with `train.deepspeed` deep-merged
over it), the AdamW optimizer and learning-rate schedule, gradient accumulation, the NaN/inf guard, checkpoints
and resume, and logging (metrics JSONL, wandb, progress bar).

Determinism contract. Training randomness comes from two places only, both keyed by the global micro-batch
index `m = step_index * gradient_accumulation_steps + micro` (step_index counts from 0):
- `batch_fn(m)` must return the same batch (for this rank) whenever it is called with the same `m`;
- `loss_fn` receives a fresh CPU `torch.Generator` seeded from `(seed, m, rank)` and must draw all its
  randomness (masking, noise, timesteps) from it.
So a resumed run sees exactly the batches and random draws of an uninterrupted one by construction. For code
that still uses the global Python / NumPy / torch RNGs (e.g. dropout), a fresh run seeds them from
`(seed, rank)` and a resumed run restores the states saved with the checkpoint.

Distributed start-up: under `torchrun` or the `deepspeed` launcher the trainer joins the process group they
describe (RANK, WORLD_SIZE, ...); without a launcher it forms a world of one on a free local port, exporting
nothing but LOCAL_RANK. The group is created once per process and reused by every later `Trainer` (DeepSpeed
caches its groups, so it must never be destroyed).

Checkpoint layout (inside the phase's `output_dir`):
    ds_config.json                 the DeepSpeed config actually used
    metrics.jsonl                  one JSON line per logged step (rank 0)
    wandb/                         wandb files (rank 0)
    checkpoints/
        latest                     written by DeepSpeed; not trusted (see COMPLETE)
        step-00000004/             DeepSpeed files (model, optimizer and scheduler states, per rank)
            rng-rank0000.pt ...    each rank's Python / NumPy / torch RNG states (tensors and plain values)
            MANIFEST.json          size and sha256 of every file above (`teachers/manifest.py`), hashed by all
                                   ranks once every rank finished writing
            COMPLETE               written by rank 0 after the manifest; JSON with step, world size, ZeRO stage
                                   and the run fingerprint
A step-N checkpoint holds the state after N optimizer steps. Only directories with `COMPLETE` count as
checkpoints; the newest `keep_last` of them are kept, older ones are deleted. Resume (`resume: auto`) loads the
newest complete and intact checkpoint (model, optimizer, scheduler, RNG) and continues at step N+1; metric lines
after step N are dropped from metrics.jsonl so the file reads as one uninterrupted history. A directory without
`COMPLETE` (a save that was interrupted) is ignored with a warning, and so is one whose files do not match its
manifest (corrupt, cut off, replaced or added since: one line naming the file), the resume falling back to the
newest one that does; when every complete checkpoint is damaged the resume stops with `CheckpointError`. A
checkpoint whose fingerprint (`run_fingerprint`: the config less the resume-safe fields, plus what the caller says
the model and data are) differs from this run's is refused with a clear error rather than silently continued.
`resume: never` deletes earlier checkpoints and metrics of the phase and starts over. A non-finite loss raises
`TrainingDiverged` before any update with it is applied, and no checkpoint is written after it, so the last
complete checkpoint stays the last good state.
After every optimizer step the weights are checked too: a non-finite weight, or one past `WEIGHT_LIMIT`, raises
`TrainingDiverged` before that step's checkpoint is written, so every checkpoint holds finite weights.

Safe loading. A checkpoint's files are checked against its manifest before any is unpickled, and every
`torch.load` of one, DeepSpeed's own included (which asks for `weights_only=False`), runs with weights_only
forced on and only `CHECKPOINT_GLOBALS` allow-listed (`weights_only_loads`): a file that would call anything
else is refused, never run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import pickle
import random
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

if not torch.cuda.is_available():
    # Without this DeepSpeed probes for accelerators and warns; CPU is the only option here anyway.
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
from deepspeed.runtime.fp16.loss_scaler import LossScaler  # noqa: E402
from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: E402
from deepspeed.utils.tensor_fragment import fragment_address  # noqa: E402

from distill.recipe import LoggingConfig, TrainConfig, fill_deepspeed_auto  # noqa: E402
from teachers.manifest import ManifestError, check_manifest, folder_files, hash_files, write_manifest  # noqa: E402

LossFn = Callable[[torch.nn.Module, dict[str, torch.Tensor], torch.Generator], tuple[torch.Tensor, dict[str, float]]]
BatchFn = Callable[[int], dict[str, torch.Tensor]]

CHECKPOINT_PREFIX = "step-"
COMPLETE_MARKER = "COMPLETE"
METRICS_FILE = "metrics.jsonl"
DS_CONFIG_FILE = "ds_config.json"
SHM_COMM_OP = "deepspeed_shm_comm"
# Independent seed streams derived from the run seed.
MICRO_STEP_STREAM, GLOBAL_RNG_STREAM = 0, 1
# The only non-tensor classes in DeepSpeed's checkpoint files (its ZeRO optimizer states; the model states and
# fewstep's RNG files hold tensors and plain values). fp16 would add DynamicLossScaler; fewstep has no fp16.
CHECKPOINT_GLOBALS = [LossScaler, ZeroStageEnum, fragment_address]
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"  # read by torch.load on every call, over its argument
# Trained weights are O(1) (norm gains O(10)); a weight past this comes from an update that diverged (AdamW moves a
# weight by about lr per step, so lr=1e30 gives 1e30 weights that are finite but make every later loss NaN).
WEIGHT_LIMIT = 1e6

logger = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN, infinite or huge; the last complete checkpoint is the last good state."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read back; the message is one line naming the file."""


# ----------------------------------------------------------------------------------------------------------------
# Configuration helpers


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """A copy of `base` with `override` merged in; nested dicts merge key by key, anything else replaces."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def build_deepspeed_config(config: TrainConfig) -> dict[str, Any]:
    """The DeepSpeed config for a training phase: generated from `config`, then `config.deepspeed` (a resolved
    profile, file or mapping, its `"auto"` fields filled from `config`) merged over it."""
    generated: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": config.micro_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "bf16": {"enabled": config.precision == "bf16"},
        "zero_optimization": {"stage": config.zero_stage},
        # The optimizer is a plain torch AdamW: allow it under ZeRO, and under CPU offload too, where DeepSpeed
        # would otherwise insist on its compiled CPUAdam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        # The trainer does its own logging.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if config.grad_clip > 0:
        generated["gradient_clipping"] = config.grad_clip
    merged = deep_merge(generated, fill_deepspeed_auto(config.deepspeed, config.deepspeed_auto_values()))
    if merged["zero_optimization"].get("stage") == 3:
        # ZeRO-3's "memory efficient linear" replaces torch.nn.functional.linear for the rest of the process and
        # never puts it back, so a later stage of the same process (evaluation, export verification) would decode
        # through DeepSpeed's function, not torch's: off unless the config turns it on.
        merged["zero_optimization"].setdefault("memory_efficient_linear", False)
    return merged


def lr_factor(step: int, config: TrainConfig) -> float:
    """Multiplier of `config.lr` after `step` optimizer steps: linear warm-up, then the configured decay."""
    if step < config.warmup_steps:
        # (step + 1) so the first update already moves the weights and the last warm-up step is at peak.
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return 1.0
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps))
    floor = config.min_lr_ratio
    if config.lr_schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (1.0 - floor) * (1.0 - progress)


def _derive_seed(*entropy: int) -> int:
    # SeedSequence mixes the integers well, unlike e.g. seed + index, which collides across runs and ranks.
    state = np.random.SeedSequence(list(entropy)).generate_state(1, dtype=np.uint64)[0]
    return int(state) & (2**63 - 1)


def micro_step_seed(seed: int, micro_index: int, rank: int) -> int:
    """Seed of the generator handed to `loss_fn` for one micro-batch on one rank."""
    return _derive_seed(MICRO_STEP_STREAM, seed, micro_index, rank)


def seed_global_rngs(seed: int, rank: int, step: int) -> None:
    """Seed Python's, NumPy's and torch's global RNGs for a run of `seed` starting at `step` on `rank`."""
    derived = _derive_seed(GLOBAL_RNG_STREAM, seed, rank, step)
    random.seed(derived)
    np.random.seed(derived % 2**32)
    torch.manual_seed(derived)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> None:
    """Join the process group the launcher describes (torchrun, deepspeed), or form a world of one without one."""
    if dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.cuda.is_available():
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce kernel (about a minute, needs a C++
        # compiler) that only its inference all-reduce uses; marking it incompatible keeps training compile-free.
        deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        return
    # No launcher. The rendezvous address is passed directly rather than exported as RANK / MASTER_PORT: child
    # processes would inherit those, take themselves for launched ranks and collide with this process's store.
    os.environ.setdefault("LOCAL_RANK", "0")  # deepspeed.initialize insists on it
    deepspeed.init_distributed(
        dist_backend=backend,
        init_method=f"tcp://127.0.0.1:{_free_port()}",
        rank=0,
        world_size=1,
        auto_mpi_discovery=False,
        verbose=False,
    )


def enable_checkpointing(model: torch.nn.Module, phase: str) -> None:
    """Turn on activation (gradient) checkpointing if the model supports it; warn otherwise."""
    # transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias); other models keep the old name.
    for name in ("activation_checkpointing_enable", "gradient_checkpointing_enable"):
        if hasattr(model, name):
            getattr(model, name)()
            return
    logger.warning("%s: gradient_checkpointing is set but %s cannot enable it", phase, type(model).__name__)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint helpers


# Options that may change between a run and its resumption: they do not change what the steps so far computed.
RESUME_SAFE_FIELDS = {"max_steps", "checkpoint_every", "keep_last", "resume", "log_every"}


def run_fingerprint(config: TrainConfig, phase: str, caller: str = "") -> str:
    """Identity of a phase's training: its config (less `RESUME_SAFE_FIELDS`), the phase and the caller's own
    fingerprint (what the model and data are). Checkpoints carry it; resume refuses one that differs."""
    payload = {
        "phase": phase,
        "config": config.model_dump(mode="json", exclude=RESUME_SAFE_FIELDS),
        "caller": caller,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_tag(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(checkpoint_dir: Path) -> list[tuple[int, Path, bool]]:
    """`(step, path, complete)` for every `step-N` directory, oldest first."""
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for path in checkpoint_dir.iterdir():
        digits = path.name[len(CHECKPOINT_PREFIX) :]
        if path.is_dir() and path.name.startswith(CHECKPOINT_PREFIX) and digits.isdigit():
            found.append((int(digits), path, (path / COMPLETE_MARKER).is_file()))
    return sorted(found)


def read_marker(path: Path) -> dict[str, Any]:
    """The COMPLETE marker of the checkpoint `path`; {} when it is missing or unreadable."""
    try:
        marker = json.loads((path / COMPLETE_MARKER).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return marker if isinstance(marker, dict) else {}


def foreign_checkpoints(phase: str, checkpoint_dir: Path, written_by: str | None, fingerprint: str) -> ValueError:
    """The refusal to resume checkpoints written by another configuration (raised by the trainer, and by the run's
    checks before work)."""
    return ValueError(
        f"{phase}: the checkpoints in {checkpoint_dir} were written by a different configuration "
        f"(fingerprint {written_by}, this run {fingerprint}); resume them with the recipe that wrote them, or set "
        "resume: never, or use another run.output_dir"
    )


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """The COMPLETE marker of the checkpoint `path` once its files match its manifest: exactly the files listed,
    each of the recorded size and sha256. CheckpointError names the first file that does not."""
    marker = read_marker(path)
    if not isinstance(marker.get("world_size"), int):
        raise CheckpointError(f"{path / COMPLETE_MARKER}: not a fewstep checkpoint marker (no world_size)")
    try:
        check_manifest(path, required=True, strict=True, ignore={COMPLETE_MARKER})
    except ManifestError as error:
        raise CheckpointError(str(error)) from None
    return marker


# Checkpoints already reported as damaged by this process: each is reported once, however often it is looked up.
_reported: set[Path] = set()


def latest_complete_checkpoint(checkpoint_dir: Path) -> tuple[int, Path] | None:
    """The newest complete checkpoint whose files match its manifest, warning (one line each) about newer ones that
    are incomplete or damaged; None without complete checkpoints. CheckpointError (naming the newest one's bad
    file) when there are complete checkpoints but every one is damaged: a fresh start would discard them."""
    damaged = None
    for step, path, complete in reversed(list_checkpoints(checkpoint_dir)):
        if complete:
            try:
                verify_checkpoint(path)
                return step, path
            except CheckpointError as error:
                damaged = damaged or error
                reason = f"ignoring damaged checkpoint of step {step}: {error}"
        else:
            reason = f"ignoring incomplete checkpoint {path} (no {COMPLETE_MARKER} marker: its save was interrupted)"
        if path not in _reported:
            _reported.add(path)
            logger.warning("%s", reason)
    if damaged is not None:
        raise CheckpointError(f"{damaged}; no intact checkpoint is left in {checkpoint_dir}")
    return None


@contextmanager
def weights_only_loads() -> Iterator[None]:
    """Inside, every `torch.load` (DeepSpeed's too, which pass weights_only=False) unpickles only tensors, plain
    values and `CHECKPOINT_GLOBALS`: a file naming any other callable raises `pickle.UnpicklingError`."""
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous


def refused_unpickling(path: Path, error: pickle.UnpicklingError) -> CheckpointError:
    """The one-line refusal of a checkpoint file that `weights_only_loads` would not unpickle."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    # torch's message: a general paragraph, then what was refused (e.g. "unsupported GLOBAL posix.system"), then docs.
    detail = lines[1] if len(lines) > 2 else (lines[0] if lines else type(error).__name__)
    return CheckpointError(f"{path}: refused to unpickle, it holds more than tensors and plain values ({detail})")


def _rng_states() -> dict[str, Any]:
    # Plain values and tensors only, so the file loads with weights_only=True (NumPy's key array would not).
    kind, key, position, has_gauss, gauss = np.random.get_state()
    states = {
        "python": random.getstate(),
        "numpy": [kind, key.tolist(), position, has_gauss, gauss],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    random.setstate(states["python"])
    kind, key, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, np.array(key, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


# ----------------------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Trains `model` with DeepSpeed for one phase: `loss_fn(engine, batch_fn(m), generator)` per micro-batch.

    `output_dir` is the phase's own directory (checkpoints, metrics, DeepSpeed config, wandb). `loss_fn` calls
    its first argument as the model and must return a scalar loss and a dict of float metrics with the same
    keys on every rank. `batch_fn(m)` returns this rank's micro-batch `m` (tensors, moved to the engine device
    by the trainer); `attention_mask` (or else `input_ids`) is used to count tokens for tokens/s.

    `self.model` is the trained module (`engine.module`). Under ZeRO-3 its parameters are partitioned across
    ranks; `full_state_dict()` gathers the complete weights.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        config: TrainConfig,
        output_dir: Path,
        loss_fn: LossFn,
        batch_fn: BatchFn,
        *,
        run_name: str,
        logging: LoggingConfig,
        seed: int,
        phase: str = "train",
        fingerprint: str = "",
    ):
        self.config = config
        self.fingerprint = run_fingerprint(config, phase, fingerprint)
        self.output_dir = Path(output_dir)
        self.checkpoint_dir = self.output_dir / "checkpoints"
        self.loss_fn = loss_fn
        self.batch_fn = batch_fn
        self.run_name = run_name
        self.logging = logging
        self.seed = seed
        self.phase = phase

        init_distributed()
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.is_main = self.rank == 0

        if config.gradient_checkpointing:
            enable_checkpointing(model, phase)

        self.ds_config = build_deepspeed_config(config)
        bf16 = self.ds_config.get("bf16", {}).get("enabled", False)
        if bf16 and self.ds_config.get("zero_optimization", {}).get("stage", 0) == 0 and self.is_main:
            logger.warning(
                "%s: bf16 with ZeRO stage 0 accumulates gradients in bf16 and full_state_dict() returns bf16 "
                "weights (DeepSpeed's DDP-bf16 path); ZeRO stage 1 or higher keeps fp32 gradients and weights",
                phase,
            )
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / DS_CONFIG_FILE).write_text(json.dumps(self.ds_config, indent=2) + "\n")

        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        # Biases and norm gains are not pulled towards zero, the usual AdamW practice.
        decayed = [p for _, p in trainable if p.ndim >= 2]
        not_decayed = [p for _, p in trainable if p.ndim < 2]
        groups = [
            {"params": params, "weight_decay": decay}
            for params, decay in ((decayed, config.weight_decay), (not_decayed, 0.0))
            if params
        ]
        optimizer = torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, config))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config
        )
        self.model: torch.nn.Module = self.engine.module
        self.gradient_accumulation_steps = self.engine.gradient_accumulation_steps()
        self.step = 0

    # -- checkpoints --------------------------------------------------------------------------------------------

    def _save_checkpoint(self, step: int) -> Path:
        tag = checkpoint_tag(step)
        path = self.checkpoint_dir / tag
        if self.is_main and path.exists():
            # Leftovers of an interrupted save of the same step must not mix with the new files.
            shutil.rmtree(path)
        dist.barrier()
        self.engine.save_checkpoint(
            str(self.checkpoint_dir), tag=tag, client_state={"step": step, "world_size": self.world_size}
        )
        torch.save(_rng_states(), path / f"rng-rank{self.rank:04d}.pt")
        dist.barrier()
        # Every rank hashes a share of the files (a large model's optimizer states take minutes to read); rank 0
        # lists them so all ranks split the same list.
        names = [folder_files(path) if self.is_main else None]
        dist.broadcast_object_list(names, src=0)
        shares: list[Any] = [None] * self.world_size
        dist.all_gather_object(shares, hash_files(path, names[0][self.rank :: self.world_size]))
        if self.is_main:
            write_manifest(path, records={name: record for share in shares for name, record in share.items()})
            marker = {
                "step": step,
                "world_size": self.world_size,
                "zero_stage": self.engine.zero_optimization_stage(),
                "phase": self.phase,
                "fingerprint": self.fingerprint,
                "time": time.time(),
            }
            (path / COMPLETE_MARKER).write_text(json.dumps(marker) + "\n")
            self._prune_checkpoints()
        dist.barrier()
        return path

    def _prune_checkpoints(self) -> None:
        checkpoints = list_checkpoints(self.checkpoint_dir)
        complete = [step for step, _, done in checkpoints if done]
        keep = set(complete[-self.config.keep_last :])
        newest = complete[-1] if complete else -1
        for step, path, done in checkpoints:
            # Incomplete directories older than the newest complete one are dead saves; newer ones cannot exist
            # here because this rank just wrote the newest.
            if (done and step not in keep) or (not done and step < newest):
                shutil.rmtree(path, ignore_errors=True)

    def _resume(self) -> int | None:
        """Restore the newest complete checkpoint (weights, optimizer, scheduler, RNG) or prepare a fresh start.

        Returns the step of the checkpoint loaded, or None for a fresh start (global RNGs seeded from the run
        seed, earlier metric lines removed).
        """
        step = None
        if self.config.resume == "never":
            if self.is_main and self.checkpoint_dir.exists():
                logger.warning("%s: resume=never, deleting earlier checkpoints in %s", self.phase, self.checkpoint_dir)
                shutil.rmtree(self.checkpoint_dir)
        else:
            found, written_by, damaged = None, None, None
            if self.is_main:
                try:
                    found = latest_complete_checkpoint(self.checkpoint_dir)
                except CheckpointError as error:
                    damaged = str(error)
                written_by = read_marker(found[1]).get("fingerprint") if found else None
            # Every rank must load the same step (or stop together); rank 0's view of the directory decides.
            choice = [found[0] if found else None, written_by, damaged]
            dist.broadcast_object_list(choice, src=0)
            step, written_by, damaged = choice
            if damaged is not None:
                raise CheckpointError(damaged)
            if step is not None and written_by != self.fingerprint:
                raise foreign_checkpoints(self.phase, self.checkpoint_dir, written_by, self.fingerprint)
        if step is not None:
            self._load_checkpoint(step)
        else:
            seed_global_rngs(self.seed, self.rank, 0)
        if self.is_main:
            self._truncate_metrics(step or 0)
        dist.barrier()
        return step

    def _load_checkpoint(self, step: int) -> None:
        """Load a checkpoint rank 0 verified (`latest_complete_checkpoint`), unpickling only tensors, plain values
        and `CHECKPOINT_GLOBALS`."""
        tag = checkpoint_tag(step)
        try:
            with weights_only_loads():
                load_path, _ = self.engine.load_checkpoint(str(self.checkpoint_dir), tag=tag)
        except pickle.UnpicklingError as error:
            raise refused_unpickling(self.checkpoint_dir / tag, error) from None
        if load_path is None:
            raise RuntimeError(f"{self.phase}: DeepSpeed could not load checkpoint {self.checkpoint_dir / tag}")
        rng_file = self.checkpoint_dir / tag / f"rng-rank{self.rank:04d}.pt"
        if rng_file.is_file():
            try:
                states = torch.load(rng_file, weights_only=True)
            except pickle.UnpicklingError as error:
                raise refused_unpickling(rng_file, error) from None
            _set_rng_states(states)
        else:
            # Saved with fewer ranks: this rank never had RNG states, so derive fresh ones deterministically.
            logger.warning("%s: %s has no RNG states for rank %d; reseeding", self.phase, tag, self.rank)
            seed_global_rngs(self.seed, self.rank, step)
        logger.info("%s: resumed from %s", self.phase, self.checkpoint_dir / tag)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metric lines after `step`: they belong to steps that will be trained (again)."""
        metrics_file = self.output_dir / METRICS_FILE
        if not metrics_file.is_file():
            return
        lines = [line for line in metrics_file.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        metrics_file.write_text("".join(line + "\n" for line in kept))

    # -- weights ------------------------------------------------------------------------------------------------

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full (unpartitioned) CPU weights on rank 0, None on other ranks; every rank must call it (collective).

        Trained parameters come from DeepSpeed's fp32 master copy where it keeps one (bf16 precision, ZeRO 1-3),
        so bf16 training loses no precision here; everything else is the module's own tensor.
        """
        partitioned = self.engine.zero_optimization_stage() == 3
        state = {}
        # keep_vars: the Parameter objects themselves, which ZeRO-3 can gather and which hold the master mapping.
        for name, tensor in self.engine.module.state_dict(keep_vars=True).items():
            # One parameter at a time so a ZeRO-3 model is never whole on every rank at once.
            if partitioned and hasattr(tensor, "ds_id"):
                gathered = deepspeed.zero.GatheredParameters([tensor], modifier_rank=None)
            else:
                gathered = nullcontext()
            with gathered:
                value = tensor.detach()
                if isinstance(tensor, torch.nn.Parameter) and tensor.requires_grad:
                    # Collective under ZeRO: every rank walks the same entries in the same order.
                    master = deepspeed.utils.safe_get_full_fp32_param(tensor)
                    if master is not None:
                        value = master.detach().reshape(value.shape)
                if self.is_main:
                    state[name] = value.to("cpu", copy=True)
        return state if self.is_main else None

    # -- the loop -----------------------------------------------------------------------------------------------

    def _move(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = self.engine.device
        return {key: value.to(device) if torch.is_tensor(value) else value for key, value in batch.items()}

    def _all_reduce_sum(self, values: list[float]) -> list[float]:
        tensor = torch.tensor(values, dtype=torch.float64, device=self.engine.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor.tolist()

    def _diverged(self, what: str) -> TrainingDiverged:
        try:
            last = latest_complete_checkpoint(self.checkpoint_dir)
        except CheckpointError:
            last = None
        where = f"{last[1]} (step {last[0]})" if last else "none saved yet"
        return TrainingDiverged(
            f"{self.phase}: {what}, no checkpoint written; the last checkpoint (finite weights) is left intact: {where}"
        )

    def _check_weights(self, step: int) -> None:
        """Raise `TrainingDiverged` if the update of `step` left a trained weight non-finite or past `WEIGHT_LIMIT`
        on any rank. Each rank checks what it holds (its partition under ZeRO-3); one all-reduce, a sync point."""
        device = self.engine.device
        held = [
            (name, getattr(parameter, "ds_tensor", parameter).detach())
            for name, parameter in self.engine.module.named_parameters()
            if parameter.requires_grad
        ]
        held = [(name, tensor) for name, tensor in held if tensor.numel()] or [("", torch.zeros(1))]
        # NaN counts as infinitely large, so one MAX reduction finds NaN, inf and huge weights alike.
        largest = torch.stack([tensor.abs().amax().float().to(device) for _, tensor in held]).nan_to_num(nan=torch.inf)
        worst = largest.max()
        dist.all_reduce(worst, op=dist.ReduceOp.MAX)
        if worst <= WEIGHT_LIMIT:
            return
        index = int(largest.argmax())
        where = f" in {held[index][0]}" if largest[index] == worst else ""  # a rank that holds the worst one
        raise self._diverged(
            f"weights diverged at step {step} (largest |w| {float(worst):.3g}{where}, over {WEIGHT_LIMIT:g})"
        )

    def train(self) -> dict[str, Any]:
        """Run the phase to `max_steps` (resuming if configured); returns a summary of the run.

        Summary keys: `phase`, `step` (last optimizer step reached), `loss` (mean loss of that step; None if no
        step ran), `tokens_per_s` (whole run, all ranks), `elapsed_s`, `checkpoint_dir` (newest complete
        checkpoint, or None), `resumed_from` (checkpoint step resumed from, or None).
        """
        config = self.config
        start = time.perf_counter()
        summary: dict[str, Any] = {
            "phase": self.phase,
            "step": 0,
            "loss": None,
            "tokens_per_s": 0.0,
            "elapsed_s": 0.0,
            "checkpoint_dir": None,
            "resumed_from": None,
        }
        if config.max_steps == 0:
            return summary
        resumed = self._resume()
        self.step = resumed or 0
        last_checkpoint = resumed
        summary.update(step=self.step, resumed_from=resumed)
        if self.step < config.max_steps:
            self.engine.train()
            total_tokens = 0.0
            with self._wandb() as wandb_run, self._progress(self.step) as advance:
                # The throughput window opens only now so wandb's start-up does not count as training time.
                window_tokens, window_start = 0.0, time.perf_counter()
                for step_index in range(self.step, config.max_steps):
                    step = step_index + 1
                    record = self.train_step(step_index)
                    self.step = step
                    tokens = record.pop("tokens")
                    total_tokens += tokens
                    window_tokens += tokens
                    summary.update(step=step, loss=record["loss"])
                    now = time.perf_counter()
                    tokens_per_s = window_tokens / max(now - window_start, 1e-9)
                    if step % config.log_every == 0 or step == config.max_steps:
                        record.update(tokens_per_s=tokens_per_s, elapsed_s=now - start)
                        self._log(record, wandb_run)
                        window_tokens, window_start = 0.0, now
                    advance(step, record["loss"], tokens_per_s)
                    if (config.checkpoint_every and step % config.checkpoint_every == 0) or step == config.max_steps:
                        save_start = time.perf_counter()
                        self._save_checkpoint(step)
                        last_checkpoint = step
                        # Saving is not training: keep it out of the throughput window.
                        window_start += time.perf_counter() - save_start
            elapsed = time.perf_counter() - start
            summary.update(tokens_per_s=total_tokens / max(elapsed, 1e-9), elapsed_s=elapsed)
        if last_checkpoint is not None:
            summary["checkpoint_dir"] = str(self.checkpoint_dir / checkpoint_tag(last_checkpoint))
        return summary

    def train_step(self, step_index: int) -> dict[str, Any]:
        """One optimizer step over `gradient_accumulation_steps` micro-batches; its metrics, averaged over ranks."""
        step = step_index + 1
        lr = self.engine.get_lr()[0]
        loss_sum, tokens, grad_norm = 0.0, 0.0, None
        metric_sums: dict[str, float] = {}
        for micro in range(self.gradient_accumulation_steps):
            micro_index = step_index * self.gradient_accumulation_steps + micro
            batch = self._move(self.batch_fn(micro_index))
            generator = torch.Generator().manual_seed(micro_step_seed(self.seed, micro_index, self.rank))
            loss, metrics = self.loss_fn(self.engine, batch, generator)
            # One all-reduce serves both the logged mean and the guard: a NaN/inf on any rank poisons the sum,
            # so every rank stops at the same micro-batch and none waits in a collective for the others.
            (global_loss,) = self._all_reduce_sum([loss.detach().float().item()])
            if not math.isfinite(global_loss):
                raise self._diverged(
                    f"loss is {global_loss} at step {step} (micro-batch {micro_index}); stopped before the update"
                )
            self.engine.backward(loss)
            if micro == self.gradient_accumulation_steps - 1:
                grad_norm = self._unwrapped_grad_norm()
            self.engine.step()
            loss_sum += global_loss / self.world_size
            mask = batch.get("attention_mask")
            tokens += float(mask.sum().item()) if mask is not None else float(batch["input_ids"].numel())
            for key, value in metrics.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + float(value)
        self._check_weights(step)
        if grad_norm is None:
            reported = self.engine.get_global_grad_norm()
            grad_norm = None if reported is None else float(reported)
        keys = sorted(metric_sums)
        reduced = self._all_reduce_sum([tokens] + [metric_sums[key] for key in keys])
        divisor = self.gradient_accumulation_steps * self.world_size
        record: dict[str, Any] = {
            "phase": self.phase,
            "step": step,
            "loss": loss_sum / self.gradient_accumulation_steps,
            "lr": lr,
        }
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        for key, value in zip(keys, reduced[1:], strict=True):
            record.setdefault(key, value / divisor)
        record["tokens"] = reduced[0]
        return record

    def _unwrapped_grad_norm(self) -> float | None:
        """Pre-clipping gradient norm when DeepSpeed left the optimizer unwrapped (ZeRO-0 fp32) and so reports none."""
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            return None
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else None

    # -- logging ------------------------------------------------------------------------------------------------

    def _log(self, record: dict[str, Any], wandb_run: Any) -> None:
        if not self.is_main:
            return
        with open(self.output_dir / METRICS_FILE, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if wandb_run is not None:
            values = {f"{self.phase}/{key}": value for key, value in record.items() if key not in ("phase", "step")}
            wandb_run.log(values, step=record["step"])

    @contextmanager
    def _wandb(self) -> Iterator[Any]:
        settings = self.logging.wandb
        if not self.is_main or settings.mode == "disabled":
            yield None
            return
        import wandb

        os.environ["WANDB_DIR"] = str(self.output_dir)
        run = wandb.init(
            project=settings.project,
            name=self.run_name,
            job_type=self.phase,
            dir=str(self.output_dir),
            mode=settings.mode,
            config={"phase": self.phase, "seed": self.seed, "world_size": self.world_size, **self.config.model_dump()},
        )
        try:
            yield run
        except BaseException:
            run.finish(exit_code=1)
            raise
        run.finish()

    @contextmanager
    def _progress(self, first_step: int) -> Iterator[Callable[[int, float, float], None]]:
        if not (self.is_main and self.logging.progress):
            yield lambda step, loss, tokens_per_s: None
            return
        if not sys.stdout.isatty():
            # Logs and CI get about ten plain lines per phase instead of a redrawn bar.
            every = max(1, self.config.max_steps // 10)

            def report(step: int, loss: float, tokens_per_s: float) -> None:
                if step % every == 0 or step == self.config.max_steps:
                    print(
                        f"[{self.phase}] step {step}/{self.config.max_steps}  loss {loss:.4f}  "
                        f"{tokens_per_s:,.0f} tok/s",
                        flush=True,
                    )

            yield report
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tokens_per_s]} tok/s"),
            TimeRemainingColumn(),
        )
        with Progress(*columns) as progress:
            task = progress.add_task(
                self.phase, total=self.config.max_steps, completed=first_step, loss="-", tokens_per_s="-"
            )

            def advance(step: int, loss: float, tokens_per_s: float) -> None:
                progress.update(task, completed=step, loss=f"{loss:.4f}", tokens_per_s=f"{tokens_per_s:,.0f}")

            yield advance
