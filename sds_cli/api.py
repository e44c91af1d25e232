"""The Python API: the CLI's run from a list of overrides, and the pruning stages on a model already in memory."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from sds_cli.engine.replay import check_replay
from sds_cli.engine.stream import capture
from sds_cli.engine.walk import mask_fingerprints
from sds_cli.errors import ConfigError
from sds_cli.paths import CONF, preset, top_default
from sds_cli.pipeline import REPLAY_TOLERANCE
from sds_cli.pruners import build_pruner
from sds_cli.sparsity import Pattern, structured
from sds_cli.stages.oneshot import prune_model
from sds_cli.stages.redense.stage import RedenseConfig, sds_model, snapshot


@dataclass
class Result:
    """What a run leaves: its metrics per stage, per-layer records, mask fingerprints, run dir and pruned model."""

    metrics: dict
    layers: dict
    run_dir: Path | None = None
    model: nn.Module | None = None
    tokenizer: object = None
    mask_sha1: dict = field(default_factory=dict)


def run(overrides: list[str] | tuple[str, ...] = (), run_dir: str | Path | None = None) -> Result:
    """``sds-run`` from Python: the same overrides (``["model=smollm2-135m", "sparsity=2:4"]``), the same
    ``results.json`` in ``run_dir`` (default ``outputs/api/DATE/TIME_model_pruner_sparsity``), the same
    ``logger=`` tracking. Bad input
    raises ``ConfigError``; a failed run still writes its ``results.json`` with ``status: failed``."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from sds_cli.cli import check_overrides
    from sds_cli.pipeline import resolved
    from sds_cli.pipeline import run as run_pipeline
    from sds_cli.results import tracking
    from sds_cli.results.record import Record

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=check_overrides(list(overrides)))
    OmegaConf.set_struct(cfg, False)
    if run_dir is None:
        stamp = time.strftime("%Y-%m-%d/%H-%M-%S")
        run_dir = Path("outputs/api") / f"{stamp}_{cfg.model.name}_{cfg.pruner.name}_{cfg.sparsity}"
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    record = Record(run_dir / "results.json", resolved(cfg))
    tracker = tracking.Tracker()  # logger=none until the configured one has started
    try:
        tracker = tracking.start(record.config["logger"], record.config, run_dir)
        with record.stage("total"):
            done = run_pipeline(cfg, record, tracker)
    except BaseException as err:
        record.write("failed", " ".join(str(err).split()) or type(err).__name__)
        tracker.close(record, "failed")
        raise
    record.write("ok")
    tracker.close(record, "ok")
    return Result(record.metrics, record.layers, run_dir, done.lm.model, done.lm.tokenizer,
                  record.extra.get("mask_sha1", {}))


def prune(model: nn.Module, tokenizer, calibration: torch.Tensor | list[str], *, pruner: str = "sparsegpt",
          sparsity: str | float = "2:4", redense: str = "sds", targets: str = ".*", seqlen: int = 512,
          device: str = "cpu", batch_size: int = 1, check: bool = True, sequential: bool | None = None,
          pruner_options: dict | None = None, redense_options: dict | None = None) -> Result:
    """The run's pruning stages on a Hugging Face causal LM already in memory (on the CPU; only the current
    block moves to ``device``), in place. ``calibration`` is a ``[n, seqlen]`` tensor of token ids, or texts
    cut into ``seqlen``-token windows. ``pruner`` and ``redense`` name the presets of ``conf/pruner`` and
    ``conf/redense`` (``redense="none"``: one-shot only); ``*_options`` override their knobs; ``sequential`` is
    ``oneshot.sequential`` (None: the config's default). Returns the
    per-layer records and mask fingerprints of each stage (no evaluation: the model is the caller's)."""
    if pruner == "none" or structured(pruner):
        raise ConfigError(f"pruner={pruner}: sds_cli.prune takes an unstructured pruner (sparsegpt, wanda, magnitude, admm); "
                          "for Týr and FLAP use sds_cli.run")
    windows = _windows(tokenizer, calibration, seqlen)
    pattern = Pattern.parse(sparsity)
    prune_layer = build_pruner(**preset("pruner", pruner) | (pruner_options or {}))
    sds = RedenseConfig.preset(redense, **(redense_options or {})) if redense != "none" else None
    model.eval()
    tolerance = REPLAY_TOLERANCE[next(model.parameters()).dtype]
    forms = check_replay(model, windows[:1], device, tolerance)[1] if check else None
    dense = snapshot(model, targets) if sds else None
    stream = capture(model, windows, batch_size, device, offload=False, forms=forms)
    sequential = top_default("oneshot")["sequential"] if sequential is None else sequential
    layers = {"oneshot": prune_model(model, stream, prune_layer, pattern, targets, sequential=sequential)}
    fingerprints = {"oneshot": mask_fingerprints(model, targets)}
    if sds:
        layers["sds"] = sds_model(model, stream, dense, prune_layer, pattern, targets, sds)
        fingerprints["sds"] = mask_fingerprints(model, targets)
    return Result({}, layers, None, model, tokenizer, fingerprints)


def _windows(tokenizer, calibration: torch.Tensor | list[str], seqlen: int) -> torch.Tensor:
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.dtype not in (torch.int64, torch.int32):
            raise ConfigError(f"calibration: a [windows, seqlen] tensor of token ids, not {tuple(calibration.shape)} "
                              f"{calibration.dtype}")
        return calibration.long()
    ids = [tokenizer(text, return_tensors="pt").input_ids[0] for text in calibration]
    windows = [t[i : i + seqlen] for t in ids for i in range(0, len(t) - seqlen + 1, seqlen)]
    if not windows:
        raise ConfigError(f"calibration: no text holds {seqlen} tokens; give longer texts or a smaller seqlen")
    return torch.stack(windows)
