"""Stages 2 and 3 of Sparse-Dense-Sparse (Li et al., arXiv 2408.10473), from second moments only.

For a linear with dense weight W_d, the layer-wise distillation loss over calibration tokens is

    L(W) = ||W_d X_ref - W X||^2 = tr(W G W^T) - 2 tr(W_d C W^T) + tr(W_d R W_d^T)

with G = X X^T, C = X_ref X^T, R = X_ref X_ref^T (token means, see ``engine.collect``). So every
iteration costs one [out, in] x [in, in] product, whatever the number of calibration tokens.

Re-dense (step 2) minimizes L / L_0 + l1 |W|_1 / |W_d|_1 + l2 |W|^2 / |W_d|^2 from the pruned weights
(L_0 = tr(W_d R W_d^T); the normalisation makes one setting fit every layer). The paper's step 2 uses
the pruned model's inputs ("SD data") with the target W_d X: ``inputs: sparse, target: dense_weights``.
Without L1 and L2 its minimizer is W_d itself, so the start point and the iteration count act as the
regulariser; gd/fista run in closed form (``descend``). Step 3 prunes the re-densified weights with the
same pruner and adjusts the kept weights towards W_d X: by projected gradient, the mask re-chosen from
|W| at every iteration (``adjust: soft``, the paper) or kept (``fixed``), solved exactly on the
second prune's mask (``refit``, where ``fixed`` converges to), or by ADMM with the mask re-chosen at
every iteration (``admm``, the preconditioned form of ``soft``)."""
from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .checkpoint import StageCheckpoint
from .engine import Frozen, Stream, collect, input_groups, model_linears, selected_linears, walk
from .oneshot import sync
from .pruners.base import ConfigError, LayerStats, Pattern, Pruner, mask_from_scores

CHOICES = {"inputs": ("sparse", "dense"), "target": ("dense_weights", "dense_outputs"),
           "optimizer": ("gd", "fista", "adam"), "adjust": ("soft", "admm", "fixed", "refit", "none"),
           "solver": ("closed", "iterate")}


@dataclass
class RedenseConfig:
    name: str = "sds"
    inputs: str = "sparse"  # sparse: X from the pruned model ("SD data"); dense: X = X_ref
    target: str = "dense_weights"  # dense_weights: W_d X; dense_outputs: W_d X_ref (the paper)
    optimizer: str = "fista"  # gd | fista (step = lr / Lipschitz constant) | adam (step = lr * rms(W_d))
    solver: str = "closed"  # closed: gd/fista without L1 in closed form (same iterates) | iterate: step by step
    iters: int = 200
    lr: float = 1.0
    l1: float = 0.0
    l2: float = 0.0
    adjust: str = "admm"  # admm | soft | fixed: projected descent, mask re-chosen from |W| or kept | refit: exact | none
    adjust_iters: int = 30
    admm_rho: float = 0.1  # admm: the penalty's start, relative to the unit diagonal of the normalised gram
    admm_growth: float = 1.3  # admm: rho's factor every RHO_EVERY iterations, so the mask settles
    early_exit: bool = True
    sequential: bool = True  # re-collect each input group's statistics after the groups before it changed

    def __post_init__(self):
        for key, choices in CHOICES.items():
            if getattr(self, key) not in choices:
                raise ConfigError(f"redense.{key}={getattr(self, key)!r}; choose one of: {', '.join(choices)}")


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


def minimize(obj: Objective, w: torch.Tensor, cfg: RedenseConfig, iters: int, project=None) -> torch.Tensor:
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


def descend(obj: Objective, w: torch.Tensor, cfg: RedenseConfig, iters: int) -> torch.Tensor:
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


RHO_EVERY = 2  # admm refactors (G + rho I) only when rho changes


def admm(obj: Objective, w: torch.Tensor, pattern: Pattern, iters: int, rho: float, growth: float) -> torch.Tensor:
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
class SDSRecord:
    block: int
    layer: str
    sparsity: float
    error_oneshot: float
    error_redense: float
    error_reprune: float
    error_sds: float
    error_final: float
    kept: str
    seconds: float


def _layer_objective(stats: LayerStats, dense: torch.Tensor, cfg: RedenseConfig) -> Objective:
    which = "ref_gram" if cfg.inputs == "dense" else "gram"
    gram = getattr(stats, which)
    cross, ref = (gram, gram) if cfg.target == "dense_weights" or cfg.inputs == "dense" else (stats.cross, stats.ref_gram)
    return Objective(dense, gram, cross, ref, cfg.l1, cfg.l2, eig=functools.partial(stats.eigh, which))


