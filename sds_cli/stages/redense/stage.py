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
import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import ClassVar

import torch

from sds_cli.engine.stats import Frozen, LayerStats, collect
from sds_cli.engine.stream import Stream, sync
from sds_cli.engine.walk import BlockStore, GroupStage, model_linears, selected_linears
from sds_cli.errors import ConfigError
from sds_cli.paths import Preset
from sds_cli.pruners.admm import LayerObjective
from sds_cli.pruners.base import Pruner
from sds_cli.sparsity import Pattern, mask_from_scores
from sds_cli.stages.redense.solvers import Descent, Objective, admm, minimize, refit

CHOICES = {"inputs": ("sparse", "dense"), "target": ("dense_weights", "dense_outputs"),
           "optimizer": ("gd", "fista", "adam"), "adjust": ("soft", "admm", "fixed", "refit", "none"),
           "solver": ("closed", "iterate")}
ADJUST_LABEL = {"admm": "ADMM adjust", "soft": "soft-mask adjust", "fixed": "fixed-mask adjust",
                "refit": "exact refit", "none": "no adjust"}


@dataclass
class RedenseConfig(Preset):
    """A ``conf/redense/*.yaml`` preset: its defaults and their meaning live there, once."""

    GROUP, DEFAULT = "redense", "sds"
    CHOICES: ClassVar[dict[str, tuple]] = CHOICES
    name: str
    inputs: str
    target: str
    optimizer: str
    solver: str
    iters: int
    lr: float
    l1: float
    l2: float
    adjust: str
    adjust_iters: int
    admm_rho: float
    admm_growth: float
    admm_damp: float
    early_exit: bool
    held_out: int
    sequential: bool

    def __post_init__(self):
        super().__post_init__()
        if not self.admm_damp >= 0:
            raise ConfigError(f"redense.admm_damp must be >= 0, got {self.admm_damp}")
        if self.held_out < 0 or (self.held_out and not self.early_exit):
            raise ConfigError(f"redense.held_out={self.held_out}: the held-out batches judge the early exit; "
                              "choose 0, or a positive count with redense.early_exit=true")

    @property
    def label(self) -> str:
        """What runs, in words, from the knobs (not the preset's name): rows and records say which parts made a
        number, e.g. "SDS + ADMM adjust, sequential, early exit"."""
        if dataclasses.replace(self, name="sds_paper") == RedenseConfig.preset("sds_paper"):
            return "SDS (paper)"
        redense = "no re-dense" if self.iters == 0 else "re-dense" + (" with L1/L2" if self.l1 or self.l2 else "")
        if self.inputs == "dense" or self.target == "dense_outputs":
            redense += f" ({self.inputs} inputs, {self.target.replace('_', ' ')})"
        adjust = ADJUST_LABEL[self.adjust] + (f" (damp {self.admm_damp:g})" if self.adjust == "admm" and self.admm_damp else "")
        parts = [f"SDS: {redense}", adjust]
        judged = f"early exit on {self.held_out} held-out batches" if self.held_out else "early exit"
        return " + ".join(parts) + "".join(f", {s}" for s, on in (("sequential", self.sequential),
                                                                   (judged, self.early_exit)) if on)

    @property
    def descent(self) -> Descent:
        return Descent(self.optimizer, self.lr, self.solver)



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
    held_oneshot: float | None = None  # errors on the held-out batches (redense.held_out), which the early exit judges
    held_sds: float | None = None


def _layer_objective(stats: LayerStats, dense: torch.Tensor, cfg: RedenseConfig) -> Objective:
    which = "ref_gram" if cfg.inputs == "dense" else "gram"
    gram = getattr(stats, which)
    cross, ref = (gram, gram) if cfg.target == "dense_weights" or cfg.inputs == "dense" else (stats.cross, stats.ref_gram)
    return Objective(dense, gram, cross, ref, cfg.l1, cfg.l2, eig=functools.partial(stats.eigh, which))


def toward_dense(obj: Objective, damp: float) -> Objective | LayerObjective:
    """The adjust's quadratic plus damp * sum_j G_jj ||W[:, j] - W_d[:, j]||^2: a ridge on the gram, relative to its
    diagonal as SparseGPT's damping, that pulls the kept weights toward the dense ones rather than fitting the
    calibration windows harder."""
    if not damp:
        return obj
    diag = obj.gram.diagonal() * damp
    return LayerObjective(obj.gram + torch.diag(diag), obj.target + obj.dense * diag)


