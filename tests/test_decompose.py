"""scripts/decompose.py: columns that share one one-shot model give what separate ``sds-run`` runs give."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from conftest import TINY

import sds_cli

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "decompose.py"
BASE = ["model=tiny-llama", "pruner=sparsegpt", "sparsity=2:4", "redense.adjust_iters=5", *TINY]
COLUMNS = {"adjust_only": "redense=sds redense.iters=0", "default": "redense=sds redense.iters=5"}


def test_a_later_column_is_its_own_run(tmp_path):
    spec = importlib.util.spec_from_file_location("decompose", SCRIPT)
    decompose = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(decompose)
    decompose.main(["--out", str(tmp_path / "dec"), *(f"--column={k}={v}" for k, v in COLUMNS.items()), "--", *BASE])
    columns = {k: json.loads((tmp_path / "dec" / k / "results.json").read_text()) for k in COLUMNS}
    assert columns["default"]["shared_oneshot"] == "adjust_only"
    # the second column restored the one-shot weights: the same as a run of its own, bit for bit
    alone = sds_cli.run([*BASE, *COLUMNS["default"].split(), "checkpoint=false"], run_dir=tmp_path / "alone")
    written = json.loads((tmp_path / "alone" / "results.json").read_text())
    assert columns["default"]["metrics"] == alone.metrics
    assert columns["default"]["mask_sha1"] == alone.mask_sha1
    assert columns["default"]["config"] == written["config"]
    assert [r["error_final"] for r in columns["default"]["layers"]["sds"]] == \
        [r["error_final"] for r in alone.layers["sds"]]
    # and the two columns ran different methods from the same one-shot model
    assert columns["adjust_only"]["metrics"]["oneshot"] == alone.metrics["oneshot"]
    assert [r["error_redense"] for r in columns["adjust_only"]["layers"]["sds"]] != \
        [r["error_redense"] for r in alone.layers["sds"]]
