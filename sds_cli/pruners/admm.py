"""ADMM pruning (Boza, arXiv 2401.02938): the mask and the kept weights of a layer chosen together, by the
alternating direction method of multipliers on the layer's reconstruction error.

``admm`` is the solver over one layer's quadratic; the one-shot pruner ``admm`` runs it from a start mask on the
dense weights, and SDS's step 3 (``redense.adjust: admm``, ``stages/redense``) runs it from the re-pruned
weights towards W_dense X."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch

from sds_cli.engine.stats import LayerStats
from sds_cli.errors import ConfigError
from sds_cli.pruners.base import PRUNERS, build_pruner, register
from sds_cli.sparsity import Pattern, mask_from_scores


class Quadratic(Protocol):
    """What ``admm`` reads of a layer objective L(W) = tr(W G W^T) - 2 tr(T W^T) + const (``stages.redense``'s
    ``Objective`` is one): the gram G and the target term T = W_d C."""

    gram: torch.Tensor
    target: torch.Tensor


RHO_EVERY = 2  # admm refactors (G + rho I) only when rho changes

def admm(obj: Quadratic, w: torch.Tensor, pattern: Pattern, iters: int, rho: float, growth: float) -> torch.Tensor:
    """min L(W) over weights with the pattern, by ADMM (Boza, arXiv 2401.02938) from ``w``.

    In coordinates W' = W D with D = diag(G)^1/2, so the gram has a unit diagonal and |W'| ranks weights as
    Wanda's score does. The W-step solves the penalised quadratic exactly with (G' + rho I)^-1, which is
    what plain projected descent lacks on an ill-conditioned G: one [out, in] x [in, in] product per
    iteration, like a ``soft`` step, but far lower error at the same count. The Z-step re-chooses the mask
    from |W' + U|; rho grows geometrically so that the mask settles. Returns Z, which has the pattern."""
    d = obj.gram.diagonal().clamp_min(1e-12).sqrt()
    gram, target = obj.gram / d[:, None] / d[None, :], obj.target / d
    eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
    z, u = w * d, torch.zeros_like(w)
    for k in range(iters):
        if k % RHO_EVERY == 0:
            penalty = rho * growth ** (k // RHO_EVERY)
            inverse = torch.cholesky_inverse(torch.linalg.cholesky(gram + penalty * eye))
        v = (target + penalty * (z - u)) @ inverse + u
        z = v.masked_fill(mask_from_scores(v.abs(), pattern), 0)
        u = v - z
    return z / d


@dataclass
class LayerObjective:
    """||W X - W' X||^2 for a layer's own dense weights W: the gram G = E[x x^T] and the target W G (the
    redense stage's ``Objective`` with dense=W and gram = cross = ref = G, without its normalisation, which
    ``admm`` does not read)."""

    gram: torch.Tensor
    target: torch.Tensor


@register("admm")
@dataclass
class ADMM:
    """Prune from the dense weights W by ``admm`` on ||W X - W' X||^2: the ``start`` pruner's weights are the
    first Z (Boza starts from a Wanda mask), then ``iterations`` alternate an exact solve of the kept weights'
    penalised least squares with a fresh mask from |W' + U|, the penalty ``rho`` growing by ``growth`` every
    2 iterations so that the mask settles. Unstructured masks are per output row (as Wanda's), N:M per group."""

    stats: ClassVar[str] = "gram"
    iterations: int = 30
    rho: float = 0.1
    growth: float = 1.3
    start: str = "wanda"

    def __post_init__(self) -> None:
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 0:
            raise ConfigError(f"admm: iterations must be an integer >= 0, got {self.iterations!r}")
        if not self.rho > 0:
            raise ConfigError(f"admm: rho must be > 0, got {self.rho}")
        if not self.growth >= 1:
            raise ConfigError(f"admm: growth must be >= 1 (the penalty never shrinks), got {self.growth}")
        if self.start == "admm" or self.start not in PRUNERS:
            starts = ", ".join(sorted(set(PRUNERS) - {"admm"}))
            raise ConfigError(f"admm: start pruner '{self.start}' unknown; choose one of: {starts}")

    @torch.no_grad()
    def __call__(
        self, weight: torch.Tensor, stats: LayerStats, pattern: Pattern
    ) -> tuple[torch.Tensor, torch.Tensor]:
        W = weight.to(torch.float32)
        gram = stats.gram.to(W.device, torch.float32)
        start, _ = build_pruner(self.start)(W, stats, pattern)
        pruned = admm(LayerObjective(gram, W @ gram), start, pattern, self.iterations, self.rho, self.growth)
        # every row holds exactly the pattern's zeros (a kept weight may be 0 too: either is a valid mask)
        mask = mask_from_scores(pruned.abs(), pattern)
        return pruned.masked_fill(mask, 0), mask
