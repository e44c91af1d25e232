"""Týr-the-Pruner (Li et al., NeurIPS 2025): structured pruning with a searched per-layer sparsity.

1. Supernet: every layer (a block's attention heads, its FFN channels) is pruned by the local pruner
   (``local.py``) at several levels around its current count; the next block sees the
   candidates' outputs mixed by density (expectation error accumulation, the paper's Eq. 5), the
   median candidate's (the reference code), or the dense layer's (``accumulation: off``).
2. Search: an evolutionary search over per-layer levels; a mutation moves one level step from one
   layer to another of the same kind, so the attention and FFN budgets hold exactly. Fitness is the KL
   divergence of the dense model's next-token distribution (over its top-k tokens) to the candidate's,
   on few tokens for many offspring and more tokens for the few best.
3. Iterations: the supernet is rebuilt around the best distribution at half the level spacing.
The chosen structures are then removed physically (``structure.py``). The candidates stay off the accelerator
(``candidates.py``) and every forward goes block by block through the engine, so the accelerator holds one
block, its candidates under evaluation and the head, as in a one-shot stage."""
from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from sds_cli.engine.stats import collect, relative_error
from sds_cli.engine.stream import Stream, capture, output_forms, outside_blocks, reference_outputs
from sds_cli.engine.walk import BlockStage, walk
from sds_cli.errors import ConfigError
from sds_cli.models import decoder_layers
from sds_cli.paths import preset
from sds_cli.stages.tyr.candidates import STORES, Candidates
from sds_cli.stages.tyr.local import LOCAL
from sds_cli.stages.tyr.structure import OUTPUTS, Geometry, Kept, block_params, geometry, shrink

KINDS = ("attention", "ffn")
ACCUMULATION = ("expectation", "median", "off")


@dataclass
class TyrConfig:
    """A ``conf/pruner/tyr*.yaml`` preset: its defaults and their meaning live there, once (``tyr-paper`` holds the
    paper's search budgets)."""

    name: str
    search: bool
    local: str
    first_order: bool
    accumulation: str
    levels: int
    step: float
    min_channels: int
    rounds: dict
    progressive: dict
    percdamp: float
    iterations: int
    generations: int
    offspring: int
    selection: list
    search_windows: int
    kl_topk: int
    candidates: str
    budget: str

    @classmethod
    def preset(cls, name: str = "tyr", **overrides) -> TyrConfig:
        return cls(**preset("pruner", name) | overrides)

    def __post_init__(self):
        if self.local not in LOCAL:
            raise ConfigError(f"pruner.local={self.local!r}; choose one of: {', '.join(LOCAL)}")
        if self.accumulation not in ACCUMULATION:
            raise ConfigError(f"pruner.accumulation={self.accumulation!r}; choose one of: {', '.join(ACCUMULATION)}")
        if self.levels < 1 or self.iterations < 1 or not 0 < self.step <= 1:
            raise ConfigError("pruner.levels and pruner.iterations must be >= 1 and pruner.step in (0, 1]")
        if any(v is not None and (not isinstance(v, int) or v < 1) for v in self.progressive.values()):
            raise ConfigError("pruner.progressive: structures removed per elimination round, >= 1 (or null)")
        if not self.selection or self.selection[-1][0] != 1 or any(s < 1 or t < 1 for s, t in self.selection):
            raise ConfigError("pruner.selection must be [[survivors, tokens], ...] ending in one survivor")
        if self.candidates not in STORES:
            raise ConfigError(f"pruner.candidates={self.candidates!r}; choose one of: {', '.join(STORES)}")
        if self.budget not in BUDGETS:
            raise ConfigError(f"pruner.budget={self.budget!r}; choose one of: {', '.join(BUDGETS)}")


def uniform(target: float, count: int, layers: int) -> list[int]:
    """Structures removed per layer, as even as whole structures allow, summing to round(target * all)."""
    return [round((i + 1) * target * count) - round(i * target * count) for i in range(layers)]


def params_budget(target: float, geo: Geometry) -> dict[str, float]:
    """The fraction of heads and of FFN channels to remove so that ``target`` of the block parameters
    goes: heads at ``target``, and the FFN also covers the key/value heads that grouped-query attention
    keeps while any query head still reads them."""
    removed = target * sum(geo.params.values()) - target * geo.heads * geo.head_params
    return {"attention": target, "ffn": min(1.0, max(0.0, removed / geo.params["ffn"]))}


