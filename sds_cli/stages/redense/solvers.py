"""Solvers over the layer-wise objective of Sparse-Dense-Sparse, in second moments only. ``admm`` lives with the
one-shot pruner of the same name (``pruners/admm.py``), which runs it from the dense weights; it is re-exported here."""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sds_cli.pruners.admm import RHO_EVERY, admm  # noqa: F401  (re-exported: step 3's adjust)


@dataclass(frozen=True)
class Descent:
    """How ``minimize`` steps: gd | fista (step = lr / Lipschitz constant) | adam (step = lr * rms(W_d)); ``closed``
    takes gd/fista without L1 or projection in closed form (``descend``), ``iterate`` steps one by one."""

    optimizer: str
    lr: float
    solver: str


@dataclass
class Objective:
    """The quadratic L(W) of the module docstring plus the sparse regularisers, normalised."""

    dense: torch.Tensor
    gram: torch.Tensor
    cross: torch.Tensor
    ref: torch.Tensor
    l1: float = 0.0
    l2: float = 0.0
    eig: Callable[[], tuple[torch.Tensor, torch.Tensor]] | None = None  # eigh of ``gram``, shared per input

    def __post_init__(self):
        self.norm = max(((self.dense @ self.ref) * self.dense).sum().item(), 1e-30)
        self.target = self.dense @ self.cross  # W_d C
        self.l1_scale = self.l1 / max(self.dense.abs().sum().item(), 1e-30)
        self.l2_scale = self.l2 / max(self.dense.square().sum().item(), 1e-30)

    def error(self, w: torch.Tensor) -> float:
        """Relative reconstruction error L(W) / L_0. With the paper's target (C = R = G) it is the G-norm of
        W - W_d, exact in float32; otherwise float64, where the three terms nearly cancel near the optimum."""
        if self.cross is self.gram and self.ref is self.gram:
            diff = w - self.dense
            if math.isfinite(value := ((diff @ self.gram) * diff).sum().item() / self.norm):
                return value  # else a diverged w overflowed float32: float64 below
        w, gram, target = w.double(), self.gram.double(), self.target.double()
        return max((((w @ gram) * w).sum().item() - 2 * (target * w).sum().item()) / self.norm + 1.0, 0.0)

    def grad(self, w: torch.Tensor) -> torch.Tensor:
        """Gradient of the smooth part."""
        return 2 * (w @ self.gram - self.target) / self.norm + 2 * self.l2_scale * w

    @functools.cached_property
    def spectrum(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Eigenvalues (ascending, float64) and eigenvectors of the smooth part's Hessian 2 G / L_0 + 2 l2 I."""
        lam, q = self.eig() if self.eig else torch.linalg.eigh(self.gram)
        return (2 * lam.double().clamp_min(0) / self.norm + 2 * self.l2_scale), q

    def lipschitz(self) -> float:
        return self.spectrum[0][-1].item()

def _soft_threshold(w: torch.Tensor, t: float) -> torch.Tensor:
    return w.sign() * (w.abs() - t).clamp_min(0) if t > 0 else w

def minimize(obj: Objective, w: torch.Tensor, cfg: Descent, iters: int, project=None) -> torch.Tensor:
    """Proximal (projected) first-order descent on ``obj`` from ``w``; ``project`` maps onto a mask.
    Plain gd/fista on the quadratic alone (no L1, no projection) takes the closed form of ``descend``."""
    if cfg.solver == "closed" and cfg.optimizer != "adam" and obj.l1_scale == 0 and project is None:
        return descend(obj, w, cfg, iters)
    w = w.clone()
    if cfg.optimizer == "adam":
        w.requires_grad_(False)
        opt = torch.optim.Adam([w], lr=cfg.lr * obj.dense.square().mean().sqrt().item())
        for _ in range(iters):
            w.grad = obj.grad(w) + obj.l1_scale * w.sign()
            opt.step()
            if project is not None:
                w.data = project(w.data)
        return w.detach()
    step = cfg.lr / obj.lipschitz()
    prev, y = w, w
    for k in range(iters):
        w_next = _soft_threshold(y - step * obj.grad(y), step * obj.l1_scale)
        if project is not None:
            w_next = project(w_next)
        y = w_next + (k / (k + 3)) * (w_next - prev) if cfg.optimizer == "fista" else w_next
        prev = w_next
    return prev

def descend(obj: Objective, w: torch.Tensor, cfg: Descent, iters: int) -> torch.Tensor:
    """``iters`` steps of gd/fista on the quadratic in closed form, equal to the iteration up to rounding.

    The gradient is W A - B with A = Q diag(a) Q^T (``Objective.spectrum``) and B = 2 W_d C / L_0, so each
    iterate is W_0 Q diag(p) Q^T + B Q diag(r) Q^T where p and r follow the iteration's own scalar
    recurrence per eigenvalue (p: the start point's share, r: the target's). One eigendecomposition per
    distinct input replaces ``iters`` [out, in] x [in, in] products, so the iteration count is free."""
    a, q = obj.spectrum
    q = q.to(w.dtype)
    step = cfg.lr / a[-1].item()
    p_prev = p_y = torch.ones_like(a)
    r_prev = r_y = torch.zeros_like(a)
    for k in range(iters):
        p, r = (1 - step * a) * p_y, (1 - step * a) * r_y + step
        beta = k / (k + 3) if cfg.optimizer == "fista" else 0.0
        p_y, r_y = p + beta * (p - p_prev), r + beta * (r - r_prev)
        p_prev, r_prev = p, r
    p_prev, r_prev = p_prev.to(w.dtype), r_prev.to(w.dtype)
    if obj.cross is obj.gram:  # B Q = (2 / L_0) W_d G Q = (W_d Q) diag(a - 2 l2): no [out, in] x [in, in] product
        target = (obj.dense @ q) * (a - 2 * obj.l2_scale).to(w.dtype)
    else:
        target = (2 / obj.norm) * (obj.target @ q)
    return ((w @ q) * p_prev + target * r_prev) @ q.T

def refit(obj: Objective, keep: torch.Tensor, rows: int = 64) -> torch.Tensor:
    """The minimum of the objective over the weights ``keep`` leaves free: per row, w_S = G_SS^-1 (W_d C)_S
    (damped by 1e-6 mean diag G), where the projected iteration of ``adjust: fixed`` ends. Rows are
    solved in batches, each padded to the widest row's count with identity rows; float32 Cholesky,
    float64 for a batch it fails on."""
    gram, target = obj.gram.float(), obj.target.float()
    gram = gram + 1e-6 * gram.diagonal().mean() * torch.eye(len(gram), device=gram.device)
    k = int(keep.sum(1).max())
    out = torch.zeros_like(target)
    for r in range(0, len(keep), rows):
        order = torch.argsort((~keep[r : r + rows]).to(torch.int8), dim=1, stable=True)[:, :k]  # kept first
        valid = torch.gather(keep[r : r + rows], 1, order)
        pair = valid.unsqueeze(2) & valid.unsqueeze(1)
        a = torch.where(pair, gram[order.unsqueeze(2), order.unsqueeze(1)], torch.eye(k, device=gram.device))
        b = torch.where(valid, torch.gather(target[r : r + rows], 1, order), 0).unsqueeze(2)
        factor, info = torch.linalg.cholesky_ex(a)
        if info.any():
            a, b = a.double(), b.double()
            factor = torch.linalg.cholesky(a)
        x = torch.cholesky_solve(b, factor).squeeze(2).to(out.dtype)
        out[r : r + rows].scatter_(1, order, torch.where(valid, x, 0))
    return out
