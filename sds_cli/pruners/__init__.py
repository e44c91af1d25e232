"""One-shot pruners. Importing this package registers ``magnitude``, ``wanda`` and ``sparsegpt``."""
from sds_cli.pruners import magnitude, sparsegpt, wanda  # noqa: F401  (imported to register)
from sds_cli.pruners.base import (
    PRUNERS,
    ConfigError,
    LayerStats,
    Pattern,
    build_pruner,
    mask_from_scores,
)

__all__ = ["PRUNERS", "ConfigError", "LayerStats", "Pattern", "build_pruner", "mask_from_scores"]
