#!/usr/bin/env bash
# Install sds-cli as a user would, from its wheel into a fresh venv, and use it from outside the repository:
# the configs, task files and published numbers must come from the installed package, not from a checkout.
# Builds the wheel, creates a venv in a temp dir (torch==2.13.0 first: a bare torch can pull a multi-GB CUDA
# build), installs the wheel with its dependencies, then from a temp working dir runs sds-run --help, a tiny
# run (its results.json must say ok, its saved model must carry a model card and load), sds-report on that
# run, sds-bench --help and sds-data --help. PYTHON picks the interpreter of the fresh venv (default python3);
# KEEP=1 keeps the temp dir.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# The venv (~1.5 GB, ~20k files) goes to /dev/shm when it has room: creating and deleting it on a slow disk
# took longer than the checks (deleting alone 2+ minutes here). TMPDIR=DIR puts it there instead.
BASE=${TMPDIR:-/tmp}
if [ -z "${TMPDIR:-}" ] && [ -w /dev/shm ] && [ "$(df -Pk /dev/shm | awk 'NR == 2 {print $4}')" -gt 4000000 ]; then
  BASE=/dev/shm
fi
WORK=$(mktemp -d "$BASE/sds-wheel-check.XXXXXX")
[ "${KEEP:-0}" = 1 ] && echo "wheel check: keeping $WORK" || trap 'rm -rf "$WORK"' EXIT
start=$SECONDS
quiet() { "$@" >"$WORK/step.log" 2>&1 || { cat "$WORK/step.log"; return 1; }; }  # its output only if it fails

# Build from a copy of the files git would commit (tracked and untracked, not ignored): a stale build/ of an
# earlier in-tree build can carry deleted modules into the wheel, and the repo gets no build/ or egg-info.
SRC=.
if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  SRC="$WORK/src" && mkdir "$SRC"
  git ls-files -z --cached --others --exclude-standard | tar -c --null -T - --ignore-failed-read -f - 2>/dev/null \
    | tar -x -C "$SRC"
fi
"$PYTHON" -m pip wheel "$SRC" --no-deps -q -w "$WORK/dist" >"$WORK/wheel.log" 2>&1 || { cat "$WORK/wheel.log"; exit 1; }
if grep -E "Warning|!!" "$WORK/wheel.log"; then echo "wheel check: the wheel build warns (above)"; exit 1; fi
WHEEL=$(ls "$WORK"/dist/sds_cli-*.whl)
"$PYTHON" -m venv "$WORK/venv"
BIN="$WORK/venv/bin"
quiet "$BIN/pip" install -q --upgrade pip
# --no-compile: no .pyc for the ~20k files of torch and co. up front (imports compile what they use)
quiet "$BIN/pip" install -q --no-compile "torch==${SDS_TORCH_VERSION:-2.13.0}"
echo "wheel check: torch installed at $((SECONDS - start)) s"
quiet "$BIN/pip" install -q --no-compile "$WHEEL"
echo "wheel check: $(basename "$WHEEL") and its dependencies installed at $((SECONDS - start)) s"

mkdir "$WORK/cwd" && cd "$WORK/cwd"  # not the repository: nothing may be found through the working dir
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 SDS_CACHE="$WORK/cache" TQDM_DISABLE=1
"$BIN/python" -c "import sds_cli, pathlib; assert 'site-packages' in sds_cli.__file__, sds_cli.__file__"
"$BIN/sds-run" --help >help.txt
grep -q "pruner: .*sparsegpt" help.txt || { cat help.txt; echo "wheel check: sds-run --help lists no config groups"; exit 1; }
"$BIN/sds-run" model=tiny-llama pruner=wanda sparsity=2:4 calib=embedded calib.seqlen=64 calib.nsamples=4 \
  "eval.datasets=[embedded]" eval.seqlen=64 eval.max_windows=4 device=cpu redense.iters=5 redense.adjust_iters=5 \
  save.final=true hydra.run.dir=run >run.log 2>&1 || { tail -20 run.log; exit 1; }
"$BIN/python" - <<'EOF'
import json
from pathlib import Path

from transformers import AutoModelForCausalLM

results = json.loads(Path("run/results.json").read_text())
assert results["status"] == "ok", results.get("error")
assert results["versions"]["sds-cli"], results["versions"]
card = Path("run/model/README.md").read_text()
assert "measured sparsity 0.5000" in card and "AutoModelForCausalLM.from_pretrained" in card, card[:2000]
model = AutoModelForCausalLM.from_pretrained("run/model")
assert (model.model.layers[0].mlp.down_proj.weight == 0).float().mean() == 0.5
print(f"wheel check: tiny run ok (SDS perplexity {results['metrics']['sds']['ppl_embedded']:.2f}), card and reload ok")
EOF
"$BIN/sds-report" run --out report >report.log 2>&1 || { tail -20 report.log; exit 1; }
[ -s report/report.md ] || { echo "wheel check: sds-report wrote no report.md"; exit 1; }
"$BIN/sds-bench" --help >/dev/null
"$BIN/sds-data" --help >/dev/null
echo "wheel check passed in $((SECONDS - start)) s"
