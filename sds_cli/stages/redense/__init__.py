"""Stages 2 and 3 of Sparse-Dense-Sparse: the solvers over one layer, and the stage that walks the blocks."""
