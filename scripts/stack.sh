#!/usr/bin/env bash
# The one-machine production stack: PostgreSQL, MLflow server, Dagster code server + webserver +
# daemon, Triton, cifar-metrics and Prometheus, each its own process on 127.0.0.1.
#   scripts/stack.sh up | down | status | restart SERVICE | env
# Everything is described in scripts/stack/stack.py.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
exec "$root/.venv/bin/python" "$root/scripts/stack/stack.py" "$@"
