"""Stage 1 of SDS (and the plain one-shot baseline): prune every selected linear, block by block."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sds_cli.engine.stats import collect, relative_error
from sds_cli.engine.stream import Stream, sync
from sds_cli.engine.walk import BlockStage, BlockStore, walk
from sds_cli.pruners.base import Pruner
from sds_cli.sparsity import Pattern


@dataclass
class LayerRecord:
    block: int
    layer: str
    shape: tuple[int, int]
    sparsity: float
    error: float
    seconds: float


@dataclass
class OneShot(BlockStage):
    """Every ``targets`` linear of a block pruned on the statistics of its inputs in the model pruned so far."""

    pruner: Pruner
    pattern: Pattern
    targets: str

    def step(self, i, block, stream, linears):
        records = []
        stats = collect(block, stream, list(linears))
        for name, linear in linears.items():
            start = time.perf_counter()
            weight = linear.weight.detach().to(torch.float32, copy=True)
            pruned, mask = self.pruner(weight, stats[name], self.pattern)
            linear.weight.data = pruned.to(linear.weight.dtype)
            sync(weight.device)
            records.append(LayerRecord(i, name, tuple(weight.shape), mask.float().mean().item(),
                                       relative_error(weight, pruned, stats[name].gram),
                                       time.perf_counter() - start))
        return records


def prune_model(model, stream: Stream, pruner: Pruner, pattern: Pattern, targets: str,
                progress=lambda i: None, checkpoint: BlockStore | None = None) -> list[dict]:
    """Stage 1: every selected linear pruned, block by block; returns the per-layer records."""
    return walk(model, stream, OneShot(pruner, pattern, targets), checkpoint, progress)
