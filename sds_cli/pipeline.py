"""The four stages of Sparse-Dense-Sparse, run and recorded: sparse, dense, sparse, evaluate."""
from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from omegaconf import DictConfig, OmegaConf

from sds_cli import data
from sds_cli.console import bar, console, layer_table, summary
from sds_cli.engine.coverage import check_coverage, coverage
from sds_cli.engine.replay import check_replay
from sds_cli.engine.stats import check_held_out
from sds_cli.engine.stream import Stream, capture
from sds_cli.engine.walk import mask_fingerprints, model_linears
from sds_cli.errors import ConfigError
from sds_cli.eval.evaluator import Evaluator
from sds_cli.models import DTYPES, LoadedModel, decoder_layers, load_model
from sds_cli.paths import top_default
from sds_cli.pruners.base import Pruner, build_pruner
from sds_cli.results import dense_cache, export
from sds_cli.results.checkpoint import Checkpoint
from sds_cli.results.record import Record
from sds_cli.results.tracking import Tracker
from sds_cli.sparsity import Pattern, structured
from sds_cli.stages.flap import FlapConfig
from sds_cli.stages.oneshot import prune_model
from sds_cli.stages.redense.stage import RedenseConfig, sds_model, snapshot
from sds_cli.stages.tyr.search import TyrConfig

STRUCTURED_CONFIGS = {"tyr": TyrConfig, "flap": FlapConfig}  # each structured pruner's knobs, checked up front

# Replay guard: a block-by-block replay of one window differs from the model's forward by rounding only
# (measured 0 for every tested family in fp32); a wrong mask or rotary embedding gives 1e-2 to 1.
REPLAY_TOLERANCE = {DTYPES["float32"]: 1e-4, DTYPES["bfloat16"]: 2e-2, DTYPES["float16"]: 5e-3}
INTEGERS = ("seed", "calib.nsamples", "calib.seqlen", "eval.seqlen", "eval.batch_size", "engine.batch_size",
            "redense.iters", "redense.adjust_iters", "redense.held_out")


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' asked for, but no CUDA GPU is visible; use device=cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"unknown device '{name}'; choose one of: auto, cpu, cuda, cuda:N")
    return name


def dense_baseline(cfg: DictConfig, record: Record, evaluate: Evaluator) -> None:
    """Evaluate the dense model once per (model, eval settings), and warn loudly where its perplexity
    is off the published one: a library upgrade that breaks a model family shows up here first."""
    key = dense_cache.key(record.config)
    cached = dense_cache.load(key)
    with record.stage("dense_eval"):
        record.metrics["dense"] = cached or evaluate("dense")
    if cached is None:
        dense_cache.store(key, record.metrics["dense"])
    record.extra["dense_cache"] = {"key": key, "hit": cached is not None}
    ppl = record.metrics["dense"].get("ppl_wikitext2")
    if ppl and not cfg.eval.max_windows and (warning := dense_cache.check_published(cfg.model.name, cfg.eval.seqlen, ppl)):
        console.print(f"[bold yellow]{warning}[/]", soft_wrap=True)  # the warning says WARNING itself
        record.extra["warnings"] = [warning]


def check_integers(cfg: DictConfig) -> None:
    for key in INTEGERS:
        value = OmegaConf.select(cfg, key, default=cfg)
        if value is cfg:  # not in this config (e.g. redense=none has no iterations)
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{key}={value!r} must be a non-negative integer")


