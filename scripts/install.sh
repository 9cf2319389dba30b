#!/usr/bin/env bash
# Create .venv and install fewstep with its dev tools, CPU torch first.
#
# torch is installed before anything else, pinned to the CPU build (2.13.0): left to pip, a dependency's
# unpinned `torch` would pull several GB of CUDA wheels. GPU users install the CUDA torch they need into their
# environment first, then run `pip install -e '.[dev]'` (pip keeps the torch that is already there).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${FEWSTEP_TORCH:-torch==2.13.0}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  # A local wheel directory (as on our CPU machines) is preferred when present.
  extra=()
  if [ -d /opt/wheels ]; then extra=(--find-links /opt/wheels); fi
  .venv/bin/python -m pip install -q "${extra[@]}" "$TORCH_SPEC"
fi
.venv/bin/python -m pip install -q -e '.[dev]'
echo "fewstep installed in .venv (torch $(.venv/bin/python -c 'import torch; print(torch.__version__)'))"
