"""Stage 1 of SDS (and the plain one-shot baseline): prune every selected linear, block by block."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sds_cli.engine.stats import Frozen, relative_error
from sds_cli.engine.stream import Stream, sync
from sds_cli.engine.walk import BlockStore, GroupStage
from sds_cli.pruners.base import Pruner, build_pruner
from sds_cli.sparsity import Pattern

# An expert no calibration token was routed to has no statistics to weigh its weights by: magnitude prunes it (its
# record's tokens says 0). Experts with fewer tokens than inputs get the pruner itself (SparseGPT damps the gram).
UNSEEN = build_pruner("magnitude")


@dataclass
class LayerRecord:
    block: int
    layer: str
    shape: tuple[int, int]
    sparsity: float
    error: float
    seconds: float
    tokens: int  # calibration tokens behind the statistics: for a fused expert, those routed to it


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
        weight = linear.weight.detach().to(torch.float32, copy=True, memory_format=torch.contiguous_format)
        pruned, mask = (self.pruner if stats.tokens else UNSEEN)(weight, stats, self.pattern)
        linear.weight.data.copy_(pruned)
        sync(weight.device)
        return LayerRecord(i, name, tuple(weight.shape), mask.float().mean().item(),
                           relative_error(weight, pruned, stats.gram), time.perf_counter() - start, stats.tokens)


def prune_model(model, stream: Stream, pruner: Pruner, pattern: Pattern, targets: str,
                progress=lambda i: None, checkpoint: BlockStore | None = None, sequential: bool = False,
                profile: dict | None = None) -> list[dict]:
    """Stage 1: every selected linear pruned, block by block; returns the per-layer records (and fills ``profile``
    with the stage's seconds per part)."""
    return OneShot(pruner, pattern, targets, sequential).run(model, stream, checkpoint, progress, profile)