def paper_budget(target: float, geo: Geometry) -> dict[str, float]:
    """The paper's and the reference code's budget: ``target`` of o_proj's columns (query heads) and of
    down_proj's (FFN channels). Key/value heads that a kept query head reads stay, so on grouped-query models
    less than ``target`` of the block parameters goes."""
    return {"attention": target, "ffn": target}


BUDGETS = {"params": params_budget, "paper": paper_budget}


@dataclass
class Supernet:
    """Candidate weights of each layer's output linear, keyed by structures removed, and the order in
    which its structures were removed (so every level's kept set is known)."""

    centers: dict[str, list[int]]
    spacing: dict[str, int]
    offsets: dict[str, list[list[int]]]  # allowed level offsets per layer
    candidates: Candidates

    def removed(self, kind: str, i: int, offset: int) -> int:
        return self.centers[kind][i] + offset * self.spacing[kind]

    def order(self, i: int, kind: str) -> torch.Tensor:
        return self.candidates.shape[(i, kind)][1]

    def weight(self, i: int, kind: str, removed: int, device) -> torch.Tensor:
        return self.candidates.get((i, kind), removed, device)


def level_offsets(center: int, spacing: int, levels: int, count: int) -> list[int]:
    """The offsets k of the ``levels`` levels around ``center`` (center + k * spacing structures removed) that
    fit in [0, count]; the uniform distribution too gets them all, as its accumulation mixes every level."""
    half = levels // 2
    return [k for k in range(-half, half + 1) if 0 <= center + k * spacing <= count]


def plan(cfg: TyrConfig, geo: Geometry, centers: dict[str, list[int]], iteration: int,
         root: Path | None = None) -> Supernet:
    """The levels of one iteration: ``cfg.levels`` around each center at this iteration's spacing, the
    candidates kept as ``cfg.candidates`` says (``disk``: files under ``root``)."""
    fraction = cfg.step / 2**iteration
    spacing = {"attention": max(1, round(fraction * geo.heads)), "ffn": max(cfg.min_channels, round(fraction * geo.channels))}
    offsets = {kind: [level_offsets(c, spacing[kind], cfg.levels, geo.count[kind]) for c in centers[kind]]
               for kind in KINDS}
    return Supernet(centers, spacing, offsets, Candidates(cfg.candidates, root))


def mix(candidates: dict[int, torch.Tensor], dense: torch.Tensor, center: int, count: int, mode: str) -> torch.Tensor:
    """What the next layers see while the supernet is built (the paper's Eq. 5 for ``expectation``)."""
    if mode == "off":
        return dense
    if mode == "median":
        return candidates[center]
    density = {r: (count - r) / count for r in candidates}
    return sum(density[r] * w for r, w in candidates.items()) / max(sum(density.values()), 1e-12)


@dataclass
class SupernetStage(BlockStage):
    """Fills ``net`` block by block: each output linear's candidates from its inputs in the model as
    accumulated so far."""

    net: Supernet
    cfg: TyrConfig
    geo: Geometry
    targets: str = r"self_attn\.o_proj$|mlp\.down_proj$"

    def step(self, i, block, stream, linears):
        net, cfg, geo = self.net, self.cfg, self.geo
        local = LOCAL[cfg.local]
        rows = []
        for kind in KINDS:
            name, start = OUTPUTS[kind], time.perf_counter()
            linear = linears[name]
            gram = collect(block, stream, [name])[name].gram
            dense = linear.weight.data.clone()
            removals = [net.removed(kind, i, k) for k in net.offsets[kind][i]]
            weights, order = local(dense, gram, geo.group[kind], removals, rounds=cfg.rounds[kind],
                                   percdamp=cfg.percdamp, first_order=cfg.first_order,
                                   per_round=cfg.progressive[kind])
            linear.weight.data = mix(weights, dense, net.centers[kind][i], geo.count[kind], cfg.accumulation)
            errors = {r: relative_error(dense.float(), w.float(), gram) for r, w in weights.items()}
            net.candidates.put((i, kind), weights, order, geo.group[kind])
            rows.append(_Row(i, name, removals, [errors[r] for r in removals], time.perf_counter() - start))
        return rows


