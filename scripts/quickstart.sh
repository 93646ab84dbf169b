#!/usr/bin/env bash
# Run the main job end to end on synthetic data (configs/quickstart.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
exec ./scripts/dagster job execute -m cifar_assets.definitions -j main_job -c configs/quickstart.yaml
