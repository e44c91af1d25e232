"""`sds-bench`: what 2:4 sparsity buys at inference, measured on a CUDA GPU (``--device cpu``: unstructured and
N:M sparsity through DeepSparse, see ``bench.cpu``).

Every 2:4 linear inside the decoder blocks is stored in PyTorch's semi-structured sparse format
(``torch.sparse.to_sparse_semi_structured``, cuSPARSELt/CUTLASS kernels, compute capability 8.0+),
and timed against its dense self: each distinct layer shape at a prefill-sized input and at batch-1
decode, then the whole model's prefill and its per-token decode latency. The model is a pruned run's
saved dir (``save.final=true``) or a random-weight shape with a 2:4 magnitude mask: kernel speed
depends on shapes and pattern, not on the values."""
from __future__ import annotations

import functools
import statistics
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from sds_cli.bench.presets import SHAPES
from sds_cli.engine.walk import model_linears
from sds_cli.errors import ConfigError
from sds_cli.sparsity import Pattern, is_two_four, mask_from_scores

TWO_FOUR = Pattern.parse("2:4")


def support_problem() -> str | None:
    """Why 2:4 kernels cannot run here, or None."""
    if not torch.cuda.is_available():
        return "no CUDA GPU is visible: the 2:4 semi-structured kernels run only on NVIDIA GPUs (Ampere or newer)"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return (f"{torch.cuda.get_device_name()} has compute capability {major}.{minor}; "
                "2:4 semi-structured sparsity needs 8.0 or newer (A100, H100, RTX 30xx+)")
    return None


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