@dataclass
class Run:
    """What every stage of one run shares: the parsed knobs, the model, its calibration windows and the
    stream entering the first block, the evaluator, and the record being written."""

    cfg: DictConfig
    record: Record
    lm: LoadedModel
    device: str
    pattern: Pattern
    evaluate: Evaluator
    checkpoint: Checkpoint
    calib: torch.Tensor | None = None
    forms: list[int] | None = None
    stream: Stream | None = None
    dense: dict | None = None
    tracker: Tracker = field(default_factory=Tracker)  # logger=: the run as it goes

    def bar(self, title: str):
        return bar(title, len(decoder_layers(self.lm.model)))

    def evaluate_stage(self, stage: str) -> None:
        with self.record.stage(f"{stage}_eval"):
            self.record.metrics[stage] = self.checkpoint.metrics(stage) or self.evaluate(stage)
        self.checkpoint.put_metrics(stage, self.record.metrics[stage])
        self.tracker.stage(stage, self.record.metrics[stage])

    def blocks(self, stage: str):
        """Where ``walk`` keeps the stage's finished blocks (the checkpoint) and reports them (the tracker)."""
        return self.tracker.blocks(stage, self.checkpoint.stage(stage))

    def profile(self, stage: str, **seconds: float) -> dict:
        """Where the stage's seconds go (``engine.walk.PROFILE`` parts, filled by the stage), in results.json."""
        return self.record.extra.setdefault("profile", {}).setdefault(stage, seconds)

    def fingerprint(self, stage: str) -> None:
        """Each pruned linear's mask hash, and what fraction of the blocks' weight matrices the stage pruned."""
        self.record.extra.setdefault("mask_sha1", {})[stage] = mask_fingerprints(self.lm.model, self.cfg.targets)
        self.record.extra.setdefault("coverage", {})[stage] = coverage(self.lm.model, self.cfg.targets)

    def save(self, name: str) -> None:
        """The pruned model with its tokenizer, inside the run dir, in the ``save.format`` (see export.py)."""
        from sds_cli.results import model_card

        out = self.record.path.parent / name
        export.FORMATS[self.cfg.save.format](self.lm, out, self.cfg.targets)
        # README.md beside the weights: method, measured sparsity, this stage's metrics, how to load
        self.record.extra.setdefault("model_card", {})[name] = model_card.write(out, self.lm.model, self.record, name)
        self.record.extra.setdefault("saved", {})[name] = str(out)
        self.record.extra.setdefault("saved_bytes", {})[name] = export.disk_bytes(out)
        self.record.extra["saved_format"] = self.cfg.save.format


def method(cfg: DictConfig) -> str:
    """Which sequence of stages the config asks for (a key of ``METHODS``)."""
    if cfg.pruner.name == "none":
        return "dense"
    if structured(cfg.pruner.name):
        return cfg.pruner.name
    return "oneshot" if cfg.redense.name == "none" else "sds"


def run(cfg: DictConfig, record: Record, tracker: Tracker | None = None) -> Run:
    """Set up, evaluate the dense model, then run the method's stages in order (reported to ``tracker``)."""
    name = method(cfg)
    setup = prepare(cfg, record, name)
    setup.tracker = tracker or Tracker()
    if cfg.eval.dense:
        dense_baseline(cfg, record, setup.evaluate)
        setup.tracker.stage("dense", record.metrics["dense"])
    for stage in METHODS[name]:
        stage(setup)
    setup.checkpoint.clear()
    return setup


