#!/usr/bin/env bash
# Install, then run the offline demo main job: SmolLM2-135M, SparseGPT 2:4 + SDS on CPython's docs text.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
sds-run experiment=demo "$@"
