"""`sds-bench`: what 2:4 sparsity buys at inference, measured on a CUDA GPU (``--device cpu``: unstructured and
N:M sparsity through DeepSparse, see ``cpubench``).

Every 2:4 linear inside the decoder blocks is stored in PyTorch's semi-structured sparse format
(``torch.sparse.to_sparse_semi_structured``, cuSPARSELt/CUTLASS kernels, compute capability 8.0+),
and timed against its dense self: each distinct layer shape at a prefill-sized input and at batch-1
decode, then the whole model's prefill and its per-token decode latency. The model is a pruned run's
saved dir (``save.final=true``) or a random-weight shape with a 2:4 magnitude mask: kernel speed
depends on shapes and pattern, not on the values."""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
from pathlib import Path

import torch
from rich.markup import escape
from torch import nn
from torch.nn import functional as F

from .console import console
from .engine import model_linears
from .pruners.base import ConfigError, Pattern, mask_from_scores

TWO_FOUR = Pattern.parse("2:4")
SHAPES = {  # random-weight stand-ins: (family, architecture)
    "smollm2-135m": ("llama", {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                               "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152}),
    "opt-1.3b": ("opt", {"hidden_size": 2048, "ffn_dim": 8192, "num_hidden_layers": 24, "num_attention_heads": 32,
                         "word_embed_proj_dim": 2048, "vocab_size": 50272}),
    "llama-2-7b": ("llama", {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000}),
}


def support_problem() -> str | None:
    """Why 2:4 kernels cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible: the 2:4 semi-structured kernels run only on NVIDIA GPUs (Ampere or newer)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return (f"{torch.cuda.get_device_name()} has compute capability {major}.{minor}; "
                "2:4 semi-structured sparsity needs 8.0 or newer (A100, H100, RTX 30xx+)")
    return None


def is_two_four(weight: torch.Tensor) -> bool:
    rows, cols = weight.shape
    return cols % 4 == 0 and bool(((weight.reshape(rows, -1, 4) != 0).sum(-1) <= 2).all())


def two_four_linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {f"{i}.{n}": lin for i, n, lin in model_linears(model) if is_two_four(lin.weight)}


def apply_magnitude_two_four(model: nn.Module) -> None:
    """A 2:4 pattern on every decoder linear, for the random-weight shapes."""
    for _, _, linear in model_linears(model):
        linear.weight.data.masked_fill_(mask_from_scores(linear.weight.abs().float(), TWO_FOUR), 0)


def load(model: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    if model in SHAPES:
        family, arch = SHAPES[model]
        with torch.device("cuda"):
            net = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **arch), dtype=dtype)
        apply_magnitude_two_four(net)
        return net.eval()
    if not (Path(model) / "config.json").is_file():
        raise ConfigError(f"model '{model}' is neither a saved model dir nor a shape; choose a dir or one of: "
                          f"{', '.join(SHAPES)}")
    return AutoModelForCausalLM.from_pretrained(model, dtype=dtype).cuda().eval()


def timed(fn, repeats: int) -> float:
    """Median milliseconds of ``fn`` over ``repeats`` CUDA-event-timed calls, after warm-up."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


@torch.no_grad()
def layer_speedups(linears: dict[str, nn.Linear], tokens: dict[str, int], repeats: int) -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    rows, seen = [], {}
    for name, linear in linears.items():
        seen.setdefault(tuple(linear.weight.shape), name)
    for shape, name in seen.items():
        w = linears[name].weight
        sparse = to_sparse_semi_structured(w)
        for phase, count in tokens.items():
            x = torch.randn(count, w.shape[1], device=w.device, dtype=w.dtype)
            dense_ms, sparse_ms = (timed(functools.partial(F.linear, x, weight), repeats) for weight in (w, sparse))
            rows.append({"shape": f"{shape[0]}x{shape[1]}", "example": name, "phase": phase, "tokens": count,
                         "dense_ms": dense_ms, "sparse_ms": sparse_ms, "speedup": dense_ms / sparse_ms})
    return rows


@torch.no_grad()
def model_latency(model: nn.Module, prefill: int, decode: int, repeats: int) -> dict[str, float]:
    ids = torch.randint(0, model.config.vocab_size, (1, prefill), device="cuda")
    prefill_ms = timed(functools.partial(model, ids, use_cache=False), repeats)
    prompt = ids[:, :16]
    generate = functools.partial(model.generate, prompt, max_new_tokens=decode, min_new_tokens=decode, do_sample=False)
    return {"prefill_ms": prefill_ms, "decode_ms_per_token": timed(generate, max(repeats // 4, 2)) / decode}


def sparsify(linears: dict[str, nn.Linear]) -> None:
    from torch.sparse import to_sparse_semi_structured

    for linear in linears.values():
        linear.weight = nn.Parameter(to_sparse_semi_structured(linear.weight), requires_grad=False)


def main(argv: list[str] | None = None) -> None:
    from . import cpubench

    parser = argparse.ArgumentParser(prog="sds-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help=f"a saved pruned model dir, or a random-weight shape: {', '.join(SHAPES)} "
                                      f"(cuda: 2:4 mask), with --device cpu also {', '.join(cpubench.MLP_SHAPES)}")
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
            cpubench.run(args)
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
    report(args, layers, dense, sparse, len(linears))


def report(args, layers: list[dict], dense: dict, sparse: dict, count: int) -> None:
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
