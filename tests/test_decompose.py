"""scripts/decompose.py: columns that share one one-shot model give what separate ``sds-run`` runs give; and
decomposition_table.py's combined validation rule."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import TINY

import sds_cli

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "decompose.py"
BASE = ["model=tiny-llama", "pruner=sparsegpt", "sparsity=2:4", "redense.adjust_iters=5", "eval.dense=false", *TINY]
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
    assert columns["default"]["metrics"] == alone.metrics and "dense" not in alone.metrics  # eval.dense=false, as sds-run
    assert columns["default"]["mask_sha1"] == alone.mask_sha1
    assert columns["default"]["config"] == written["config"]
    assert [r["error_final"] for r in columns["default"]["layers"]["sds"]] == \
        [r["error_final"] for r in alone.layers["sds"]]
    # and the two columns ran different methods from the same one-shot model
    assert columns["adjust_only"]["metrics"]["oneshot"] == alone.metrics["oneshot"]
    assert [r["error_redense"] for r in columns["adjust_only"]["layers"]["sds"]] != \
        [r["error_redense"] for r in alone.layers["sds"]]


def test_the_combined_rule_is_the_geometric_mean_and_the_worst_ratio(tmp_path, capsys):
    """``decomposition_table.py --combine``: per column, the geometric mean of the perplexity ratios to one-shot
    over the validation texts and the worst of them, as percent changes; columns of other names are listed."""
    spec = importlib.util.spec_from_file_location("table", SCRIPT.with_name("decomposition_table.py"))
    table = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(table)
    oneshot = {"ppl_validation": 40.0, "ppl_shakespeare-validation": 80.0}
    for column, sds in {"default": (20.0, 90.0), "damp": (30.0, 60.0)}.items():
        metrics = {"oneshot": oneshot, "sds": dict(zip(oneshot, sds))}
        (tmp_path / "sparsegpt_2-4" / column).mkdir(parents=True)
        (tmp_path / "sparsegpt_2-4" / column / "results.json").write_text(
            json.dumps({"metrics": metrics, "seconds": {"oneshot": 60.0, "sds": 90.0}}))
    _, row = table.cells(tmp_path / "sparsegpt_2-4")
    keys = list(oneshot)
    assert table.combined(row, "default", keys) == pytest.approx(((0.5 * 1.125) ** 0.5 - 1, 0.125))
    assert table.combined(row, "damp", keys) == pytest.approx((-0.25, -0.25))
    table.main(["--combine", ",".join(keys), str(tmp_path / "sparsegpt_2-4")])
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith("| default `redense=sds` (`admm_damp` 0.1) | `damp` |")
    assert "| sparsegpt 2:4 | +0.0% (+0.0%) | -25.0% (+12.5%) | -25.0% (-25.0%) |" in out
