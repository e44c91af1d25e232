"""Týr-the-Pruner: local structured pruner, supernet and search, and the physical removal of structures."""