def sds_layer(w1: torch.Tensor, dense: torch.Tensor, stats: LayerStats, pruner: Pruner, pattern: Pattern,
              cfg: RedenseConfig) -> tuple[torch.Tensor, dict]:
    """Steps 2 and 3 for one linear whose one-shot weights are ``w1``."""
    obj = _layer_objective(stats, dense, cfg)
    w2 = minimize(obj, w1, cfg, cfg.iters)
    gram_stats = LayerStats(gram=obj.gram, tokens=stats.tokens)
    w3, mask = pruner(w2, gram_stats, pattern)
    reprune_error = obj.error(w3)
    adj = obj if cfg.l1 == cfg.l2 == 0 else Objective(dense, obj.gram, obj.cross, obj.ref, eig=obj.eig)
    if cfg.adjust == "refit":
        w3 = refit(adj, ~mask)
    elif cfg.adjust == "admm":
        w3 = admm(adj, w3, pattern, cfg.adjust_iters, cfg.admm_rho, cfg.admm_growth)
    elif cfg.adjust != "none":
        keep = ~mask
        project = (lambda w: w * keep) if cfg.adjust == "fixed" else (
            lambda w: w.masked_fill(mask_from_scores(w.abs(), pattern), 0))
        w3 = minimize(adj, w3, RedenseConfig(optimizer=cfg.optimizer, lr=cfg.lr), cfg.adjust_iters, project)
    errors = {"error_oneshot": obj.error(w1), "error_redense": obj.error(w2), "error_reprune": reprune_error,
              "error_sds": obj.error(w3)}
    kept = "oneshot" if cfg.early_exit and not errors["error_sds"] < errors["error_oneshot"] else "sds"  # NaN too
    final = w1 if kept == "oneshot" else w3
    return final, errors | {"error_final": errors[f"error_{kept}"], "kept": kept,
                            "sparsity": (final == 0).float().mean().item()}


def sds_model(model, stream: Stream, dense: dict[tuple[int, str], torch.Tensor], pruner: Pruner,
              pattern: Pattern, layers: str, cfg: RedenseConfig, progress=lambda i: None,
              checkpoint: StageCheckpoint | None = None) -> list[dict]:
    """Walk the one-shot model block by block; where the objective needs the dense model's inputs,
    its own stream runs alongside."""
    reference = stream if cfg.inputs == "dense" or cfg.target == "dense_outputs" else None

    def dense_block(i, block):
        copied = copy.deepcopy(block)
        for name, linear in selected_linears(copied, layers).items():
            linear.weight.data = dense[i, name].to(linear.weight)
        return copied

    frozen: Frozen | None = None

    def step(i, block, inputs, linears):
        nonlocal reference, frozen
        paired = None if reference is None else (dense_block(i, block), reference)  # None: W_d X needs no dense stream
        records, frozen = [], (Frozen(block, list(linears), inputs, linears=inputs.device.type == "cpu")
                               if cfg.sequential else None)
        for group in input_groups(block, inputs, list(linears)) if cfg.sequential else [list(linears)]:
            stats = collect(block, inputs, group, reference=paired, shared=cfg.sequential)
            for name in group:
                linear, start = linears[name], time.perf_counter()
                final, info = sds_layer(linear.weight.detach().to(torch.float32, copy=True),
                                        dense[i, name].to(linear.weight.device).float(), stats[name], pruner,
                                        pattern, cfg)
                linear.weight.data = final.to(linear.weight.dtype)
                sync(final.device)
                records.append(SDSRecord(i, name, seconds=time.perf_counter() - start, **info))
            if frozen:
                frozen.freeze({r.layer for r in records})
        if paired:
            reference = reference.through(paired[0])
        return records

    def skip(i, block):
        nonlocal reference
        if reference is not None:
            reference = reference.through(dense_block(i, block))

    def advance(inputs, block):
        try:
            return inputs.through(block)
        finally:
            if frozen:
                frozen.restore()

    try:
        return walk(model, stream, step, progress, checkpoint, layers, skip, advance)
    finally:
        if frozen:
            frozen.restore()


def snapshot(model, layers: str) -> dict[tuple[int, str], torch.Tensor]:
    """CPU copies of the selected linears' weights, keyed by (block, name)."""
    return {(i, name): linear.weight.detach().to("cpu", copy=True) for i, name, linear in model_linears(model, layers)}
