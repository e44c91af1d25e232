"""`sds-bench`: what sparsity buys at inference (CUDA 2:4 kernels, or DeepSparse on the CPU)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from rich.markup import escape

from sds_cli.bench.gpu import layer_speedups, load, model_latency, sparsify, support_problem, two_four_linears
from sds_cli.bench.presets import MLP_SHAPES, SHAPES
from sds_cli.console import console
from sds_cli.errors import ConfigError


def main(argv: list[str] | None = None) -> None:
    from sds_cli.bench import cpu as cpu_bench

    parser = argparse.ArgumentParser(prog="sds-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help=f"a saved pruned model dir, or a random-weight shape: {', '.join(SHAPES)} "
                                      f"(cuda: 2:4 mask), with --device cpu also {', '.join(MLP_SHAPES)}")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--dtype", choices=["float16", "bfloat16", "float32"],
                        help="cuda: float16 (default) or bfloat16; cpu: float32 only")
    parser.add_argument("--prefill", type=int, nargs="+",
                        help="prefill tokens (batch 1); cuda times the first (default 2048), cpu each (default 2048 "
                             "128) and decodes after the shortest")
    parser.add_argument("--decode", type=int, default=64, help="cuda: generated tokens for the decode latency")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here")
    cpu = parser.add_argument_group("--device cpu")
    cpu.add_argument("--sparsity", help="shapes: fraction of zeros or N:M, e.g. 0.5 (default), 2:4, 4:8")
    cpu.add_argument("--threads", type=int, help="threads for PyTorch and DeepSparse (default: all cores)")
    cpu.add_argument("--dense", help="the dense reference: a model dir or a conf/model preset (default: the pruned "
                                     "model with its zeros filled)")
    cpu.add_argument("--backend", default="auto", choices=["auto", "deepsparse", "torch"],
                     help="deepsparse: sparse vs dense in DeepSparse, plus dense in PyTorch; torch: pruned vs dense "
                          "in PyTorch, for structurally pruned (smaller) models; auto: torch for a model without "
                          "zeros given --dense, else deepsparse")
    args = parser.parse_args(argv)
    try:
        if args.device == "cpu":
            cpu_bench.run(args)
            return
        misplaced = [f"--{k}" for k in ("sparsity", "threads", "dense") if getattr(args, k)]
        misplaced += ["--backend"] * (args.backend != "auto") + ["--dtype float32"] * (args.dtype == "float32")
        if misplaced:
            raise ConfigError(f"{', '.join(misplaced)}: for --device cpu only")
        args.dtype, args.prefill = args.dtype or "float16", (args.prefill or [2048])[0]
        if problem := support_problem():
            raise ConfigError(problem)
        model = load(args.model, getattr(torch, args.dtype))
        linears = two_four_linears(model)
        if not linears:
            raise ConfigError(f"no decoder linear of {args.model} has a 2:4 pattern; prune with sparsity=2:4 first")
        layers = layer_speedups(linears, {"prefill": args.prefill, "decode": 1}, args.repeats)
        dense = model_latency(model, args.prefill, args.decode, args.repeats)
        sparsify(linears)
        sparse = model_latency(model, args.prefill, args.decode, args.repeats)
    except (ConfigError, RuntimeError) as err:
        console.print(f"[bold red]error:[/] {escape(str(err).splitlines()[0])}", highlight=False, soft_wrap=True)
        sys.exit(2)
    show(args, layers, dense, sparse, len(linears))

def show(args, layers: list[dict], dense: dict, sparse: dict, count: int) -> None:
    from rich.table import Table

    table = Table(title=f"2:4 vs dense, {args.model} ({args.dtype}, {torch.cuda.get_device_name()})")
    for col in ("shape", "phase", "tokens", "dense_ms", "sparse_ms", "speedup"):
        table.add_column(col, justify="left" if col in ("shape", "phase") else "right")
    for row in layers:
        table.add_row(row["shape"], row["phase"], str(row["tokens"]),
                      *(f"{row[c]:.4g}" for c in ("dense_ms", "sparse_ms", "speedup")))
    for key, ms in dense.items():
        table.add_row("whole model", key.split("_")[0], "", f"{ms:.4g}", f"{sparse[key]:.4g}", f"{ms / sparse[key]:.4g}")
    console.print(table)
    console.print(f"{count} linears in 2:4 semi-structured format; medians of {args.repeats} runs, CUDA events")
    if args.out:
        body = {"model": args.model, "dtype": args.dtype, "gpu": torch.cuda.get_device_name(),
                "torch": torch.__version__, "layers": layers, "dense": dense, "sparse": sparse}
        args.out.write_text(json.dumps(body, indent=2))
