"""Experiment tracking (``logger=``): a run's config, stage metrics, per-block errors, stage times and files,
sent to MLflow, Weights & Biases or TensorBoard as the run goes. ``results.json`` stays the record; a tracker
is a view of it. Each tracker imports its library only when chosen (``pip install 'sds-cli[tracking]'``)."""
from __future__ import annotations

import json
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from rich.markup import escape

from sds_cli.console import console
from sds_cli.errors import ConfigError

INSTALL = "pip install 'sds-cli[tracking]'"
ARTIFACTS = ("*.json", "report.*", "*.png", "*.pdf", "*.svg", "*.log")  # top level of the run dir
TRACKERS: dict[str, type[Tracker]] = {}


def register(name: str) -> Callable[[type[Tracker]], type[Tracker]]:
    def add(cls: type[Tracker]) -> type[Tracker]:
        TRACKERS[name] = cls
        return cls

    return add


def flatten(tree: dict, prefix: str = "", sep: str = ".") -> dict:
    """Nested dicts as one level of ``a.b.c`` keys (lists and scalars are leaves)."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{sep}{key}" if prefix else str(key)
        out |= flatten(value, name, sep) if isinstance(value, dict) else {name: value}
    return out


def numbers(tree: dict, prefix: str) -> dict[str, float]:
    """The numeric leaves of ``tree`` (metrics, records) as ``prefix/key`` -> float; booleans and text left out."""
    return {k: float(v) for k, v in flatten(tree, prefix, "/").items()
            if isinstance(v, int | float) and not isinstance(v, bool)}


def _imported(module: str, chosen: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"logger={chosen} needs the {package} package ({err}); {INSTALL}") from err


class Tracker:
    """``logger=none``, and what every tracker shares: the calls a backend implements (``start``, ``log_metrics``,
    ``log_params``, ``log_artifact``, ``finish``) and the run's events on top of them. A tracker that cannot start
    stops the run before any work; one that fails later warns once and goes quiet, and the run goes on."""

    def __init__(self, name: str = "none", experiment: str | None = None, **options):
        self.name, self.experiment = name, experiment
        self.run_dir = Path(".")
        self.broken = False

    def start(self, config: dict, run_name: str, group: str | None) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        pass

    def log_params(self, params: dict) -> None:
        pass

    def log_artifact(self, path: Path) -> None:
        pass

    def finish(self, status: str) -> None:
        pass

    # The run's events, in the order they happen.
    def stage(self, stage: str, metrics: dict) -> None:
        """A stage's evaluation, logged as soon as it is done: ``oneshot/ppl_wikitext2``, ``sds/mean_acc``..."""
        self._send(self.log_metrics, numbers(metrics, stage))

    def block(self, stage: str, i: int, rows: list[dict]) -> None:
        """One finished block: the mean over its linears of each numeric column (``blocks/sds/error_final``...)
        at step ``i``, one series per stage and column."""
        values = [numbers(row, "") for row in rows]
        if values:
            self._send(self.log_metrics, {f"blocks/{stage}/{c}": math.fsum(v[c] for v in values) / len(values)
                                          for c in values[0] if c != "block"}, step=i)

    def blocks(self, stage: str, store):
        """``walk``'s block store for ``stage``: the run's checkpoint (or none), each finished or restored block
        also logged through ``block``."""
        return _LoggedBlocks(self, stage, store)

    def close(self, record, status: str) -> None:
        """The end of the run (``results.json`` written): stage times, the run dir's result files, the status."""
        self._send(self._close, record, status)

    def _close(self, record, status: str) -> None:
        self.log_metrics({f"seconds/{k}": float(v) for k, v in record.seconds.items()})
        for pattern in ARTIFACTS:
            for path in sorted(record.path.parent.glob(pattern)):
                self.log_artifact(path)
        self.finish(status)

    def _send(self, call: Callable, *args, **kwargs) -> None:
        """A call once the run is under way: a failure (a server gone, a full disk) is one warning, then silence."""
        if self.broken:
            return
        try:
            call(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - tracking never turns a run, or its record, into a failure
            self.broken = True
            console.print(f"[bold yellow]warning:[/] {escape(f'logger={self.name}: {type(err).__name__}: {err}')}; "
                          "tracking stops here, the run goes on (results.json is the record)",
                          highlight=False, soft_wrap=True)


class _LoggedBlocks:
    """A ``BlockStore`` (engine/walk.py) that logs each block's rows and passes everything on to ``store``."""

    def __init__(self, tracker: Tracker, stage: str, store):
        self.tracker, self.stage, self.store = tracker, stage, store

    def finished(self) -> int:
        return self.store.finished() if self.store else 0

    def restore(self, i: int, linears) -> list:
        rows = self.store.restore(i, linears)
        self.tracker.block(self.stage, i, rows)
        return rows

    def save(self, i: int, linears, rows: list) -> None:
        if self.store:
            self.store.save(i, linears, rows)
        self.tracker.block(self.stage, i, rows)


register("none")(Tracker)


@register("mlflow")
class MLflowTracker(Tracker):
    """An MLflow run per sds-run run, in the experiment ``group`` (``./mlruns`` by default, any tracking URI)."""

    def __init__(self, name: str, experiment: str | None = None, tracking_uri: str = "./mlruns", **options):
        super().__init__(name, experiment)
        self.uri = str(tracking_uri)

    def start(self, config, run_name, group):
        if "://" not in self.uri or self.uri.startswith("file:"):  # MLflow 3 asks file stores to opt in
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        tracking = _imported("mlflow.tracking", self.name, "mlflow")
        self.entities = _imported("mlflow.entities", self.name, "mlflow")
        self.client = tracking.MlflowClient(self.uri)
        name = group or "sds-cli"
        found = self.client.get_experiment_by_name(name)
        if found is None:
            try:
                found = self.client.get_experiment(self.client.create_experiment(name))
            except Exception:  # another job of the sweep created it first
                found = self.client.get_experiment_by_name(name)
                if found is None:
                    raise
        self.run_id = self.client.create_run(found.experiment_id, run_name=run_name,
                                             tags={"run_dir": str(self.run_dir)}).info.run_id
        self.log_params(flatten(config))

    def log_metrics(self, metrics, step=None):
        now = int(time.time() * 1000)
        batch = [self.entities.Metric(re.sub(r"[^\w\-. /]", "_", k), v, now, step or 0) for k, v in metrics.items()]
        for i in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[i : i + 1000])

    def log_params(self, params):
        batch = [self.entities.Param(k, v if isinstance(v, str) else json.dumps(v)) for k, v in params.items()]
        for i in range(0, len(batch), 100):
            self.client.log_batch(self.run_id, params=batch[i : i + 100])

    def log_artifact(self, path):
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, status):
        self.client.set_terminated(self.run_id, "FINISHED" if status == "ok" else "FAILED")


