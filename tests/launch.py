"""Running fewstep under a launcher (or in a child process) from tests.

Children get a clean environment: no inherited rendezvous variables (a child that sees RANK / MASTER_PORT takes
itself for a launched rank), one CPU thread per rank, wandb offline under `out`, and an empty
`TORCH_EXTENSIONS_DIR` under `out` that must stay empty (nothing may be JIT-compiled).
"""

import os
import socket
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(out: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in LAUNCHER_VARIABLES}
    env.update(
        OMP_NUM_THREADS="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        WANDB_DIR=str(out / "wandb"),
        DS_ACCELERATOR="cpu",
        TORCH_EXTENSIONS_DIR=str(out / "torch_extensions"),
        PYTHONPATH=str(REPO),
    )
    return env


def run_launched(command: list[str], out: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `command` from the repository root; it must exit cleanly and compile nothing."""
    done = subprocess.run(command, cwd=REPO, env=child_env(out), capture_output=True, text=True, timeout=timeout)
    log = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, log
    extensions = out / "torch_extensions"
    assert not extensions.exists() or not any(extensions.iterdir()), f"a DeepSpeed op was compiled:\n{log}"
    return done
