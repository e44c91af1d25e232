"""Stage 1 of SDS (and the plain one-shot baseline): prune every selected linear, block by block."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .checkpoint import StageCheckpoint
from .engine import Stream, collect, walk
from .pruners.base import Pattern, Pruner


def relative_error(weight: torch.Tensor, new: torch.Tensor, gram: torch.Tensor) -> float:
    """||W X - W' X||^2 / ||W X||^2 from the second moment X X^T alone."""
    diff = weight - new
    return ((diff @ gram) * diff).sum().item() / max(((weight @ gram) * weight).sum().item(), 1e-30)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class LayerRecord:
    block: int
    layer: str
    shape: tuple[int, int]
    sparsity: float
    error: float
    seconds: float


def prune_model(model, stream: Stream, pruner: Pruner, pattern: Pattern, layers: str,
                progress=lambda i: None, checkpoint: StageCheckpoint | None = None) -> list[dict]:
    """Stage 1: every selected linear pruned, block by block; returns the per-layer records."""

    def step(i, block, inputs, linears):
        records = []
        stats = collect(block, inputs, list(linears))
        for name, linear in linears.items():
            start = time.perf_counter()
            weight = linear.weight.detach().to(torch.float32, copy=True)
            pruned, mask = pruner(weight, stats[name], pattern)
            linear.weight.data = pruned.to(linear.weight.dtype)
            sync(weight.device)
            records.append(LayerRecord(i, name, tuple(weight.shape), mask.float().mean().item(),
                                       relative_error(weight, pruned, stats[name].gram),
                                       time.perf_counter() - start))
        return records

    return walk(model, stream, step, progress, checkpoint, layers)