@register("wandb")
class WandbTracker(Tracker):
    """A Weights & Biases run in ``project``, grouped by ``group``; offline (``wandb sync`` later) unless
    WANDB_API_KEY is set or ``mode`` says otherwise. Its files go to the run dir's ``wandb/``."""

    def __init__(self, name: str, experiment: str | None = None, project: str = "sds-cli",
                 entity: str | None = None, mode: str | None = None, **options):
        super().__init__(name, experiment)
        self.project, self.entity = project, entity
        self.mode = mode or ("online" if os.environ.get("WANDB_API_KEY") else "offline")

    def start(self, config, run_name, group):
        wandb = _imported("wandb", self.name, "wandb")
        self.run = wandb.init(project=self.project, entity=self.entity, group=group, name=run_name,
                              dir=str(self.run_dir), config=config, mode=self.mode)
        self.run.define_metric("block")
        self.run.define_metric("blocks/*", step_metric="block")

    def log_metrics(self, metrics, step=None):
        self.run.log(metrics if step is None else metrics | {"block": step})

    def log_params(self, params):
        self.run.config.update(params, allow_val_change=True)

    def log_artifact(self, path):
        self.run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self, status):
        self.run.finish(exit_code=0 if status == "ok" else 1)


@register("tensorboard")
class TensorBoardTracker(Tracker):
    """TensorBoard event files in the run dir's ``tensorboard/`` (or ``dir/GROUP/RUN``): scalars per stage
    metric and per-block series, the config and the status as text. The run dir's files stay where they are."""

    def __init__(self, name: str, experiment: str | None = None, dir: str | None = None, **options):
        super().__init__(name, experiment)
        self.dir = dir

    def start(self, config, run_name, group):
        writer = _imported("torch.utils.tensorboard", self.name, "tensorboard").SummaryWriter
        where = Path(self.dir) / (group or "") / run_name if self.dir else self.run_dir / "tensorboard"
        self.writer = writer(log_dir=str(where))
        self.log_params(flatten(config))

    def log_metrics(self, metrics, step=None):
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step or 0)

    def log_params(self, params):
        self.writer.add_text("config", "\n".join(f"    {k}: {json.dumps(v)}" for k, v in params.items()))

    def finish(self, status):
        self.writer.add_text("status", status)
        self.writer.close()


def start(options: dict, config: dict, run_dir: Path, sweep_dir: str | None = None) -> Tracker:
    """The ``logger`` config's tracker, started for the run in ``run_dir``: its name is the run dir's, its
    group ``logger.experiment``, else a multirun's sweep dir (relative to the working dir where inside it)."""
    options = dict(options)
    tracker = TRACKERS[options["name"]](**options)
    group = tracker.experiment
    if group is None and sweep_dir is not None:
        sweep = Path(sweep_dir).resolve()
        group = str(sweep.relative_to(Path.cwd())) if sweep.is_relative_to(Path.cwd()) else sweep.name
    tracker.run_dir = Path(run_dir)
    tracker.start(config, Path(run_dir).name, group)
    return tracker