def build_supernet(model, stream: Stream, net: Supernet, cfg: TyrConfig, geo: Geometry, progress) -> list[dict]:
    """Fill ``net`` block by block; returns per-layer records (levels, relative errors, seconds)."""
    return walk(model, stream, SupernetStage(net, cfg, geo), progress=progress)


@dataclass
class _Row:
    block: int
    layer: str
    removed: list[int]
    error: list[float]
    seconds: float


class Fitness:
    """KL divergence of the dense model's next-token distribution, restricted to its top-k tokens, to
    the candidate's on the same tokens (the reference code's sparse KL); lower is better. The forward goes
    block by block through the engine, every state of a selection stage in one pass over the blocks: a block
    goes to the device once, and each level of its candidates once, for the states that use it."""

    def __init__(self, model, windows: torch.Tensor, topk: int, device: str, offload: bool,
                 forms: list[int] | None):
        self.model, self.windows, self.device, self.offload = model, windows, device, offload
        self.forms = forms or output_forms(reference_outputs(model, windows[:1], device))
        self.inputs: dict[tuple[int, int], tuple[torch.Tensor, list[dict]]] = {}  # (window, tokens): block inputs
        self.targets = [None] * len(windows)
        full = [(j, windows.shape[1] - 1) for j in range(len(windows))]

        def keep(state, k, logits):
            values, index = logits[0, :-1].float().topk(min(topk, logits.shape[-1]), dim=-1)
            self.targets[k] = (F.log_softmax(values, -1).cpu(), index.cpu())
        self._forward(None, [None], full, keep)

    def spans(self, picks: list[int], tokens: int) -> list[tuple[int, int]]:
        """(window, tokens scored) in ``picks`` order until ``tokens`` are scored (the last window cut short)."""
        out, count = [], 0
        for j in picks:
            out.append((j, min(tokens - count, self.windows.shape[1] - 1)))
            count += out[-1][1]
            if count >= tokens:
                break
        return out

    @torch.no_grad()
    def __call__(self, net: Supernet, states: list[dict[str, list[int]]], picks: list[int], tokens: int) -> list[float]:
        """The fitness of each state (level offsets per layer) on ``tokens`` tokens of the windows in ``picks``."""
        spans = self.spans(picks, tokens)
        totals = [0.0] * len(states)

        def kl(c, k, logits):
            j, n = spans[k]
            logp, index = (t[:n].to(self.device) for t in self.targets[j])
            logq = F.log_softmax(logits[0, :n].float().gather(-1, index), -1)
            totals[c] += (logp.exp() * (logp - logq)).sum().item()
        self._forward(net, states, spans, kl)
        return [t / sum(n for _, n in spans) for t in totals]

    def _stream(self, spans: list[tuple[int, int]]) -> Stream:
        """What enters the first block for each span (window j's first n + 1 tokens): whole windows captured once
        and kept, a selection stage's one cut-short window captured for it alone."""
        inputs = {s: self.inputs[s] for s in spans if s in self.inputs}
        if new := [s for s in dict.fromkeys(spans) if s not in inputs]:
            got = capture(self.model, [self.windows[j : j + 1, : n + 1] for j, n in new], 1, self.device,
                          self.offload, self.forms)
            for b, (j, n) in enumerate(new):
                inputs[(j, n)] = (got.hidden[b], [kw[b] for kw in got.kwargs])
                if n == self.windows.shape[1] - 1:
                    self.inputs[(j, n)] = inputs[(j, n)]
        blocks = len(decoder_layers(self.model))
        return Stream([inputs[s][0] for s in spans], [[inputs[s][1][i] for s in spans] for i in range(blocks)],
                      torch.device(self.device), torch.device("cpu") if self.offload else torch.device(self.device))

    @torch.no_grad()
    def _forward(self, net: Supernet | None, states: list, spans: list[tuple[int, int]], head: Callable) -> None:
        """Each state's logits on each span, handed to ``head(state index, span index, logits)``; without
        ``net``, the model as it is."""
        stream = self._stream(spans)
        hidden = [stream.hidden] * len(states)
        for i, block in enumerate(decoder_layers(self.model)):
            block.to(self.device)
            linears = {kind: block.get_submodule(OUTPUTS[kind]) for kind in KINDS}
            own, loaded = {kind: linear.weight.data for kind, linear in linears.items()}, {}

            levels = [tuple(net.removed(kind, i, s[kind][i]) for kind in KINDS) if net else () for s in states]
            for c in sorted(range(len(states)), key=levels.__getitem__):  # states sharing a level run in a row
                for kind, removed in zip(KINDS, levels[c]):
                    if loaded.get(kind) != removed:
                        linears[kind].weight.data, loaded[kind] = net.weight(i, kind, removed, self.device), removed
                hidden[c] = Stream(hidden[c], stream.kwargs, stream.device, stream.store, i).through(block).hidden
            for kind, weight in own.items():
                linears[kind].weight.data = weight
            block.to("cpu")
        norm, lm_head = self.model.model.norm, self.model.get_output_embeddings()
        with outside_blocks(self.model, self.device):
            for c, outputs in enumerate(hidden):
                for k, h in enumerate(outputs):
                    head(c, k, lm_head(norm(h.to(self.device))))


