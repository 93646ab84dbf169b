#!/usr/bin/env bash
# Lint, format check, type check, then the whole test suite (real MLflow, Triton, Dagster, browser).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
.venv/bin/pytest "$@"
