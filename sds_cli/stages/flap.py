"""FLAP (An et al., AAAI 2024, "Fluctuation-based Adaptive Structured Pruning for Large Language Models"):
the structured baseline, on the same engine, geometry and parameter budget as Týr.

1. Fluctuation: for every input channel j of o_proj and down_proj, the variance over the calibration tokens of
   the dense model's input x_j times the squared norm of the weight column, Var(x_j) ||W[:, j]||^2 (WIFV): how
   much the layer's output moves with that channel around its mean. The statistics come from the dense model
   block by block (FLAP decides only once every block is seen).
2. Adaptive structure (AL-AM): each layer's column scores are standardized (zero mean, unit deviation over
   that layer's columns, so that layers and kinds compare), a head scores the sum (or mean) of its columns, and
   heads and FFN channels of every block are removed lowest score first, one ranking across blocks and kinds,
   until the removed parameters come closest to ``sparsity`` of the block parameters (a query head takes its
   q rows and o columns, and its key/value head once no kept query head reads it; a channel its gate/up rows
   and down column).
3. Bias compensation: what a removed channel contributed on average, W[:, j] E[x_j], becomes a bias of
   o_proj / down_proj, so the layer's output keeps its mean; the cut model (``tyr/modeling_tyr.py``) carries
   those biases."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from sds_cli.engine.stream import block_inputs, capture
from sds_cli.engine.walk import BlockStage, walk
from sds_cli.models import decoder_layers
from sds_cli.paths import Preset
from sds_cli.stages.tyr.structure import OUTPUTS, Geometry, Kept, block_params, geometry, shrink

KINDS = ("attention", "ffn")
HEAD_SCORE = {"sum": torch.sum, "mean": torch.mean}


@dataclass
class FlapConfig(Preset):
    """``conf/pruner/flap.yaml``: its defaults and their meaning live there, once."""

    GROUP, DEFAULT, CHOICES = "pruner", "flap", {"head_score": tuple(HEAD_SCORE)}
    name: str
    head_score: str
    bias: bool


@dataclass
class Moments:
    """Mean and (unbiased) variance over calibration tokens of each input channel of one linear."""

    mean: torch.Tensor
    var: torch.Tensor
    tokens: int


@dataclass
class _Row:
    block: int
    layer: str
    tokens: int
    seconds: float


@dataclass
class FluctuationStage(BlockStage):
    """Gathers ``Moments`` of o_proj's and down_proj's inputs, block by block, changing nothing."""

    moments: dict
    targets: str = r"self_attn\.o_proj$|mlp\.down_proj$"

    @torch.no_grad()
    def step(self, i, block, stream, linears):
        start, names = time.perf_counter(), [OUTPUTS[k] for k in KINDS]
        shift, sums, tokens = {}, {}, 0
        for h, kw in stream.batches():
            for name, x in block_inputs(block, names, h, kw).items():
                x = x.reshape(-1, x.shape[-1]).double()
                shift.setdefault(name, x.mean(0))  # sums around the first batch's mean: no cancellation
                d = x - shift[name]
                s1, s2 = sums.get(name, (0, 0))
                sums[name] = (s1 + d.sum(0), s2 + (d * d).sum(0))
            tokens += h.shape[0] * h.shape[1]
        rows = []
        for kind in KINDS:
            name = OUTPUTS[kind]
            s1, s2 = sums[name]
            mean = s1 / tokens
            var = (s2 - tokens * mean * mean) / max(tokens - 1, 1)
            self.moments[(i, kind)] = Moments((mean + shift[name]).cpu(), var.clamp_min(0).cpu(), tokens)
            rows.append(_Row(i, name, tokens, time.perf_counter() - start))
        return rows


def fluctuation(weight: torch.Tensor, moments: Moments) -> torch.Tensor:
    """WIFV per input column: Var(x_j) ||W[:, j]||^2."""
    return moments.var * weight.double().pow(2).sum(0).cpu()


def standardized(score: torch.Tensor) -> torch.Tensor:
    return (score - score.mean()) / score.std().clamp_min(1e-30)


def scores(model, moments: dict, geo: Geometry, head_score: str) -> dict[tuple[int, str], torch.Tensor]:
    """Each block's head and channel scores, comparable across blocks and kinds."""
    out = {}
    for i, block in enumerate(decoder_layers(model)):
        for kind in KINDS:
            column = standardized(fluctuation(block.get_submodule(OUTPUTS[kind]).weight, moments[(i, kind)]))
            out[(i, kind)] = HEAD_SCORE[head_score](column.reshape(-1, geo.group[kind]), 1)
    return out


