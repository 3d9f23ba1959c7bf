#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment in .venv.
# torch/torchvision are installed first and pinned: asking pip for the rest first
# would let it pull a different multi-GB torch build as a dependency.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
STAMP="$VENV/.setup-done"
if [ -f "$STAMP" ] && [ "$STAMP" -nt setup.py ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
"$VENV/bin/pip" install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$VENV/bin/pip" install --quiet -e ".[test]"
touch "$STAMP"
