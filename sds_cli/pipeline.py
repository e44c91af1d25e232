"""The four stages of Sparse-Dense-Sparse, run and recorded: sparse, dense, sparse, evaluate."""
from __future__ import annotations

import os

import torch
from omegaconf import DictConfig, OmegaConf

from . import baseline, data, export
from .checkpoint import Checkpoint
from .console import bar, console, layer_table, summary
from .engine import capture, check_replay, mask_fingerprints, model_linears
from .models import DTYPES, decoder_layers, load_model
from .oneshot import prune_model
from .perplexity import perplexity, windows
from .pruners import ConfigError, Pattern, build_pruner
from .record import Record
from .redense import RedenseConfig, sds_model, snapshot
from .tyr import TyrConfig

EVAL_MAX_WINDOWS = {"c4": 256}  # SparseGPT's C4 protocol: the first 256 windows
# Replay guard: a block-by-block replay of one window differs from the model's forward by rounding only
# (measured 0 for every tested family in fp32); a wrong mask or rotary embedding gives 1e-2 to 1.
REPLAY_TOLERANCE = {DTYPES["float32"]: 1e-4, DTYPES["bfloat16"]: 2e-2, DTYPES["float16"]: 5e-3}
INTEGERS = ("seed", "calib.nsamples", "calib.seqlen", "eval.seqlen", "eval.batch_size", "engine.batch_size",
            "redense.iters", "redense.adjust_iters")


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' asked for, but no CUDA GPU is visible; use device=cpu or auto")
    if name != "cpu" and not name.startswith("cuda"):
        raise ConfigError(f"unknown device '{name}'; choose one of: auto, cpu, cuda, cuda:N")
    return name


class Evaluator:
    """Evaluates the model of each stage on the configured texts (tokenized once) and tasks."""

    def __init__(self, cfg: DictConfig, lm, device: str):
        self.cfg, self.lm, self.device = cfg.eval, lm, device
        self.root = cfg.data.root
        for name in self.cfg.datasets:
            if name not in data.EVAL_CHOICES:
                raise ConfigError(f"unknown eval dataset '{name}'; choose one of: {', '.join(data.EVAL_CHOICES)}")
        self.texts = {name: self.windows(cfg, lm.tokenizer, name) for name in self.cfg.datasets}

    def windows(self, cfg: DictConfig, tokenizer, name: str) -> torch.Tensor:
        limit = self.cfg.max_windows or EVAL_MAX_WINDOWS.get(name)
        if name == "validation":
            return data.validation_windows(tokenizer, cfg.calib, cfg.seed, self.root, self.cfg.seqlen, limit)
        return windows(data.eval_tokens(tokenizer, name, self.root, self.cfg.path), self.cfg.seqlen, limit)

    def __call__(self, stage: str) -> dict:
        model = self.lm.model.to(self.device)
        results = {}
        for name, batches in self.texts.items():
            with bar(f"{stage}: {name} perplexity", len(batches)) as advance:
                results[f"ppl_{name}"], results[f"tokens_{name}"] = perplexity(
                    model, batches, self.device, self.cfg.batch_size, advance)
        if self.cfg.zeroshot.tasks:
            from .zeroshot import zeroshot

            zs = self.cfg.zeroshot
            with bar(f"{stage}: zero-shot", len(zs.tasks)) as advance:
                scores = zeroshot(model, self.lm.tokenizer, list(zs.tasks), data_root=self.root,
                                  batch_size=zs.batch_size, limit=zs.limit, num_fewshot=zs.num_fewshot,
                                  device=self.device, progress=advance)
            results |= {"zeroshot": scores["tasks"], "mean_acc": scores["mean_acc"]}
        model.to("cpu")
        return results