def select(score: dict[tuple[int, str], torch.Tensor], geo: Geometry, blocks: int, target: float) -> list[Kept]:
    """Remove structures lowest score first, one ranking over every block and kind, stopping where the removed
    parameters come closest to ``target`` of the block parameters (exact counts, key/value heads included)."""
    items = sorted(((s, i, kind, j) for (i, kind), v in score.items() for j, s in enumerate(v.tolist())),
                   key=lambda t: t[0])
    per_kv, kv = geo.heads // geo.kv_heads, 2 * geo.hidden * geo.head_dim
    readers = {(i, g): per_kv for i in range(blocks) for g in range(geo.kv_heads)}  # kept query heads per kv head
    goal, removed, steps = target * blocks * sum(geo.params.values()), 0, [0]
    for _, i, kind, j in items:
        if kind == "ffn":
            removed += 3 * geo.hidden
        else:
            readers[(i, j // per_kv)] -= 1
            removed += kv + (kv if readers[(i, j // per_kv)] == 0 else 0)
        steps.append(removed)
    count = min(range(len(steps)), key=lambda k: abs(steps[k] - goal))
    gone = {(i, kind, j) for _, i, kind, j in items[:count]}
    return [Kept([h for h in range(geo.heads) if (i, "attention", h) not in gone],
                 [c for c in range(geo.channels) if (i, "ffn", c) not in gone]) for i in range(blocks)]


def compensation(weight: torch.Tensor, moments: Moments, kept: torch.Tensor) -> torch.Tensor:
    """The bias that keeps the output's mean: the removed columns times their inputs' mean."""
    gone = torch.ones(weight.shape[1], dtype=torch.bool)
    gone[kept] = False
    return (weight.double().cpu()[:, gone] @ moments.mean[gone]).to(weight.dtype)


def _columns(kept: Kept, kind: str, geo: Geometry) -> torch.Tensor:
    index = torch.tensor(kept.heads if kind == "attention" else kept.channels, dtype=torch.long)
    return (index[:, None] * geo.group[kind] + torch.arange(geo.group[kind])).flatten()


def _output(block, kind: str):
    """The module holding the kind's output bias (a block with no head left holds it in its attention)."""
    return getattr(block.self_attn, "o_proj", block.self_attn) if kind == "attention" else block.mlp.down_proj


def prune(model, calib: torch.Tensor, target: float, cfg: FlapConfig, device: str, batch_size: int, offload: bool,
          forms: list[int] | None, bar) -> dict:
    """FLAP end to end on ``model`` (in place, ending physically smaller); returns what results.json keeps."""
    geo, layers = geometry(model), decoder_layers(model)
    before, moments = block_params(model), {}
    with bar("FLAP: fluctuation of o_proj and down_proj inputs", len(layers)) as advance:
        stream = capture(model, calib, batch_size, device, offload, forms)
        records = walk(model, stream, FluctuationStage(moments), progress=lambda i: advance())
        del stream
    kept = select(scores(model, moments, geo, cfg.head_score), geo, len(layers), target)
    bias = {(i, kind): compensation(b.get_submodule(OUTPUTS[kind]).weight, moments[(i, kind)], _columns(k, kind, geo))
            for i, (b, k) in enumerate(zip(layers, kept)) for kind in KINDS} if cfg.bias else {}
    for k in kept:
        k.bias = cfg.bias
    shrink(model, kept)
    for (i, kind), b in bias.items():
        _output(layers[i], kind).bias.data = b
    after, dense = block_params(model), len(layers) * sum(geo.params.values())  # the budget counts linear weights
    weights = after - (2 * geo.hidden * len(layers) if cfg.bias else 0) - (before - dense)  # less biases, norms
    return {"layers": records, "extra": {
        "distribution": [{"block": i, "heads_kept": len(k.heads), "channels_kept": len(k.channels)}
                         for i, k in enumerate(kept)],
        "block_params": {"dense": before, "pruned": after, "removed_fraction": 1 - after / before,
                         "weights_removed_fraction": 1 - weights / dense},
        "geometry": vars(geo) | {"params_per_block": geo.params}}}
