#!/usr/bin/env bash
# Creates .venv (once) with the package and its test extra. torch is pinned first so pip takes
# the local CPU wheel rather than a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c "import orthrus_jax, jax, torch, transformers" 2>/dev/null; then
  python3 -m venv .venv
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[test]"
fi