def dense_baseline(cfg: DictConfig, record: Record, evaluate: Evaluator) -> None:
    """Evaluate the dense model once per (model, eval settings), and warn loudly where its perplexity
    is off the published one: a library upgrade that breaks a model family shows up here first."""
    key = baseline.key(record.config)
    cached = baseline.load(key)
    with record.stage("dense_eval"):
        record.metrics["dense"] = cached or evaluate("dense")
    if cached is None:
        baseline.store(key, record.metrics["dense"])
    record.extra["dense_cache"] = {"key": key, "hit": cached is not None}
    ppl = record.metrics["dense"].get("ppl_wikitext2")
    if ppl and not cfg.eval.max_windows and (warning := baseline.check_published(cfg.model.name, cfg.eval.seqlen, ppl)):
        console.print(f"[bold yellow]{warning}[/]", soft_wrap=True)  # the warning says WARNING itself
        record.extra["warnings"] = [warning]


def check_integers(cfg: DictConfig) -> None:
    for key in INTEGERS:
        value = OmegaConf.select(cfg, key, default=cfg)
        if value is cfg:  # not in this config (e.g. redense=none has no iterations)
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{key}={value!r} must be a non-negative integer")


def run(cfg: DictConfig, record: Record) -> None:
    check_integers(cfg)
    torch.manual_seed(cfg.seed)
    if cfg.deterministic:  # GPU kernels without run-to-run variation (slower); CPU runs are identical anyway
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(cfg.tf32)
    device = resolve_device(cfg.device)
    pattern = Pattern.parse(cfg.sparsity)
    pruning = cfg.pruner.name != "none"
    structured = structured_config(cfg, pattern)
    pruner = build_pruner(**cfg.pruner) if pruning and not structured else None
    redense = RedenseConfig(**cfg.redense) if pruner and cfg.redense.name != "none" else None
    checkpoint, resumed = Checkpoint.resume(record.path.parent, record.config, cfg.resume)
    if resumed:
        record.extra["resumed_from"] = str(resumed)
    export.check_format(cfg.save)
    lm = load_model(cfg.model, cfg.dtype)
    check_model(lm, cfg, pattern if pruning else None)
    evaluate = Evaluator(cfg, lm, device)
    calib = data.calibration_windows(lm.tokenizer, cfg.calib.source, cfg.calib.nsamples, cfg.calib.seqlen,
                                     cfg.seed, cfg.data.root, cfg.calib.path) if pruning else None
    blocks = len(decoder_layers(lm.model))

    if cfg.eval.dense:
        dense_baseline(cfg, record, evaluate)
    if structured:
        kinds = replay_guard(lm.model, calib, device, cfg, record) if cfg.engine.check_replay else None
        structured_stage(cfg, lm, calib, structured, pattern, kinds, device, record)
        evaluate_stage(record, evaluate, checkpoint, "oneshot")
        if cfg.save.final:
            save(lm, record, "model", cfg)
    elif pruning:
        kinds = replay_guard(lm.model, calib, device, cfg, record) if cfg.engine.check_replay else None
        dense = snapshot(lm.model, cfg.layers) if redense else None
        with record.stage("oneshot"), bar(f"1 sparse: {cfg.pruner.name} {pattern}", blocks) as advance:
            stream = capture(lm.model, calib, cfg.engine.batch_size, device, cfg.engine.offload, kinds)
            record.layers["oneshot"] = prune_model(lm.model, stream, pruner, pattern, cfg.layers,
                                                   lambda i: advance(), checkpoint.stage("oneshot"))
        evaluate_stage(record, evaluate, checkpoint, "oneshot")
        record.extra["mask_sha1"] = {"oneshot": mask_fingerprints(lm.model, cfg.layers)}
        if cfg.save.oneshot or (cfg.save.final and not redense):
            save(lm, record, "model_oneshot" if redense else "model", cfg)
    if redense:
        with record.stage("sds"), bar("2-3 dense, sparse: SDS", blocks) as advance:
            record.layers["sds"] = sds_model(lm.model, stream, dense, pruner, pattern, cfg.layers, redense,
                                             lambda i: advance(), checkpoint.stage("sds"))
        evaluate_stage(record, evaluate, checkpoint, "sds")
        record.extra["mask_sha1"]["sds"] = mask_fingerprints(lm.model, cfg.layers)
        if cfg.save.final:
            save(lm, record, "model", cfg)
    checkpoint.clear()


