#!/usr/bin/env bash
# Create .venv with Python 3.11 and install the project with its development tools; as root on a
# Debian machine, also install Debian's chromium for the browser tests (Playwright cannot
# download its own browser here).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null || PYTHON=python3
"$PYTHON" -c 'import sys; assert sys.version_info[:2] == (3, 11), f"Python 3.11 is required, found {sys.version.split()[0]}: set PYTHON=/path/to/python3.11"'
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e '.[dev]'
if ! command -v chromium >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
  else
    echo "Note: chromium is missing; the browser tests need it (apt-get install chromium)." >&2
  fi
fi
echo "Installed into $(pwd)/.venv"
