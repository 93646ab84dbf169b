#!/usr/bin/env bash
# Create .venv with Python 3.11 and install the project with its development tools; as root on a
# Debian machine, also install Debian's chromium for the browser tests (Playwright cannot
# download its own browser here), postgresql and prometheus for the production-stack tests and
# docker-compose to validate the compose file.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, found {sys.version.split()[0]}: set PYTHON=/path/to/python3.11"'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
# System services the tests use: chromium (browser tests), PostgreSQL and Prometheus (the
# production stack, tests/test_stack.py), docker-compose (validates docker-compose.yaml).
missing=()
command -v chromium >/dev/null || missing+=(chromium chromium-driver)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v promtool >/dev/null || missing+=(prometheus)
command -v docker-compose >/dev/null || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    # Debian starts the system's own PostgreSQL and Prometheus where an init system runs;
    # the stack starts clusters of its own and never uses them.
  else
    echo "Note: missing ${missing[*]}; the tests that need them are skipped (sudo apt-get install ${missing[*]})." >&2
  fi
fi
echo "Installed into $(pwd)/.venv"