def structured_config(cfg: DictConfig, pattern: Pattern) -> TyrConfig | None:
    """Týr's config, or None for the unstructured pruners; Týr removes whole heads and channels, so it
    takes a plain fraction and never re-densifies."""
    if cfg.pruner.name != "tyr":
        return None
    if pattern.nm:
        raise ConfigError(f"pruner=tyr removes whole heads and channels: sparsity is a fraction of block "
                          f"parameters (e.g. 0.25, 0.5), not {pattern}")
    if cfg.redense.name != "none":
        raise ConfigError(f"pruner=tyr yields a smaller dense model; redense={cfg.redense.name} does not apply "
                          "(leave redense out: pruner=tyr implies redense=none)")
    if cfg.save.format != "safetensors":
        raise ConfigError(f"pruner=tyr yields a smaller dense model; save.format={cfg.save.format} is for sparse "
                          "weights (use save.format=safetensors)")
    return TyrConfig(**cfg.pruner)


def structured_stage(cfg: DictConfig, lm, calib: torch.Tensor, tyr_cfg: TyrConfig, pattern: Pattern, kinds,
                     device: str, record: Record) -> None:
    """Týr: supernet, search, and the physically smaller model (recorded as the ``oneshot`` stage)."""
    from .tyr import prune

    with record.stage("oneshot"):
        out = prune(lm.model, calib, pattern.sparsity, tyr_cfg, device, cfg.seed,
                    cfg.engine.batch_size, cfg.engine.offload, kinds, bar)
    record.layers["tyr"] = out["layers"]
    record.extra["tyr"] = out["extra"]


def replay_guard(model, calib: torch.Tensor, device: str, cfg: DictConfig, record: Record) -> list[int]:
    """Before any pruning: the first calibration window replayed block by block must match the model's
    own forward, or the run stops naming the first block that differs (``engine.check_replay``)."""
    tolerance = REPLAY_TOLERANCE[next(model.parameters()).dtype]
    with record.stage("replay_check"):
        diffs, kinds = check_replay(model, calib[:1], device, tolerance)
    record.extra["replay_check"] = {"max_rel_diff": max(diffs), "tolerance": tolerance, "blocks": len(diffs)}
    return kinds


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
    for i, name, linear in model_linears(lm.model, cfg.layers):
        if linear.in_features % pattern.m:
            raise ConfigError(f"sparsity {pattern}: block {i} {name} has input width {linear.in_features}, "
                              f"not divisible by M={pattern.m}; choose another M or exclude it with layers=")


def evaluate_stage(record: Record, evaluate: Evaluator, checkpoint: Checkpoint, stage: str) -> None:
    with record.stage(f"{stage}_eval"):
        record.metrics[stage] = checkpoint.metrics(stage) or evaluate(stage)
    checkpoint.put_metrics(stage, record.metrics[stage])


def save(lm, record: Record, name: str, cfg: DictConfig) -> None:
    """The pruned model with its tokenizer, inside the run dir, in the ``save.format`` (see export.py)."""
    out = record.path.parent / name
    export.FORMATS[cfg.save.format](lm, out, cfg.layers)
    record.extra.setdefault("saved", {})[name] = str(out)
    record.extra.setdefault("saved_bytes", {})[name] = export.disk_bytes(out)
    record.extra["saved_format"] = cfg.save.format


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


def report(record: Record) -> None:
    """The closing console summary: per-layer means over blocks, then the stage metrics."""
    for stage, rows in record.layers.items():
        if stage == "tyr":
            dist = record.extra["tyr"]["distribution"]
            console.print(layer_table("tyr: structures kept per block", dist, list(dist[0])))
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
    console.print(f"results: {record.path}")


def resolved(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
