"""Resumable runs: what each finished block of a stage left behind, so a killed run goes on from there.

Per finished block a stage stores the selected linears' new weights and the block's per-layer
records; evaluation results are stored per stage. Activations are not stored: on resume they are
recomputed by running the calibration windows through the restored blocks, a forward pass far
cheaper than the work it replays and bit-identical on CPU. The checkpoint is removed when the run
succeeds."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from sds_cli.atomic import write_json
from sds_cli.errors import ConfigError

STATE = "state.json"


def _comparable(config: dict) -> str:
    """The config that decides a run's result: everything but how it is resumed or kept."""
    return json.dumps({k: v for k, v in config.items() if k not in ("resume", "checkpoint")}, sort_keys=True,
                      default=str)


class Checkpoint:
    """The checkpoint directory of one run; ``Checkpoint(None, ...)`` checkpoints nothing."""

    def __init__(self, root: Path | None, config: dict):
        self.root = root
        self.state = {"config": _comparable(config), "metrics": {}, "layers": {}}
        if root and (root / STATE).is_file():
            self.state = json.loads((root / STATE).read_text())

    @classmethod
    def resume(cls, run_dir: Path, config: dict, resume: str | bool) -> tuple[Checkpoint, Path | None]:
        """The checkpoint of this run, taken over from the unfinished run named by ``resume``: ``true``
        finds the newest unfinished run with the same config next to this one, a path names it."""
        root = run_dir / "checkpoint"
        if resume in (None, False):
            return cls(root if config.get("checkpoint", True) else None, config), None
        found = _find(run_dir, config) if resume is True else Path(str(resume)).expanduser()
        source = found / "checkpoint" if found else None
        if source is None or not (source / STATE).is_file():
            where = f"next to {run_dir.parent}" if resume is True else f"in {resume}"
            raise ConfigError(f"resume: no unfinished run with this config {where} (a checkpoint/{STATE} "
                              "is left by a run that did not finish); run without resume=")
        if json.loads((source / STATE).read_text())["config"] != _comparable(config):
            raise ConfigError(f"resume: the run in {found} has a different config; resume it with its own overrides")
        if source != root:
            shutil.move(source, root)
        return cls(root, config), found

    def stage(self, name: str) -> StageCheckpoint | None:
        return StageCheckpoint(self, name) if self.root else None

    def metrics(self, stage: str) -> dict | None:
        return self.state["metrics"].get(stage)

    def put_metrics(self, stage: str, metrics: dict) -> None:
        self.state["metrics"][stage] = metrics
        self.write()

    def write(self) -> None:
        if self.root:
            write_json(self.root / STATE, self.state)

    def clear(self) -> None:
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)


class StageCheckpoint:
    """One stage's finished blocks: ``walk`` restores them instead of redoing them."""

    def __init__(self, parent: Checkpoint, stage: str):
        self.parent, self.stage = parent, stage
        self.layers = parent.state["layers"].setdefault(stage, {})

    def finished(self) -> int:
        """How many leading blocks are done."""
        count = 0
        while str(count) in self.layers:
            count += 1
        return count

    def _file(self, i: int) -> Path:
        return self.parent.root / f"{self.stage}-{i:04d}.safetensors"

    def save(self, i: int, linears: dict[str, nn.Linear], records: list) -> None:
        self.parent.root.mkdir(parents=True, exist_ok=True)
        save_file({n: lin.weight.detach().to("cpu").contiguous() for n, lin in linears.items()}, self._file(i))
        self.layers[str(i)] = records
        self.parent.write()

    def restore(self, i: int, linears: dict[str, nn.Linear]) -> list:
        weights = load_file(self._file(i))
        for name, linear in linears.items():
            linear.weight.data.copy_(weights[name])
        return self.layers[str(i)]


def _find(run_dir: Path, config: dict) -> Path | None:
    """The newest unfinished run with this config in the tree that holds this run dir's parent."""
    want = _comparable(config)
    search = run_dir.resolve().parent.parent
    found = []
    for state in search.rglob(f"checkpoint/{STATE}"):
        run = state.parent.parent
        if run.resolve() != run_dir.resolve() and json.loads(state.read_text()).get("config") == want:
            found.append((state.stat().st_mtime, run))
    return max(found)[1] if found else None

