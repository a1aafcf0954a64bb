#!/usr/bin/env bash
# All set-up for the tests on a fresh machine, then the whole test suite.
# Usage: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
# the distributed extra too: CI runs the Ray-cluster and Milvus Lite tests instead of skipping them
bash scripts/setup.sh test,distributed
# The web-page test drives a real headless Chromium; install it when we can (skipped otherwise).
if [ -f scripts/install_browser.sh ]; then
    bash scripts/install_browser.sh || echo "test: no browser; the web-page test will be skipped"
fi
.venv/bin/ruff check src tests bench
exec .venv/bin/python -m pytest "$@"
