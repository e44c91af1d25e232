"""Týr-the-Pruner's local pruner (Li et al., NeurIPS 2025): remove whole groups of input columns of an
output linear (an attention head's columns of o_proj, an FFN channel's column of down_proj) and
compensate the kept columns, so that W X stays close to the dense W0 X on the calibration inputs.

Greedy backward elimination on the quadratic ||(W - W0) X||^2 = tr((W - W0) H (W - W0)^T). U, the optimum
on the columns still alive (G H_alive^-1 with G = W0 H), starts at W0. Each round scores every alive
group S by the loss its removal costs with optimal compensation of the rest (the OBS term),
1/2 tr(U_S [H_alive^-1]_SS^-1 U_S^T), with ``first_order`` plus tr(U_S G_S^T), the first-order term of
the paper's Eq. 4 as the reference code forms it (G at the dense W0, U current). The gradient of the
quadratic vanishes on the alive columns at U, so that term is not the quadratic's own first-order change:
it is U_S's inner product with the dense output's correlations, and it keeps groups that carry much of
the dense output. The lowest groups go, and H_alive^-1 (a Schur complement) and U (the OBS update) are
downdated. The removal order is one path, so every level of the supernet is a prefix of it; each level
is U where its last round leaves it, the least-squares refit of its kept columns, G_K H_KK^-1.
A Wanda-style score without compensation is the simple structured baseline."""
from __future__ import annotations

import math
from collections.abc import Callable

import torch

Levels = Callable[..., tuple[dict[int, torch.Tensor], torch.Tensor]]


def _prepare(weight: torch.Tensor, gram: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
    w, h = weight.to(torch.float64, copy=True), gram.to(torch.float64, copy=True)
    dead = torch.diagonal(h) == 0  # inputs never active: their columns carry nothing
    h[dead, dead] = 1
    w[:, dead] = 0
    torch.diagonal(h).add_(percdamp * torch.diagonal(h).mean())  # in place: an identity matrix would cost two more
    return w, h


def _invert_in_place(h: torch.Tensor) -> torch.Tensor:
    """H^-1 of a symmetric positive definite ``h``, in its own storage. LAPACK works on column-major matrices,
    so the factor and the inverse are written through the transposed view (the same matrix, H being
    symmetric); a row-major output would cost a second [in, in] buffer."""
    ht = h.mT
    torch.linalg.cholesky(ht, out=ht)
    torch.cholesky_inverse(ht, out=ht)
    return h


def _columns(groups: torch.Tensor, size: int) -> torch.Tensor:
    return (groups[:, None] * size + torch.arange(size, device=groups.device)).flatten()


def _score(u: torch.Tensor, hinv: torch.Tensor, g: torch.Tensor | None, alive: torch.Tensor, size: int) -> torch.Tensor:
    """Each group's removal cost (the module's docstring), with the first-order term where ``g`` = W0 H is given;
    inf for groups already removed."""
    n = len(alive)
    blocks = hinv.reshape(n, size, n, size).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    blocks = blocks + torch.diag_embed((~alive)[:, None].double().expand(n, size))  # invertible when dead
    grouped = u.reshape(len(u), n, size)
    inv = torch.linalg.inv(blocks)
    # rows a chunk at a time: the whole product would be another [out, in] float64 matrix
    score = sum(0.5 * torch.einsum("rni,nij,rnj->n", rows, inv, rows) for rows in grouped.split(1024))
    if g is not None:
        score += (grouped * g.reshape(len(g), n, size)).sum((0, 2))
    score[~alive] = math.inf
    return score


def obs_levels(weight: torch.Tensor, gram: torch.Tensor, size: int, removals: list[int], rounds: int = 16,
               percdamp: float = 0.01, first_order: bool = False,
               per_round: int | None = None) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """``weight`` [out, in] with each count in ``removals`` of its ``size``-column groups removed and the
    rest compensated, and the order of removal (the groups never removed last). Each elimination round
    removes ``per_round`` groups, or without it ceil(deepest level / ``rounds``), fewer where a level ends
    (so ``rounds`` plus up to one round per shallower level): finer rounds rescore after each downdate,
    coarser ones cost less."""
    u, h = _prepare(weight, gram, percdamp)  # U starts at W0, the optimum with every column alive
    g = u @ h if first_order else None  # W0 H, for the first-order term only
    n = u.shape[1] // size
    hinv = _invert_in_place(h)  # one [in, in] float64 matrix at a time: an 8B down_proj's is 1.6 GB
    alive = torch.ones(n, dtype=torch.bool, device=u.device)
    per_round = per_round or max(1, math.ceil(max(removals) / rounds))
    out, removed, order = {}, 0, []
    for target in sorted(set(removals)):
        while removed < target:
            score = _score(u, hinv, g, alive, size)
            pick = torch.topk(score, min(per_round, target - removed), largest=False).indices
            cols = _columns(pick, size)
            inv, rows = torch.linalg.inv(hinv[cols][:, cols]), hinv[cols, :]
            u.addmm_(u[:, cols] @ inv, rows, alpha=-1)  # in place: no [in, in] temporary
            hinv.addmm_(hinv[:, cols] @ inv, rows, alpha=-1)
            hinv[cols, :], hinv[:, cols], u[:, cols] = 0, 0, 0
            alive[pick], removed = False, removed + len(pick)
            order.append(pick)
        out[target] = u.to(weight.dtype, copy=True)  # G_K H_KK^-1: the OBS updates keep U the refit
    return out, torch.cat([*order, alive.nonzero().flatten()])


def wanda_levels(weight: torch.Tensor, gram: torch.Tensor, size: int, removals: list[int],
                 **_) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """The simple structured baseline: a group's score is the sum over its columns of
    ||W[:, j]||_1 ||X_j|| (Wanda's score, per column); the lowest groups are zeroed, nothing compensated."""
    w = weight.float()
    score = (w.abs().sum(0) * torch.diagonal(gram).float().clamp_min(0).sqrt()).reshape(-1, size).sum(1)
    order = torch.argsort(score)
    out = {}
    for target in sorted(set(removals)):
        pruned = w.clone()
        pruned[:, _columns(order[:target], size)] = 0
        out[target] = pruned.to(weight.dtype)
    return out, order


LOCAL: dict[str, Levels] = {"obs": obs_levels, "wanda": wanda_levels}
