"""Head grouping of the op's tensors (docs/math.md §1); defined next to the kernels, which need
it too, in ``pallas_kernels.m2rnn.heads``."""

from pallas_kernels.m2rnn.heads import expand_heads, sum_heads

__all__ = ["expand_heads", "sum_heads"]
