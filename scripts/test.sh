#!/usr/bin/env bash
# Install what the tests need, then run the whole suite (CPU; ../shared/data is used when present).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check sds_cli tests scripts
python -m pytest -q "$@"
