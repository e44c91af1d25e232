"""Wanda (Sun et al., 2023): pruning by weights and activations."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sds_cli.engine.stats import LayerStats
from sds_cli.pruners.base import register
from sds_cli.sparsity import Pattern, mask_from_scores


@register("wanda")
@dataclass
class Wanda:
    """Score S_ij = |W_ij| * ||X_j||_2, compared within each output row (or N:M group), no weight
    update. The input norm ranks a weight by the signal it carries, so the few large-activation
    channels of LLMs keep their small weights; comparing per output row keeps every output's
    reconstruction equally sparse, which the paper found better than a per-layer threshold."""

    stats: ClassVar[str] = "sqnorm"

    @torch.no_grad()
    def __call__(
        self, weight: torch.Tensor, stats: LayerStats, pattern: Pattern
    ) -> tuple[torch.Tensor, torch.Tensor]:
        score = weight.abs() * stats.sqnorm.to(weight.device, torch.float32).sqrt()
        mask = mask_from_scores(score, pattern)
        return weight.masked_fill(mask, 0), mask
