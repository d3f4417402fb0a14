#!/usr/bin/env bash
# Create .venv and install reconlab with the CPU torch pin (idempotent: a second run only checks).
# GPU users: install your CUDA build of torch + torchvision into .venv first and set RECONLAB_CONSTRAINTS=/dev/null.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
CONSTRAINTS=${RECONLAB_CONSTRAINTS:-requirements/constraints-cpu.txt}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.reconlab-installed
want=$(cat pyproject.toml "$CONSTRAINTS" 2>/dev/null | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  .venv/bin/python -m pip install --quiet -c "$CONSTRAINTS" -e '.[dev]'
  echo "$want" > "$stamp"
fi