def apply(model, net: Supernet, state: dict[str, list[int]]) -> None:
    """Load each layer's candidate for the levels in ``state`` (offsets per layer) into the model."""
    for i, block in enumerate(decoder_layers(model)):
        for kind in KINDS:
            linear = block.get_submodule(OUTPUTS[kind])
            linear.weight.data = net.weight(i, kind, net.removed(kind, i, state[kind][i]), linear.weight.device)


def evolve(net: Supernet, fitness: Fitness, cfg: TyrConfig, rng: random.Random,
           progress: Callable[[], None]) -> tuple[dict[str, list[int]], list[float]]:
    """The evolutionary search over level offsets; returns the best state and its fitness per generation
    (the centers and no generation where no mutation is possible, ``stuck``)."""
    layers = len(net.centers["attention"])
    parent = {kind: [0] * layers for kind in KINDS}
    history = []
    if stuck(net, parent):
        return parent, history
    for _ in range(cfg.generations):
        children = []
        for _ in range(50 * cfg.offspring):
            if len(children) == cfg.offspring:
                break
            child = _mutate(parent, net, rng)
            if child is not None and child != parent and child not in children:
                children.append(child)
        best = float("nan")
        for s, (survivors, tokens) in enumerate(cfg.selection):
            if (s == len(cfg.selection) - 1 or not children) and parent not in children:
                children.append(parent)  # elitism: the parent competes in the final stage (or alone)
            picks = rng.sample(range(len(fitness.windows)), len(fitness.windows))
            scores = fitness(net, children, picks, tokens)
            ranked = sorted(range(len(children)), key=scores.__getitem__)[:survivors]
            children, best = [children[r] for r in ranked], scores[ranked[0]]
        parent = children[0]
        history.append(best)
        progress()
    return parent, history


def stuck(net: Supernet, state: dict[str, list[int]]) -> str | None:
    """Why no mutation can leave ``state``, or None: one needs, in one kind, a layer that can go a level down
    and another that can go a level up. From a state that can move, every state reached can move back."""
    for kind in KINDS:
        lower = {i for i, k in enumerate(state[kind]) if k - 1 in net.offsets[kind][i]}
        higher = {i for i, k in enumerate(state[kind]) if k + 1 in net.offsets[kind][i]}
        if lower and higher and len(lower | higher) > 1:
            return None
    if len(state["attention"]) == 1:
        return "one decoder layer: no budget can move between layers"
    return "no layer can pass a level step to another (one level per layer: pruner.levels=1, or no room)"


def _mutate(parent: dict[str, list[int]], net: Supernet, rng: random.Random) -> dict[str, list[int]] | None:
    """Shift one level step from one layer to another of the same kind, one to four times (fewer more
    often); None when no shift is possible."""
    child = {kind: list(v) for kind, v in parent.items()}
    for _ in range(min(rng.randint(1, 4), rng.randint(1, 4))):
        kind = rng.choice(KINDS)
        levels = child[kind]
        lower = [i for i, k in enumerate(levels) if k - 1 in net.offsets[kind][i]]
        higher = [i for i, k in enumerate(levels) if k + 1 in net.offsets[kind][i]]
        if not lower or not higher or (len(lower) == 1 and higher == lower):
            return None
        a = rng.choice(lower)
        b = rng.choice([i for i in higher if i != a] or [a])
        if a == b:
            return None
        levels[a] -= 1
        levels[b] += 1
    return child