def prepare(cfg: DictConfig, record: Record, name: str) -> Run:
    """Check every knob, load the model and the texts; nothing is pruned yet."""
    check_integers(cfg)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:  # GPU kernels without run-to-run variation (slower); CPU runs are identical anyway
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
    device = resolve_device(cfg.device)
    pattern = Pattern.parse(cfg.sparsity)
    if structured(name):
        check_structured(cfg, pattern)
    else:  # a bad pruner or redense knob stops the run before the model loads
        _, redense = unstructured(cfg)
        if redense:
            check_held_out(redense.held_out, -(-cfg.calib.nsamples // cfg.engine.batch_size))
    checkpoint, resumed = Checkpoint.resume(record.path.parent, record.config, cfg.resume)
    if resumed:
        record.extra["resumed_from"] = str(resumed)
    export.check_format(cfg.save)
    lm = load_model(cfg.model, cfg.dtype)
    check_model(lm, cfg, pattern if name != "dense" else None)
    if name in ("oneshot", "sds"):
        record.extra["left_dense"] = check_coverage(lm.model, cfg.targets, top_default("targets"))
    setup = Run(cfg, record, lm, device, pattern, Evaluator(cfg, lm, device), checkpoint)
    if name != "dense":
        setup.calib = data.calibration_windows(lm.tokenizer, cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen,
                                               cfg.seed, cfg.data.root, cfg.calib.path)
    return setup


def unstructured(cfg: DictConfig) -> tuple[Pruner | None, RedenseConfig | None]:
    """The one-shot pruner and the SDS config of an unstructured run (None where the config has none)."""
    pruner = build_pruner(**cfg.pruner) if cfg.pruner.name != "none" else None
    redense = RedenseConfig(**cfg.redense) if pruner and cfg.redense.name != "none" else None
    return pruner, redense


def replay_guard(run: Run) -> None:
    """Before any pruning: the first calibration window replayed block by block must match the model's
    own forward, or the run stops naming the first block that differs (``engine.check_replay``)."""
    if not run.cfg.engine.check_replay:
        return
    model = run.lm.model
    tolerance = REPLAY_TOLERANCE[next(model.parameters()).dtype]
    with run.record.stage("replay_check"):
        diffs, run.forms = check_replay(model, run.calib[:1], run.device, tolerance)
    run.record.extra["replay_check"] = {"max_rel_diff": max(diffs), "tolerance": tolerance, "blocks": len(diffs)}


def oneshot_stage(run: Run) -> None:
    """Stage 1: every targeted linear pruned by the configured pruner, evaluated and fingerprinted."""
    cfg = run.cfg
    pruner, redense = unstructured(cfg)
    if redense:
        run.dense = snapshot(run.lm.model, cfg.targets)  # the target W_dense of the SDS stage
    with run.record.stage("oneshot"), run.bar(f"1 sparse: {cfg.pruner.name} {run.pattern}") as advance:
        start = time.perf_counter()
        run.stream = capture(run.lm.model, run.calib, cfg.engine.batch_size, run.device, cfg.engine.offload, run.forms)
        profile = run.profile("oneshot", capture=time.perf_counter() - start)
        run.record.layers["oneshot"] = prune_model(run.lm.model, run.stream, pruner, run.pattern, cfg.targets,
                                                   lambda i: advance(), run.blocks("oneshot"), cfg.oneshot.sequential,
                                                   profile)
    run.evaluate_stage("oneshot")
    run.fingerprint("oneshot")
    if cfg.save.oneshot or (cfg.save.final and not redense):
        run.save("model_oneshot" if redense else "model")


def sds_stage(run: Run) -> None:
    """Stages 2 and 3: re-dense and re-prune from the one-shot model, evaluated and fingerprinted."""
    cfg = run.cfg
    pruner, redense = unstructured(cfg)
    run.record.extra["redense_label"] = redense.label  # what ran, in words: the rows of sds-report say it
    with run.record.stage("sds"), run.bar("2-3 dense, sparse: SDS") as advance:
        run.record.layers["sds"] = sds_model(run.lm.model, run.stream, run.dense, pruner, run.pattern, cfg.targets,
                                             redense, lambda i: advance(), run.blocks("sds"),
                                             profile=run.profile("sds"))
    run.evaluate_stage("sds")
    run.fingerprint("sds")
    if cfg.save.final:
        run.save("model")


def _tyr(run: Run) -> dict:
    from sds_cli.stages.tyr.search import prune

    cfg = run.cfg
    return prune(run.lm.model, run.calib, run.pattern.sparsity, TyrConfig(**cfg.pruner), run.device, cfg.seed,
                 cfg.engine.batch_size, cfg.engine.offload, run.forms, bar, run.record.path.parent)


def _flap(run: Run) -> dict:
    from sds_cli.stages.flap import prune

    cfg = run.cfg
    return prune(run.lm.model, run.calib, run.pattern.sparsity, FlapConfig(**cfg.pruner), run.device,
                 cfg.engine.batch_size, cfg.engine.offload, run.forms, bar)


STRUCTURED: dict[str, Callable[[Run], dict]] = {"tyr": _tyr, "flap": _flap}


def structured_stage(run: Run) -> None:
    """Týr (supernet, search) or FLAP (fluctuation, adaptive structure, bias compensation): the physically
    smaller model, recorded as the ``oneshot`` stage."""
    name = method(run.cfg)
    with run.record.stage("oneshot"):
        out = STRUCTURED[name](run)
    run.record.layers[name] = out["layers"]
    run.record.extra[name] = out["extra"]
    for row in out["extra"]["distribution"]:  # heads and channels kept, per block
        run.tracker.block(name, row["block"], [row])
    run.evaluate_stage("oneshot")
    if run.cfg.save.final:
        run.save("model")


METHODS: dict[str, list[Callable[[Run], None]]] = {
    "dense": [],
    "oneshot": [replay_guard, oneshot_stage],
    "sds": [replay_guard, oneshot_stage, sds_stage],
    "tyr": [replay_guard, structured_stage],
    "flap": [replay_guard, structured_stage],
}


def check_structured(cfg: DictConfig, pattern: Pattern) -> None:
    """Týr and FLAP remove whole heads and channels: they take a plain fraction and never re-densify."""
    name = cfg.pruner.name
    if pattern.nm:
        raise ConfigError(f"pruner={name} removes whole heads and channels: sparsity is a fraction of block "
                          f"parameters (e.g. 0.25, 0.5), not {pattern}")
    if cfg.redense.name != "none":
        raise ConfigError(f"pruner={name} yields a smaller dense model; redense={cfg.redense.name} does not apply "
                          f"(leave redense out: pruner={name} implies redense=none)")
    if cfg.save.format != "safetensors":
        raise ConfigError(f"pruner={name} yields a smaller dense model; save.format={cfg.save.format} is for sparse "
                          "weights (use save.format=safetensors)")
    STRUCTURED_CONFIGS[name](**cfg.pruner)


def check_model(lm, cfg: DictConfig, pattern: Pattern | None) -> None:
    """Refuse, before any work, what would fail or mislead later: windows longer than the model takes,
    NaN/Inf weights, and N:M patterns a selected linear's input width cannot hold."""
    for what, seqlen in (("calib", cfg.calib.seqlen), ("eval", cfg.eval.seqlen)):
        if lm.max_seqlen and seqlen > lm.max_seqlen:
            raise ConfigError(f"{what}.seqlen={seqlen} exceeds {lm.name}'s maximum of {lm.max_seqlen} tokens")
    for name, param in lm.model.named_parameters():
        if not torch.isfinite(param).all():
            raise ConfigError(f"model {lm.name} has NaN or Inf weights in {name}; the checkpoint is damaged")
    if pattern is None or not pattern.nm:
        return
    for i, name, linear in model_linears(lm.model, cfg.targets):
        if linear.in_features % pattern.m:
            raise ConfigError(f"sparsity {pattern}: block {i} {name} has input width {linear.in_features}, "
                              f"not divisible by M={pattern.m}; choose another M or exclude it with targets=")


def by_layer(rows: list[dict], columns: list[str]) -> list[dict]:
    """Per-layer rows averaged over blocks, one row per linear name (the full list is in results.json)."""
    names = list(dict.fromkeys(r["layer"] for r in rows))
    out = []
    for name in names:
        group = [r for r in rows if r["layer"] == name]
        row = {"layer": name, "blocks": len(group)}
        for c in columns:
            row[c] = sum(r[c] for r in group) / len(group)
        if "kept" in group[0]:
            row["kept"] = f"sds {sum(r['kept'] == 'sds' for r in group)}/{len(group)}"
        out.append(row)
    return out


def print_summary(record: Record) -> None:
    """The closing console summary: per-layer means over blocks, then the stage metrics."""
    for stage, rows in record.layers.items():
        if structured(stage):
            dist = record.extra[stage]["distribution"]
            console.print(layer_table(f"{stage}: structures kept per block", dist, list(dist[0])))
            continue
        columns = ["sparsity", "error", "seconds"] if stage == "oneshot" else [
            "sparsity", "error_oneshot", "error_redense", "error_final", "seconds"]
        extra = [] if stage == "oneshot" else ["kept"]
        console.print(layer_table(f"{stage}: per-layer mean over blocks", by_layer(rows, columns),
                                  ["layer", "blocks", *columns, *extra]))
    metrics = {s: {k: v for k, v in m.items() if isinstance(v, float)} for s, m in record.metrics.items()}
    seconds = {s: record.seconds.get(f"{s}_eval", 0) + record.seconds.get(s, 0) for s in record.metrics}
    console.print(summary(f"{record.config['model']['name']}  {record.config['pruner']['name']}  "
                          f"{record.config['sparsity']}", metrics, seconds))
    if label := record.extra.get("redense_label"):
        console.print(f"sds: {label}", highlight=False)
    for stage, cover in record.extra.get("coverage", {}).items():
        console.print(f"{stage}: pruned {cover['pruned_fraction']:.1%} of the blocks' weight matrices "
                      f"({cover['pruned_params']:,} of {cover['block_params']:,} parameters, routers excepted); "
                      f"zeros {cover['zeros_pruned']:.1%} of them, {cover['zeros_block']:.1%} of all", highlight=False)
    console.print(f"results: {record.path}")


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
