"""Structured pruning combined with quantization (the training side is lowbit.train.wpc)."""

from .structured import GroupSparsity, prune_small_groups, structured_sparsity

__all__ = ["GroupSparsity", "prune_small_groups", "structured_sparsity"]