def prune(model, calib: torch.Tensor, target: float, cfg: TyrConfig, device: str, seed: int, batch_size: int,
          offload: bool, forms: list[int] | None, bar, workdir: Path) -> dict:
    """Týr end to end on ``model`` (in place, ending physically smaller); returns what results.json keeps.
    ``pruner.candidates=disk`` keeps each iteration's candidates in ``workdir``, removed once the stage ends."""
    geo = geometry(model)
    layers = decoder_layers(model)
    before = block_params(model)
    dense = {(i, kind): b.get_submodule(OUTPUTS[kind]).weight.data.clone() for i, b in enumerate(layers) for kind in KINDS}
    fractions = BUDGETS[cfg.budget](target, geo)
    centers = {kind: uniform(fraction, geo.count[kind], len(layers)) for kind, fraction in fractions.items()}
    rng = random.Random(seed)
    fitness = None
    if cfg.search:
        with bar("Týr: dense top-k targets", 1) as advance:
            fitness = Fitness(model, calib[: cfg.search_windows], cfg.kl_topk, device, offload, forms)
            advance()
    iterations, records = [], []
    for t in range(cfg.iterations if cfg.search else 1):
        for (i, kind), weight in dense.items():
            layers[i].get_submodule(OUTPUTS[kind]).weight.data = weight
        shutil.rmtree(workdir / "candidates", ignore_errors=True)  # the last iteration's files
        net = plan(cfg, geo, centers, t, workdir / "candidates")
        with bar(f"Týr supernet {t + 1}: {cfg.accumulation} accumulation", len(layers)) as advance:
            stream = capture(model, calib, batch_size, device, offload, forms)
            records = build_supernet(model, stream, net, cfg, geo, lambda i: advance())
            del stream
        state = {kind: [0] * len(layers) for kind in KINDS}
        entry = {"spacing": dict(net.spacing), "fitness": [], "candidate_bytes": net.candidates.bytes()}
        if cfg.search and (reason := stuck(net, state)):
            entry["skipped"] = reason  # the centers stand
            with bar(f"Týr search {t + 1}: skipped, {reason}", 1) as advance:
                advance()
        elif cfg.search:
            with bar(f"Týr search {t + 1}: {cfg.generations} generations", cfg.generations) as advance:
                state, entry["fitness"] = evolve(net, fitness, cfg, rng, advance)
        iterations.append(entry)
        centers = {kind: [net.removed(kind, i, k) for i, k in enumerate(state[kind])] for kind in KINDS}
    apply(model, net, state)
    shutil.rmtree(workdir / "candidates", ignore_errors=True)
    kept = [Kept(heads=_kept(net, i, "attention", centers), channels=_kept(net, i, "ffn", centers))
            for i in range(len(layers))]
    shrink(model, kept)
    after = block_params(model)
    return {"layers": records, "extra": {
        "distribution": [{"block": i, "heads_kept": len(k.heads), "channels_kept": len(k.channels),
                          "kv_heads_kept": _kv(layers[i])} for i, k in enumerate(kept)],
        "budget": fractions,
        "block_params": {"dense": before, "pruned": after, "removed_fraction": 1 - after / before},
        "geometry": vars(geo) | {"params_per_block": geo.params},
        "iterations": iterations}}


def _kept(net: Supernet, i: int, kind: str, centers: dict[str, list[int]]) -> list[int]:
    order = net.order(i, kind)
    return sorted(order[centers[kind][i]:].tolist())


def _kv(block) -> int:
    """Key/value heads the smaller block computes (a `_PerHead` projection holds its linear inside)."""
    attn = block.self_attn
    k_proj = getattr(attn, "k_proj", None)
    return 0 if k_proj is None else getattr(k_proj, "linear", k_proj).out_features // attn.head_dim
