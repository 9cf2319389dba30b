"""Helpers for stages that run under a launcher (torchrun, deepspeed): join its world, build data on rank 0 only."""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from distill.recipe import Recipe
from eval.tasks import build_task_datasets


def join_ranks() -> tuple[int, int]:
    """(rank, world size); joins the launcher's process group when WORLD_SIZE > 1."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from distill.trainer import init_distributed  # imports DeepSpeed; only needed under a launcher

        init_distributed()
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def current_rank() -> int:
    """This process's rank. Joins the launcher's group first, so a stage that derives per-rank data from it is
    right however it was entered (from `distill run` or called directly)."""
    return join_ranks()[0]


def prepare_datasets(recipe: Recipe, out_dir: Path) -> dict:
    """The recipe's task datasets under `out_dir/data`: rank 0 generates and writes them, the others then load
    what it wrote (concurrent writers would race on the same directories)."""
    rank, world_size = join_ranks()
    datasets = None
    if rank == 0:
        datasets = build_task_datasets(recipe.data, recipe.run.seed, out_dir / "data")
    if world_size > 1:
        dist.barrier()
        if rank != 0:
            datasets = build_task_datasets(recipe.data, recipe.run.seed, out_dir / "data")
    return datasets
