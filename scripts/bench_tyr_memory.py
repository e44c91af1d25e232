"""Peak memory of the Týr stage against a one-shot stage, on a Llama-3-8B-shaped model cut to a few blocks.

    python scripts/bench_tyr_memory.py --blocks 2 --windows 4 --seqlen 128 --out bench_tyr_memory.json

The model is a LlamaForCausalLM with random weights, Llama-3-8B's block shape (hidden 4096, FFN 14336, 32 query
and 8 key/value heads of 128) and a small vocabulary (the embedding and head are not what is measured). Each
stage runs in its own process, so that its peak resident set size (getrusage's ru_maxrss; tracemalloc misses
torch's allocations) is its own: Wanda at 50% through the engine (the one-shot stage), then Týr at 50% with
tiny search budgets, once per ``pruner.candidates`` mode. Printed as JSON: peak RSS, RSS once the model is
built, the accelerator's peak allocation where there is one, the candidates' bytes (in memory or on disk),
seconds in all and per block. Nothing here asserts a figure.

    python scripts/bench_tyr_memory.py --stages local [--local-width 7168]

measures the local pruner alone instead: the OBS levels of one down_proj-shaped layer ([hidden, width], the
supernet's 9 levels at 50%, random correlated inputs), its peak RSS above the RSS with its inputs built.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

SHAPE = {"hidden_size": 4096, "intermediate_size": 14336, "num_attention_heads": 32, "num_key_value_heads": 8,
         "max_position_embeddings": 8192, "rope_theta": 500000.0}
SEARCH = {"iterations": 1, "generations": 2, "offspring": 3, "selection": [[2, 64], [1, 128]], "search_windows": 2,
          "kl_topk": 64}  # tiny budgets: the search's memory does not grow with them


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _stage(args) -> dict:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.stage == "local":
        return _local(args)
    torch.manual_seed(0)
    config = AutoConfig.for_model("llama", vocab_size=args.vocab, num_hidden_layers=args.blocks, **SHAPE)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval().requires_grad_(False)
    calib = torch.randint(0, args.vocab, (args.windows, args.seqlen), generator=torch.Generator().manual_seed(0))
    built, start, out = _rss(), time.perf_counter(), {}
    if args.stage == "oneshot":
        from sds_cli.engine.stream import capture
        from sds_cli.paths import preset, top_default
        from sds_cli.pruners.base import build_pruner
        from sds_cli.sparsity import Pattern
        from sds_cli.stages.oneshot import prune_model

        stream = capture(model, calib, 1, args.device, False)
        prune_model(model, stream, build_pruner(**preset("pruner", "wanda")), Pattern.parse("0.5"),
                    top_default("targets"))
    else:
        from sds_cli.stages.tyr.search import TyrConfig, prune

        @contextmanager
        def bar(description, total):
            yield lambda n=1: None

        with tempfile.TemporaryDirectory(dir=args.workdir) as work:
            cfg = TyrConfig.preset(candidates=args.stage.split("-")[1], **SEARCH)
            extra = prune(model, calib, 0.5, cfg, args.device, 0, 1, False, None, bar, Path(work))["extra"]
        out = {"candidate_bytes": max(it["candidate_bytes"] for it in extra["iterations"]),
               "removed_fraction": extra["block_params"]["removed_fraction"]}
    seconds = time.perf_counter() - start
    out |= {"stage": args.stage, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "model_rss_gib": built / 2**30, "seconds": seconds, "seconds_per_block": seconds / args.blocks}
    if args.device.startswith("cuda"):
        out["device_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def _local(args) -> dict:
    """The local pruner's working set on one down_proj: what sets the Týr stage's peak on an 8B shape."""
    import torch

    from sds_cli.paths import preset
    from sds_cli.stages.tyr.local import obs_levels
    from sds_cli.stages.tyr.search import level_offsets

    width, hidden = args.local_width, SHAPE["hidden_size"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.windows * args.seqlen, width, generator=g)
    gram, weight = x.T @ x / len(x), torch.randn(hidden, width, generator=g).to(getattr(torch, args.dtype))
    del x
    tyr = preset("pruner", "tyr")  # the first iteration's levels: pruner.levels around the centre, pruner.step apart
    center, spacing = width // 2, round(tyr["step"] * width)
    removals = [center + k * spacing for k in level_offsets(center, spacing, tyr["levels"], width)]
    built, start = _rss(), time.perf_counter()
    obs_levels(weight, gram, 1, removals, rounds=16)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"stage": "local", "width": width, "levels": len(removals), "inputs_rss_gib": built / 2**30,
            "peak_rss_gib": peak / 2**30, "peak_above_inputs_gib": (peak - built) / 2**30,
            "float64_matrix_gib": width * width * 8 / 2**30, "seconds": time.perf_counter() - start}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--blocks", type=int, default=2, help="decoder blocks (default: %(default)s)")
    parser.add_argument("--vocab", type=int, default=1024, help="vocabulary size (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=4, help="calibration windows (default: %(default)s)")
    parser.add_argument("--seqlen", type=int, default=128, help="calibration window length (default: %(default)s)")
    parser.add_argument("--dtype", default="bfloat16", help="model dtype (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    parser.add_argument("--workdir", default=None, help="where pruner.candidates=disk writes (default: a temp dir)")
    parser.add_argument("--stages", default="oneshot,tyr-host,tyr-disk", help="(default: %(default)s)")
    parser.add_argument("--local-width", type=int, default=SHAPE["intermediate_size"],
                        help="input width of the local stage's layer (default: %(default)s, Llama-3-8B's FFN)")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # one stage, in this process
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.stage:
        print(json.dumps(_stage(args)))
        return
    rows = []
    forward = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("stages", "stage", "out") and v is not None]
    for stage in args.stages.split(","):
        proc = subprocess.run([sys.executable, __file__, *forward, "--stage", stage], capture_output=True, text=True,
                              check=True)
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr)
    report = {"shape": SHAPE | {"blocks": args.blocks, "vocab": args.vocab, "dtype": args.dtype},
              "calibration": [args.windows, args.seqlen], "search": SEARCH, "device": args.device, "stages": rows}
    print(json.dumps(report, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
