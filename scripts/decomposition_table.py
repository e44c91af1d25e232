"""The decomposition table from scripts/decompose.py's output: one row per setting, one column per variant.

    python scripts/decomposition_table.py DIR [DIR ...]   # each DIR holds one setting's column directories
    python scripts/decomposition_table.py --metrics ppl_shakespeare,ppl_shakespeare-validation DIR ...
    python scripts/decomposition_table.py --combine ppl_validation,ppl_shakespeare-validation DIR ...

Perplexities are test (WikiText-2) / validation by default, else the ``--metrics`` keys of results.json; seconds are
the column's own stage (the one-shot stage for ``oneshot`` and ``admm``, stages 2-3 for the re-dense columns),
without evaluation. Columns of other names (``decompose.py --column NAME=...``) follow the standard ones.

``--combine`` prints instead the rule defaults are chosen by, over validation texts in and off the calibration
domain: per column, the geometric mean of its perplexity ratios to one-shot over the given keys, as a percent
change, and the worst of those ratios in brackets (a default must not be above one-shot on any of them). Prints
Markdown."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from sds_cli.paths import preset

ORDER = ["oneshot", "adjust_only", "admm", "sds_paper", "damp0", "default"]
TITLES = {"oneshot": "one-shot", "adjust_only": "one-shot + ADMM adjust (`redense.iters=0 redense.admm_damp=0`)",
          "admm": "`pruner=admm` alone", "sds_paper": "`redense=sds_paper`", "damp0": "`redense.admm_damp=0`",
          "default": f"default `redense=sds` (`admm_damp` {preset('redense', 'sds')['admm_damp']:g})"}


def cells(setting: Path) -> tuple[str, dict[str, tuple[dict, float]]]:
    """The setting's name and, per column, its metrics and seconds."""
    out = {}
    for column in sorted(p for p in setting.iterdir() if (p / "results.json").is_file()):
        r = json.loads((column / "results.json").read_text())
        stage = "oneshot" if column.name == "admm" else "sds"  # admm is a one-shot pruner: its stage 1
        out[column.name] = (r["metrics"][stage], r["seconds"][stage])
        if stage == "sds" and len(r["metrics"]["oneshot"]) > len(out.get("oneshot", ({}, 0))[0]):
            out["oneshot"] = (r["metrics"]["oneshot"], r["seconds"]["oneshot"])  # the record scoring most texts
    words = [f"{float(w):.0%}" if w.replace(".", "", 1).isdigit() else w.replace("-", ":") for w in setting.name.split("_")]
    return " ".join(words), out  # wanda_0.5_embedded: "wanda 50% embedded"


def cell(row: dict, column: str, metrics: list[str]) -> str:
    if column not in row or any(k not in row[column][0] for k in metrics):
        return ""
    m, seconds = row[column]
    return " / ".join(f"{m[k]:.2f}" for k in metrics) + f" ({seconds / 60:.1f} min)"


def combined(row: dict, column: str, metrics: list[str]) -> tuple[float, float] | None:
    """Geometric mean and worst of the column's perplexity ratios to one-shot over ``metrics``, as changes."""
    if column not in row or "oneshot" not in row or any(k not in row[c][0] for c in (column, "oneshot") for k in metrics):
        return None
    ratios = [row[column][0][k] / row["oneshot"][0][k] for k in metrics]
    return math.prod(ratios) ** (1 / len(ratios)) - 1, max(ratios) - 1


def combined_cell(row: dict, column: str, metrics: list[str]) -> str:
    score = combined(row, column, metrics)
    return "" if score is None else f"{score[0]:+.1%} ({score[1]:+.1%})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--metrics", default="ppl_wikitext2,ppl_validation", help="comma-separated results.json keys")
    parser.add_argument("--combine", help="comma-separated validation keys: the combined rule instead of the metrics")
    args = parser.parse_args(argv)
    metrics, render = (args.combine.split(","), combined_cell) if args.combine else (args.metrics.split(","), cell)
    rows = [cells(Path(d)) for d in args.dirs]
    names = {c for _, row in rows for c in row}
    present = [c for c in ORDER if c in names] + sorted(names - set(ORDER))
    print("| setting | " + " | ".join(TITLES.get(c, f"`{c}`") for c in present) + " |")
    print("| --- |" + " ---: |" * len(present))
    for name, row in rows:
        print(f"| {name} | " + " | ".join(render(row, c, metrics) for c in present) + " |")


if __name__ == "__main__":
    main()
