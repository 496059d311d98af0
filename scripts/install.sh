#!/usr/bin/env bash
# Set up .venv with everything the demo, the tools and the tests need (CPU).
# torch first, pinned, so nothing re-resolves it to a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -r requirements.txt -r requirements-dev.txt
