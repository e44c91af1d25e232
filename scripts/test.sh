#!/usr/bin/env bash
# Install what the tests need, then run the whole suite (CPU; ../shared/data is used when present), then the
# wheel check (scripts/wheel_check.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
ruff check sds_cli tests scripts
python -m pytest -q "$@"
# The whole suite (no arguments, as CI runs it) ends with the wheel check: sds-cli installed from its wheel
# into a fresh venv and used outside the repository. SDS_WHEEL_CHECK=0 skips it.
if [ $# -eq 0 ] && [ "${SDS_WHEEL_CHECK:-1}" != 0 ]; then
  bash scripts/wheel_check.sh
fi
