"""Magnitude pruning: the data-free baseline."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sds_cli.engine.stats import LayerStats
from sds_cli.pruners.base import register
from sds_cli.sparsity import Pattern, mask_from_scores


@register("magnitude")
@dataclass
class Magnitude:
    """Remove the smallest |W_ij|. Unstructured sparsity uses one threshold for the whole layer (the
    classic global-per-layer rule, so rows may end up unevenly sparse); N:M compares within groups."""

    stats: ClassVar[str] = "none"

    @torch.no_grad()
    def __call__(
        self, weight: torch.Tensor, stats: LayerStats | None, pattern: Pattern
    ) -> tuple[torch.Tensor, torch.Tensor]:
        score = weight.abs()
        # One row holding the whole matrix makes the per-row rule of mask_from_scores a per-layer one.
        mask = mask_from_scores(score if pattern.nm else score.reshape(1, -1), pattern).view_as(weight)
        return weight.masked_fill(mask, 0), mask
