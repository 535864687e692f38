#!/usr/bin/env bash
# Re-resolve requirements.lock from pyproject.toml (run after changing dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
[[ -x .venv/bin/uv ]] || { python3 -m venv .venv && .venv/bin/python -m pip install -q uv==0.13.8; }
.venv/bin/uv pip compile -q pyproject.toml --extra dev --python-version 3.11 \
  --python-platform x86_64-unknown-linux-gnu --generate-hashes -o requirements.lock
