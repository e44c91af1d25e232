"""Where Týr's supernet candidates live while the search runs: off the accelerator, in host memory or in
memory-mapped files under the run dir (``pruner.candidates``).

A candidate is an output linear (o_proj, down_proj) with some of its input-column groups removed; the removed
columns are exact zeros, so only the kept ones are stored, a level with r of N groups removed taking
(N - r) / N of the dense bytes. One block's candidates, the levels in ``pruner.levels`` around a center of c
removed, take levels x (N - c) / N of the layer's dense bytes where no level is clipped at 0 or N (the offsets
are symmetric), so the whole supernet about levels x (1 - target) x the bytes of every o_proj and down_proj.
A candidate goes to the device, widened back, only while the fitness forward evaluates it."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sds_cli.errors import ConfigError

Keep = Callable[[dict[int, torch.Tensor], Path | None], dict[int, torch.Tensor]]


def _host(levels: dict[int, torch.Tensor], path: Path | None) -> dict[int, torch.Tensor]:
    return {r: w.to("cpu") for r, w in levels.items()}


def _disk(levels: dict[int, torch.Tensor], path: Path) -> dict[int, torch.Tensor]:
    """Written once, then read back as a memory map: the page cache holds what the search touches."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({r: w.to("cpu") for r, w in levels.items()}, path)
    return torch.load(path, mmap=True, weights_only=True)


STORES: dict[str, Keep] = {"host": _host, "disk": _disk}


def kept_columns(order: torch.Tensor, removed: int, size: int) -> torch.Tensor:
    """The input columns a level with the first ``removed`` groups of ``order`` gone keeps, ascending."""
    groups = order[removed:].sort().values
    return (groups[:, None] * size + torch.arange(size, device=groups.device)).flatten()


@dataclass
class Candidates:
    """Each layer's candidates (keyed (block, kind)) by structures removed, kept columns only."""

    mode: str
    root: Path | None
    levels: dict[tuple[int, str], dict[int, torch.Tensor]] = field(default_factory=dict)
    shape: dict[tuple[int, str], tuple[torch.Size, torch.Tensor, int]] = field(default_factory=dict)

    def __post_init__(self):
        if self.mode not in STORES:
            raise ConfigError(f"pruner.candidates={self.mode!r}; choose one of: {', '.join(STORES)}")
        if self.mode == "disk" and self.root is None:
            raise ConfigError("pruner.candidates=disk needs a directory for the candidate files")

    def put(self, key: tuple[int, str], weights: dict[int, torch.Tensor], order: torch.Tensor, size: int) -> None:
        compact = {r: w[:, kept_columns(order.to(w.device), r, size)].contiguous() for r, w in weights.items()}
        path = self.root / f"block{key[0]:03d}-{key[1]}.pt" if self.root else None
        self.levels[key] = STORES[self.mode](compact, path)
        self.shape[key] = (next(iter(weights.values())).shape, order.cpu(), size)

    def get(self, key: tuple[int, str], removed: int, device) -> torch.Tensor:
        """The candidate at full width on ``device`` (removed columns zero)."""
        shape, order, size = self.shape[key]
        compact = self.levels[key][removed]
        full = torch.zeros(shape, dtype=compact.dtype, device=device)
        full[:, kept_columns(order, removed, size).to(device)] = compact.to(device)
        return full

    def bytes(self) -> int:
        """Bytes the candidates take in host memory (``host``) or on disk (``disk``)."""
        if self.mode == "disk":
            return sum(f.stat().st_size for f in self.root.glob("*.pt"))
        return sum(w.nbytes for levels in self.levels.values() for w in levels.values())
