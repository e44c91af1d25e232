"""The core: the block-by-block engine shared by every stage and every model family (capture, replay guard,
statistics, the walk over blocks). It imports nothing above it."""
