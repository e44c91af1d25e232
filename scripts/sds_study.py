"""SDS knob study: one one-shot stage, then every SDS variant started from the same one-shot weights,
each scored by perplexity on validation windows (`eval=validation`: calibration text outside the
calibration windows). The variant with the lowest validation perplexity is chosen before any test
window is looked at; the test text is evaluated only for the one-shot model, the paper's variant and
the chosen one. Stage times are measured in the same process.

    python scripts/sds_study.py --out docs/sds-study/sparsegpt_2-4.json pruner=sparsegpt sparsity=2:4 \
        model=smollm2-135m calib=wikitext2-valid calib.nsamples=64 calib.seqlen=512 data.root=../shared/data \
        eval.seqlen=512 eval.max_windows=32 device=cpu
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sds_cli import data
from sds_cli.engine.replay import check_replay
from sds_cli.engine.stream import capture
from sds_cli.engine.walk import model_linears
from sds_cli.eval.evaluator import Evaluator
from sds_cli.models import load_model
from sds_cli.paths import CONF
from sds_cli.pruners.base import build_pruner
from sds_cli.sparsity import Pattern
from sds_cli.stages.oneshot import prune_model
from sds_cli.stages.redense.stage import RedenseConfig, sds_model, snapshot

PAPER = "soft"
VARIANTS = {  # redense overrides on top of conf/redense/sds.yaml
    "soft": {"adjust": "soft", "adjust_iters": 50},
    "admm30": {"adjust": "admm", "adjust_iters": 30},
    "admm50": {"adjust": "admm", "adjust_iters": 50},
    "admm30_rho0.01": {"adjust": "admm", "adjust_iters": 30, "admm_rho": 0.01},
    "admm30_rho0.3": {"adjust": "admm", "adjust_iters": 30, "admm_rho": 0.3},
    "admm30_rho1": {"adjust": "admm", "adjust_iters": 30, "admm_rho": 1.0},
    "admm30_seq": {"adjust": "admm", "adjust_iters": 30, "sequential": True},
    "admm30_dense_outputs": {"adjust": "admm", "adjust_iters": 30, "target": "dense_outputs"},
    "refit": {"adjust": "refit"},
    "refit_no_redense": {"adjust": "refit", "iters": 0},
    "refit_l2": {"adjust": "refit", "l2": 0.1},
    "none": {"adjust": "none"},
}


def restore(model, weights: dict, layers: str) -> None:
    for i, name, linear in model_linears(model, layers):
        linear.weight.data = weights[i, name].to(linear.weight)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--test", default="wikitext2", help="the eval dataset reported as test")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of: {', '.join(VARIANTS)}")
    args, overrides = parser.parse_known_args()
    args.variants = args.variants.split(",")
    if unknown := set(args.variants) - set(VARIANTS):
        parser.error(f"unknown variants {sorted(unknown)}; choose from: {', '.join(VARIANTS)}")
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", overrides=[*overrides, "eval.datasets=[validation]"])
        test_cfg = compose("config", overrides=[*overrides, f"eval.datasets=[{args.test}]"])
    torch.manual_seed(cfg.seed)
    lm = load_model(cfg.model, cfg.dtype)
    val, test = Evaluator(cfg, lm, cfg.device), Evaluator(test_cfg, lm, cfg.device)
    calib = data.calibration_windows(lm.tokenizer, cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen,
                                     cfg.seed, cfg.data.root, cfg.calib.path)
    pattern, pruner = Pattern.parse(cfg.sparsity), build_pruner(**cfg.pruner)
    out = {"config": OmegaConf.to_container(cfg, resolve=True), "variants": VARIANTS, "paper": PAPER,
           "rule": "lowest validation perplexity", "seconds": {}, "validation": {}, "test": {}}
    out["validation"]["dense"], out["test"]["dense"] = val("dense")["ppl_validation"], test("dense")[f"ppl_{args.test}"]
    dense = snapshot(lm.model, cfg.targets)
    start = time.perf_counter()
    _, forms = check_replay(lm.model, calib[:1], cfg.device, 1e-4)
    out["seconds"]["replay_check"] = time.perf_counter() - start
    start = time.perf_counter()
    stream = capture(lm.model, calib, cfg.engine.batch_size, cfg.device, cfg.engine.offload, forms)
    prune_model(lm.model, stream, pruner, pattern, cfg.targets)
    out["seconds"]["oneshot"] = time.perf_counter() - start
    oneshot = snapshot(lm.model, cfg.targets)
    out["validation"]["oneshot"], out["test"]["oneshot"] = (val("oneshot")["ppl_validation"],
                                                            test("oneshot")[f"ppl_{args.test}"])
    print(json.dumps(out["validation"]), flush=True)
    results = {}
    for name in args.variants:
        restore(lm.model, oneshot, cfg.targets)
        redense = RedenseConfig(**(OmegaConf.to_container(cfg.redense) | VARIANTS[name] | {"name": name}))
        start = time.perf_counter()
        records = sds_model(lm.model, stream, dense, pruner, pattern, cfg.targets, redense)
        out["seconds"][name] = time.perf_counter() - start
        out["validation"][name] = val(name)["ppl_validation"]
        out.setdefault("kept_sds", {})[name] = sum(r["kept"] == "sds" for r in records) / len(records)
        results[name] = snapshot(lm.model, cfg.targets)
        print(name, out["validation"][name], f"{out['seconds'][name]:.0f} s", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=1))
    out["chosen"] = min(args.variants, key=lambda n: out["validation"][n])
    for name in dict.fromkeys([out["chosen"], PAPER]):
        if name in results:
            restore(lm.model, results[name], cfg.targets)
            out["test"][name] = test(name)[f"ppl_{args.test}"]
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("validation", "test", "seconds", "chosen")}, indent=1))


if __name__ == "__main__":
    main()
