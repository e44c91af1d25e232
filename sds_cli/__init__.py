"""sds-cli: one-shot LLM pruning with Sparse-Dense-Sparse, as a config-driven experiment runner."""

__version__ = "0.1.0"
