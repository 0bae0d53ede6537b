#!/usr/bin/env bash
# The README's test command: set-up, lint, format check, type check (mypy), tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
bash scripts/typecheck.sh
.venv/bin/python -m pytest -q "$@"
