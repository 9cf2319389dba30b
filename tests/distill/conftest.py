"""Session fixtures of the distillation and export tests: a tiny teacher and one two-rank DeepSpeed run of it.

`two_ranks` is one `torchrun` of `distill_worker.py`: 2 steps for every ZeRO stage x student kind (each combination's
directory is a run directory with recipe, checkpoints and student), the NaN phase and the uninterrupted reference
of the resume test. Tests that change what it wrote work on copies.
"""

from pathlib import Path

import pytest

from tests.builders import saved_tiny_teacher
from tests.distill.distill_worker import COMBOS, worker_command
from tests.launch import run_launched


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory) -> Path:
    return saved_tiny_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def two_ranks(teacher_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("two_ranks")
    command = worker_command(teacher_dir, out, "--combos", *COMBOS, "--nan-on-rank", "1", "--resumable", "reference")
    run_launched(command, out, timeout=600)
    return out
