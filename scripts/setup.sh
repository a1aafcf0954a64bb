#!/usr/bin/env bash
# Create ./.venv (Python 3.11) and install cbir into it. Idempotent: a second run only
# checks what is installed. Usage: bash scripts/setup.sh [extra]   (extras, comma-separated: test, distributed)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv with $PY"
    "$PY" -m venv .venv
fi
spec="."
[ "${1:-}" != "" ] && spec=".[$1]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
echo "setup: installing cbir ($spec) into .venv"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e "$spec"
