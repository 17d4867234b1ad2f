#!/usr/bin/env bash
# Creates .venv with the package and its test and bench extras, and reinstalls whenever pyproject.toml
# changes or an earlier install did not finish (the stamp is written last). torch is pinned first
# so pip takes the local CPU wheel rather than a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")"
stamp=".venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[test,bench]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