def sds_layer(w1: torch.Tensor, dense: torch.Tensor, stats: LayerStats, pruner: Pruner, pattern: Pattern,
              cfg: RedenseConfig) -> tuple[torch.Tensor, dict]:
    """Steps 2 and 3 for one linear whose one-shot weights are ``w1``."""
    obj = _layer_objective(stats, dense, cfg)
    w2 = minimize(obj, w1, cfg.descent, cfg.iters)
    gram_stats = LayerStats(gram=obj.gram, tokens=stats.tokens)
    w3, mask = pruner(w2, gram_stats, pattern)
    reprune_error = obj.error(w3)
    adj = obj if cfg.l1 == cfg.l2 == 0 else Objective(dense, obj.gram, obj.cross, obj.ref, eig=obj.eig)
    if cfg.adjust == "refit":
        w3 = refit(adj, ~mask)
    elif cfg.adjust == "admm":
        w3 = admm(toward_dense(adj, cfg.admm_damp), w3, pattern, cfg.adjust_iters, cfg.admm_rho, cfg.admm_growth)
    elif cfg.adjust != "none":
        keep = ~mask
        project = (lambda w: w * keep) if cfg.adjust == "fixed" else (
            lambda w: w.masked_fill(mask_from_scores(w.abs(), pattern), 0))
        w3 = minimize(adj, w3, Descent(cfg.optimizer, cfg.lr, "iterate"), cfg.adjust_iters, project)
    errors = {"error_oneshot": obj.error(w1), "error_redense": obj.error(w2), "error_reprune": reprune_error,
              "error_sds": obj.error(w3)}
    if stats.held is not None:
        judge = _layer_objective(stats.held, dense, cfg)
        errors |= {"held_oneshot": judge.error(w1), "held_sds": judge.error(w3)}
    before, after = ("error_oneshot", "error_sds") if stats.held is None else ("held_oneshot", "held_sds")
    kept = "oneshot" if cfg.early_exit and not errors[after] < errors[before] else "sds"  # NaN too
    final = w1 if kept == "oneshot" else w3
    return final, errors | {"error_final": errors[f"error_{kept}"], "kept": kept,
                            "sparsity": (final == 0).float().mean().item()}


@dataclass
class SDSStage(GroupStage):
    """Steps 2 and 3 at each block of the one-shot model, input group by input group (``GroupStage``);
    ``reference``: the dense model's own stream, where the objective needs its inputs."""

    dense: dict[tuple[int, str], torch.Tensor]
    pruner: Pruner
    pattern: Pattern
    targets: str
    cfg: RedenseConfig
    sequential: bool
    reference: Stream | None = None
    frozen: Frozen | None = None
    paired: tuple | None = None

    def step(self, i, block, stream, linears):
        self.paired = None if self.reference is None else (self.dense_block(i, block), self.reference)
        records = super().step(i, block, stream, linears)
        if self.paired:
            self.reference = self.reference.through(self.paired[0])
        return records

    def statistics(self, block, stream, names):
        return collect(block, stream, names, reference=self.paired, shared=self.sequential, held_out=self.cfg.held_out)

    def layer(self, i: int, name: str, linear, stats: LayerStats) -> SDSRecord:
        start = time.perf_counter()
        if not stats.tokens:  # an expert no calibration token reached: no objective, its one-shot weights stay
            info = dict.fromkeys(("error_oneshot", "error_redense", "error_reprune", "error_sds", "error_final"), 0.0)
            return SDSRecord(i, name, (linear.weight == 0).float().mean().item(), kept="oneshot", seconds=0.0, **info)
        final, info = sds_layer(linear.weight.detach().to(torch.float32, copy=True, memory_format=torch.contiguous_format),
                                self.dense[i, name].to(linear.weight.device).float(), stats, self.pruner,
                                self.pattern, self.cfg)
        linear.weight.data.copy_(final)
        sync(final.device)
        return SDSRecord(i, name, seconds=time.perf_counter() - start, **info)

    def dense_block(self, i: int, block):
        copied = copy.deepcopy(block)
        for name, linear in selected_linears(copied, self.targets).items():
            linear.weight.data.copy_(self.dense[i, name])
        return copied

    def restored(self, i, block):
        if self.reference is not None:
            self.reference = self.reference.through(self.dense_block(i, block))


def sds_model(model, stream: Stream, dense: dict[tuple[int, str], torch.Tensor], pruner: Pruner,
              pattern: Pattern, targets: str, cfg: RedenseConfig, progress=lambda i: None,
              checkpoint: BlockStore | None = None, profile: dict | None = None) -> list[dict]:
    """Steps 2 and 3 over the one-shot model, block by block; returns the per-layer records (and fills ``profile``
    with the stage's seconds per part)."""
    reference = stream if cfg.inputs == "dense" or cfg.target == "dense_outputs" else None
    return SDSStage(dense, pruner, pattern, targets, cfg, cfg.sequential, reference).run(model, stream, checkpoint,
                                                                                         progress, profile)


def snapshot(model, layers: str) -> dict[tuple[int, str], torch.Tensor]:
    """CPU copies of the selected linears' weights, keyed by (block, name)."""
    return {(i, name): linear.weight.detach().to("cpu", copy=True) for i, name, linear in model_linears(model, layers)}
