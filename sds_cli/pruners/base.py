"""Sparsity patterns and the pruner registry shared by every pruner."""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from sds_cli.engine.stats import LayerStats
from sds_cli.errors import ConfigError
from sds_cli.sparsity import Pattern


class Pruner(Protocol):
    def __call__(self, weight: torch.Tensor, stats: LayerStats, pattern: Pattern) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(pruned_weight, mask)``: ``mask`` is True where a weight was removed."""


PRUNERS: dict[str, Callable[..., Pruner]] = {}


def register(name: str):
    def wrap(factory):
        PRUNERS[name] = factory
        return factory

    return wrap


def build_pruner(name: str, **options) -> Pruner:
    if name not in PRUNERS:
        raise ConfigError(f"unknown pruner '{name}'; choose one of: {', '.join(sorted(PRUNERS))}, none")
    return PRUNERS[name](**options)
