"""What a run leaves behind: results.json, block checkpoints, saved models, the dense-baseline cache."""
