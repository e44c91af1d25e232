"""Stage 1 of SDS (and the plain one-shot baseline): prune every selected linear, block by block."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sds_cli.engine.stats import Frozen, relative_error
from sds_cli.engine.stream import Stream, sync
from sds_cli.engine.walk import BlockStore, GroupStage
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
class OneShot(GroupStage):
    """Every ``targets`` linear of a block pruned on the statistics of its inputs. Not ``sequential`` (SparseGPT's
    OPT script): all from the block as it enters the stage, then a second forward for the next block's inputs.
    ``sequential`` (GPTQ/SparseGPT's ``--true-sequential``): each input group on its inputs in the pruned block,
    one forward per block (``GroupStage``)."""

    pruner: Pruner
    pattern: Pattern
    targets: str
    sequential: bool
    frozen: Frozen | None = None

    def layer(self, i, name, linear, stats):
        start = time.perf_counter()
        weight = linear.weight.detach().to(torch.float32, copy=True)
        pruned, mask = self.pruner(weight, stats, self.pattern)
        linear.weight.data = pruned.to(linear.weight.dtype)
        sync(weight.device)
        return LayerRecord(i, name, tuple(weight.shape), mask.float().mean().item(),
                           relative_error(weight, pruned, stats.gram), time.perf_counter() - start)


def prune_model(model, stream: Stream, pruner: Pruner, pattern: Pattern, targets: str,
                progress=lambda i: None, checkpoint: BlockStore | None = None, sequential: bool = False,
                profile: dict | None = None) -> list[dict]:
    """Stage 1: every selected linear pruned, block by block; returns the per-layer records (and fills ``profile``
    with the stage's seconds per part)."""
    return OneShot(pruner, pattern, targets, sequential).run(model, stream, checkpoint, progress, profile)
