"""sds-cli: one-shot LLM pruning with Sparse-Dense-Sparse, as a config-driven experiment runner.

    import sds_cli
    result = sds_cli.run(["model=smollm2-135m", "pruner=wanda", "sparsity=2:4"])   # the CLI's run
    result = sds_cli.prune(model, tokenizer, texts, pruner="sparsegpt", sparsity="2:4")  # a model in memory

Heavy parts (torch, transformers, Hydra) are imported on first use, not by ``import sds_cli``."""

__version__ = "0.1.0"

_EXPORTS = {
    "run": "sds_cli.api", "prune": "sds_cli.api", "Result": "sds_cli.api",
    "load_pruned": "sds_cli.stages.tyr.structure", "load_compressed": "sds_cli.results.export",
    "ConfigError": "sds_cli.errors",
}
__all__ = ["ConfigError", "Result", "load_compressed", "load_pruned", "prune", "run"]


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'sds_cli' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
