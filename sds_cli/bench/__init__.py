"""`sds-bench`: inference speed of pruned models (CUDA 2:4 kernels; DeepSparse or PyTorch on the CPU)."""
