"""Benchmarks: memory and time of cepo_kernels against naive PyTorch, TRL, Liger, CCE and the
bare-matmul floor. ``python -m bench --help``; results in ``bench/results/<machine>/``."""
