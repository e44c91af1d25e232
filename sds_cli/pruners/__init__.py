"""One-shot pruners, one method per file over a weight matrix and its calibration statistics.
Importing this package registers ``magnitude``, ``wanda``, ``sparsegpt`` and ``admm``."""
from sds_cli.pruners import admm, magnitude, sparsegpt, wanda  # noqa: F401  (imported to register)
from sds_cli.pruners.base import PRUNERS, Pruner, build_pruner, register

__all__ = ["PRUNERS", "Pruner", "build_pruner", "register"]
