"""Sparsity patterns (unstructured fraction or N:M) and the masks that realize them."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from sds_cli.errors import ConfigError

STRUCTURED = ("tyr", "flap")  # pruners removing whole heads and channels: a smaller dense model, no re-dense


def structured(pruner: str) -> bool:
    """Whether a pruner, or a preset of one (``tyr-paper``), removes whole structures; its sparsity is then the
    fraction of decoder-block parameters removed."""
    return pruner.split("-")[0] in STRUCTURED


@dataclass(frozen=True)
class Pattern:
    """Unstructured sparsity (fraction of zeros) or N:M (at most ``n`` non-zeros in every ``m``
    consecutive input weights of a row, the convention of NVIDIA's 2:4 and the Wanda paper)."""

    sparsity: float
    n: int = 0
    m: int = 0

    @property
    def nm(self) -> bool:
        return self.m > 0

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.nm else f"{self.sparsity:g}"

    @classmethod
    def parse(cls, value: object) -> Pattern:
        text = str(value).strip()
        if match := re.fullmatch(r"(\d+):(\d+)", text):
            n, m = int(match[1]), int(match[2])
            if not 0 < n < m:
                raise ConfigError(f"sparsity '{text}': N:M needs 0 < N < M (e.g. 2:4, 4:8)")
            return cls(1 - n / m, n, m)
        try:
            ratio = float(text)
        except ValueError:
            raise ConfigError(
                f"sparsity '{text}' is neither a fraction in (0, 1) nor N:M (e.g. 0.5, 2:4, 4:8)"
            ) from None
        if not 0 < ratio < 1:
            raise ConfigError(f"sparsity {text} is outside (0, 1); use e.g. 0.5, or N:M like 2:4")
        return cls(ratio)

def mask_from_scores(score: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Boolean mask (True = pruned) that removes the lowest-scoring weights.

    Unstructured patterns compare within each row (score shape ``[rows, cols]``) and prune exactly
    ``round(cols * sparsity)`` per row; N:M prunes the ``m - n`` lowest of every ``m`` columns."""
    rows, cols = score.shape
    mask = torch.zeros_like(score, dtype=torch.bool)
    if pattern.nm:
        if cols % pattern.m:
            raise ConfigError(f"N:M {pattern}: input width {cols} is not divisible by M={pattern.m}")
        groups = score.reshape(rows, cols // pattern.m, pattern.m)
        idx = torch.topk(groups, pattern.m - pattern.n, dim=-1, largest=False).indices
        return mask.reshape_as(groups).scatter_(-1, idx, True).reshape(rows, cols)
    k = round(cols * pattern.sparsity)
    idx = torch.topk(score, k, dim=1, largest=False, sorted=False).indices  # a set: sorting it would double the cost
    return mask.scatter_(1, idx, True)


def is_two_four(weight: torch.Tensor) -> bool:
    rows, cols = weight.shape
    return cols % 4 == 0 and bool(((weight.reshape(rows, -1, 4) != 0).sum(-1) <= 2).all())
