"""SparseGPT (Frantar & Alistarh, 2023): one-shot pruning with OBS reconstruction."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import ClassVar

import torch

from sds_cli.engine.stats import LayerStats
from sds_cli.errors import ConfigError
from sds_cli.pruners.base import register
from sds_cli.sparsity import Pattern

log = logging.getLogger(__name__)

RETRIES = 3


def inverse_hessian_factor(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor U of (H + damp I)^-1, damp = percdamp * mean(diag H).

    Row i of U, scaled by 1 / U_ii, is the OBS update of the columns after i once columns < i are
    fixed, so one factorization serves the whole left-to-right sweep. A singular H (fewer calibration
    tokens than inputs, collinear inputs) is retried with 10x more damping, each retry logged: the
    undamped problem has no answer to fall back to."""
    eye = torch.eye(H.shape[0], device=H.device, dtype=H.dtype)
    mean = torch.diagonal(H).mean()
    for attempt in range(RETRIES + 1):
        if attempt:
            percdamp = max(percdamp, 1e-3) * 10
            log.warning("SparseGPT: Hessian not positive definite; retrying with percdamp=%g", percdamp)
        with contextlib.suppress(torch.linalg.LinAlgError):
            L = torch.linalg.cholesky(H + percdamp * mean * eye)
            inverse = torch.cholesky_solve(eye, L)  # = cholesky_inverse(L), many times faster on CPU
            return torch.linalg.cholesky(inverse, upper=True)
    raise RuntimeError(
        f"SparseGPT: Hessian not positive definite even with percdamp={percdamp:g}; check the calibration "
        "activations (too few tokens, NaN/inf) or raise pruner.percdamp"
    )


@register("sparsegpt")
@dataclass
class SparseGPT:
    """Prune columns left to right, compensating each removed weight w_q on the not-yet-pruned weights
    of its row by the OBS update  dW = -(w_q / [H^-1]_qq) [H^-1]_q,:  with H = E[x x^T].

    Masks are chosen adaptively per block of ``blocksize`` columns (unstructured: the lowest
    w^2 / [H^-1]_qq^2 of the whole block, so rows and columns may differ in sparsity) or per group of
    M columns (N:M), each time on the already-updated weights. Unlike the reference, which thresholds
    each block at a sorted quantile, the count is exact: block targets are taken from the cumulative
    ``round(rows * cols_so_far * sparsity)`` so rounding never drifts and the layer total is exact."""

    stats: ClassVar[str] = "gram"
    blocksize: int = 128
    percdamp: float = 0.01

    def __post_init__(self) -> None:
        if self.blocksize < 1:
            raise ConfigError(f"sparsegpt: blocksize must be >= 1, got {self.blocksize}")
        if self.percdamp < 0:
            raise ConfigError(f"sparsegpt: percdamp must be >= 0, got {self.percdamp}")

    @torch.no_grad()
    def __call__(
        self, weight: torch.Tensor, stats: LayerStats, pattern: Pattern
    ) -> tuple[torch.Tensor, torch.Tensor]:
        rows, cols = weight.shape
        m = pattern.m
        if pattern.nm and (cols % m or self.blocksize % m):
            raise ConfigError(
                f"sparsegpt {pattern}: input width {cols} and blocksize {self.blocksize} must be multiples of M={m}"
            )
        W = weight.to(torch.float32, copy=True)
        H = stats.gram.to(W.device, torch.float32, copy=True)
        dead = torch.diagonal(H) == 0
        H[dead, dead] = 1
        W[:, dead] = 0
        Hinv = inverse_hessian_factor(H, self.percdamp)
        mask = torch.zeros_like(W, dtype=torch.bool)

        for i1 in range(0, cols, self.blocksize):
            i2 = min(i1 + self.blocksize, cols)
            W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
            d = torch.diagonal(Hinv1)
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
            Err1 = torch.zeros_like(W1)
            if not pattern.nm:
                k = round(rows * i2 * pattern.sparsity) - round(rows * i1 * pattern.sparsity)
                mask1.view(-1)[torch.topk(((W1 / d) ** 2).flatten(), k, largest=False).indices] = True
            for i in range(i2 - i1):
                if pattern.nm and i % m == 0:
                    score = (W1[:, i : i + m] / d[i : i + m]) ** 2
                    mask1.scatter_(1, i + torch.topk(score, m - pattern.n, dim=1, largest=False).indices, True)
                w = W1[:, i]
                err = (w - w.masked_fill(mask1[:, i], 0)) / d[i]
                W1[:, i:] -= torch.outer(err, Hinv1[i, i:])
                Err1[:, i] = err
            W[:, i1:i2] = W1.masked_fill_(mask1, 0)
            W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
            mask[:, i1:i2] = mask1
        return W, mask
