"""The stages built on the engine: one-shot pruning, SDS re-dense and re-prune, and Týr structured pruning."""
