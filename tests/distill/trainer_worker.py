"""Trains the tiny model with `distill.trainer.Trainer` for the trainer tests, in-process or under a launcher.

The helpers (`tiny_model`, `make_batch_fn`, `masked_next_token_loss`, `nan_at_call`) are shared with the
in-process tests. Run as a script (`torchrun --nproc_per_node 2 -m tests.distill.trainer_worker ...` or
`deepspeed --num_gpus 2 tests/distill/trainer_worker.py ...`) it trains one phase per `--zero-stages` entry in the
same process group (as the pipeline runs several phases in one process), each in `<out>/zero<stage>`, and writes:
- `result-zero<stage>-rank<r>.json`: the summary and world size seen by rank r;
- `local-zero<stage>-rank<r>.pt`: rank r's own module parameters (full replicas under ZeRO 0-2);
- `full-zero<stage>.pt`: `Trainer.full_state_dict()` from rank 0.
With `--diverge-on-rank R` it then trains a phase `<out>/diverge` whose loss is NaN at step 3 on rank R only and
writes `result-diverge-rank<r>.json` with the `TrainingDiverged` message each rank raised.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

if __package__ in (None, ""):
    # Started by path (the deepspeed launcher does that): make the repository importable.
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from distill.recipe import LoggingConfig, TrainConfig, WandbConfig  # noqa: E402
from distill.trainer import BatchFn, LossFn, Trainer, TrainingDiverged  # noqa: E402

SEQUENCE_LENGTH = 16
VOCAB_SIZE = 128
MASK_ID = 0
FIRST_CONTENT_ID = 7  # ids below are the tokenizer's special tokens


def tiny_model(seed: int = 0) -> torch.nn.Module:
    """The tiny Dream-LM teacher model, identically initialised on every rank."""
    from tests.builders import tiny_teacher

    torch.manual_seed(seed)
    teacher = tiny_teacher(32, 64, 2, 2, 1, 64)
    return teacher.model


def make_batch_fn(micro_batch_size: int, rank: int = 0, distinct_batches: int | None = None) -> BatchFn:
    """Counting sequences `a, a+1, ...` (learnable next tokens) with a padded tail on some rows.

    `distinct_batches` cycles through that many batches (1: the same batch every time, which a few steps can
    visibly fit); None makes every micro-batch index its own batch.
    """

    def batch_fn(micro_index: int) -> dict[str, torch.Tensor]:
        index = micro_index if distinct_batches is None else micro_index % distinct_batches
        generator = torch.Generator().manual_seed(index * 101 + rank)
        starts = torch.randint(FIRST_CONTENT_ID, VOCAB_SIZE, (micro_batch_size, 1), generator=generator)
        offsets = torch.arange(SEQUENCE_LENGTH)
        input_ids = FIRST_CONTENT_ID + (starts - FIRST_CONTENT_ID + offsets) % (VOCAB_SIZE - FIRST_CONTENT_ID)
        lengths = torch.randint(SEQUENCE_LENGTH // 2, SEQUENCE_LENGTH + 1, (micro_batch_size, 1), generator=generator)
        attention_mask = (offsets < lengths).long()
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    return batch_fn


def masked_next_token_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator
) -> tuple[torch.Tensor, dict[str, float]]:
    """Next-token CE on real tokens after masking a random 30% of the inputs (draws come from `generator`)."""
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    masked = torch.rand(input_ids.shape, generator=generator).to(input_ids.device) < 0.3
    noisy = torch.where(masked, torch.full_like(input_ids, MASK_ID), input_ids)
    logits = model(input_ids=noisy, attention_mask=attention_mask).logits
    # Shifted logits: position i-1 scores token i.
    targets = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    return loss, {"masked_fraction": masked.float().mean().item()}


def nan_at_call(loss_fn: LossFn, call: int) -> LossFn:
    """`loss_fn` whose `call`-th invocation (1-based) returns NaN."""
    calls = [0]

    def poisoned(model, batch, generator):
        calls[0] += 1
        loss, metrics = loss_fn(model, batch, generator)
        return (loss * float("nan") if calls[0] == call else loss), metrics

    return poisoned


def divergence_message(trainer) -> str | None:
    """Train to the end; the `TrainingDiverged` message if the run stopped on a non-finite loss, else None."""
    try:
        trainer.train()
    except TrainingDiverged as error:
        return str(error)
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--zero-stages", type=int, nargs="+", default=[0])
    parser.add_argument("--max-steps", type=int, default=4)
    parser.add_argument("--micro-batch-size", type=int, default=2)
    parser.add_argument("--gradient-accumulation-steps", type=int, default=1)
    parser.add_argument("--distinct-batches", type=int, default=None)
    parser.add_argument("--diverge-on-rank", type=int, default=None)
    parser.add_argument("--local_rank", type=int, default=None, help="passed by the deepspeed launcher; unused")
    args = parser.parse_args()

    # Launchers export RANK; without one the trainer forms a world of one.
    rank = int(os.environ.get("RANK", "0"))
    batch_fn = make_batch_fn(args.micro_batch_size, rank=rank, distinct_batches=args.distinct_batches)
    logging = LoggingConfig(wandb=WandbConfig(mode="offline"), progress=False)

    def trainer_for(phase: str, stage: int, loss_fn: LossFn, **overrides) -> Trainer:
        config = TrainConfig(
            max_steps=args.max_steps,
            micro_batch_size=args.micro_batch_size,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            lr=1e-2,
            warmup_steps=1,
            zero_stage=stage,
            log_every=1,
            **overrides,
        )
        return Trainer(
            tiny_model(),
            config,
            args.out / phase,
            loss_fn,
            batch_fn,
            run_name="worker",
            logging=logging,
            seed=0,
            phase=phase,
        )

    for stage in args.zero_stages:
        phase = f"zero{stage}"
        trainer = trainer_for(phase, stage, masked_next_token_loss)
        summary = trainer.train()
        local = {name: param.detach().cpu().clone() for name, param in trainer.model.named_parameters()}
        torch.save(local, args.out / f"local-{phase}-rank{rank}.pt")
        full = trainer.full_state_dict()
        if full is not None:
            torch.save(full, args.out / f"full-{phase}.pt")
        result = {"rank": trainer.rank, "world_size": trainer.world_size, "summary": summary}
        (args.out / f"result-{phase}-rank{rank}.json").write_text(json.dumps(result) + "\n")

    if args.diverge_on_rank is not None:
        loss_fn = nan_at_call(masked_next_token_loss, 3) if rank == args.diverge_on_rank else masked_next_token_loss
        trainer = trainer_for("diverge", 0, loss_fn, checkpoint_every=2)
        message = divergence_message(trainer)
        (args.out / f"result-diverge-rank{rank}.json").write_text(json.dumps({"error": message}) + "\n")

    # Leave the group explicitly: a process that exits with gloo's threads still running can abort at exit
    # ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
