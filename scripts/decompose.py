"""Where SDS's gain comes from, on one setting: each column a variant of the method, all from one one-shot model.

Columns whose overrides touch only ``redense`` share the one-shot stage: it runs once, then each column restores
its weights and runs stages 2-3 and their evaluation, so a setting costs one one-shot plus the variants. Every
other column (``pruner=admm redense=none``) is a run of its own. Each column writes the results.json that
``sds-run`` with the same overrides writes (its whole config, metrics, layers, masks, stage seconds), plus
``shared_oneshot``: the column whose one-shot stage it started from. (``scripts/sds_study.py`` instead scores
variants on validation text only, to choose one; this writes the records a reported table is made from.)

  SDS_DATA_ROOT=DIR python scripts/decompose.py --out DIR -- experiment=cpu_protocol pruner=wanda sparsity=2:4 \
      'eval.zeroshot.tasks=[]'
  python scripts/decompose.py --out DIR --column sds_paper=redense=sds_paper \
      --column 'l1=redense=sds_paper redense.l1=0.1' -- ...   # columns of your own
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sds_cli import api
from sds_cli.cli import check_overrides
from sds_cli.engine.walk import model_linears
from sds_cli.paths import CONF
from sds_cli.pipeline import dense_baseline, oneshot_stage, prepare, replay_guard, resolved, sds_stage
from sds_cli.results.checkpoint import Checkpoint
from sds_cli.results.record import Record
from sds_cli.stages.redense.stage import snapshot

# one-shot | + the ADMM adjust alone (no re-dense, no pull toward the dense weights) | ADMM pruning alone | the paper's
# SDS | + re-dense | the default, + the adjust's pull toward the dense weights: each part of the default its own column
COLUMNS = {
    "adjust_only": ["redense=sds", "redense.iters=0", "redense.admm_damp=0"],
    "admm": ["pruner=admm", "redense=none"],
    "sds_paper": ["redense=sds_paper"],
    "damp0": ["redense=sds", "redense.admm_damp=0"],
    "default": ["redense=sds"],
}
SHARED_STAGE1 = ("oneshot", "replay_check", "dense_eval", "oneshot_eval")
SHARED_EXTRA = ("dense_cache", "replay_check", "left_dense", "warnings")


def config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=check_overrides(overrides))
    OmegaConf.set_struct(cfg, False)
    return cfg


def shares_stage1(overrides: list[str]) -> bool:
    return all(o.split("=", 1)[0].split(".")[0].lstrip("+~") == "redense" for o in overrides)


def column_record(first: Record, cfg, path: Path, source: str) -> Record:
    """A column's record, holding the shared stage-1 results of ``first``."""
    record = Record(path, resolved(cfg))
    record.metrics = {k: v for k, v in first.metrics.items() if k in ("dense", "oneshot")}
    record.seconds = {k: v for k, v in first.seconds.items() if k in SHARED_STAGE1}
    record.layers = {"oneshot": first.layers["oneshot"]}
    record.extra = {k: copy.deepcopy(v) for k, v in first.extra.items() if k in SHARED_EXTRA}
    for key in ("mask_sha1", "coverage", "profile"):
        record.extra[key] = {"oneshot": first.extra[key]["oneshot"]}
    record.extra["shared_oneshot"] = source
    return record


def run_shared(base: list[str], columns: dict[str, list[str]], out: Path) -> None:
    names = list(columns)
    cfg = config(base + columns[names[0]])
    first = Record(out / names[0] / "results.json", resolved(cfg))
    run = prepare(cfg, first, "sds")
    run.checkpoint = Checkpoint(None, {})
    if cfg.eval.dense:  # as sds-run
        dense_baseline(cfg, first, run.evaluate)
    replay_guard(run)
    oneshot_stage(run)
    oneshot = snapshot(run.lm.model, cfg.targets)
    linears = {(block, layer): linear for block, layer, linear in model_linears(run.lm.model, cfg.targets)}
    for i, name in enumerate(names):
        cfg = config(base + columns[name])
        record = first if i == 0 else column_record(first, cfg, out / name / "results.json", names[0])
        for key, weight in oneshot.items():  # every column starts from the same one-shot weights
            linears[key].weight.data.copy_(weight)
        run.cfg, run.record = cfg, record
        run.checkpoint = Checkpoint(None, {})  # it also holds evaluated metrics: a fresh one per column
        sds_stage(run)
        record.extra.setdefault("shared_oneshot", names[0])
        record.write("ok")
        print(f"{name}: {record.metrics['sds']}", flush=True)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="one sub-directory per column")
    parser.add_argument("--column", action="append", default=[], metavar="'NAME=OVERRIDE [OVERRIDE ...]'",
                        help=f"columns instead of the standard ones ({', '.join(COLUMNS)})")
    parser.add_argument("overrides", nargs="*", help="the setting, as sds-run's overrides")
    args = parser.parse_args(argv)
    columns = dict(c.split("=", 1) for c in args.column)
    columns = {k: v.split() for k, v in columns.items()} if columns else COLUMNS
    base = [*args.overrides, "checkpoint=false"]
    shared = {k: v for k, v in columns.items() if shares_stage1(v)}
    if shared:
        run_shared(base, shared, args.out)
    for name, overrides in columns.items():
        if name not in shared:
            result = api.run(base + overrides, run_dir=args.out / name)
            print(f"{name}: {result.metrics['oneshot']}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
