"""The ``mosaic_gpu`` backend: M²RNN forward and backward kernels in Pallas' Mosaic GPU lowering
(Hopper: TMA copies, wgmma), for the paper's shape family: bfloat16, K = 64, V = 16.

One warpgroup per (batch row, head) keeps the 64×16 float32 state in the wgmma accumulator layout
and feeds ``H W`` to the tensor core as bf16 hi/lo parts; inputs are TMA-staged through SMEM.
What lives where, and the measured choices behind it: docs/kernels.md ("mosaic_gpu"). The
checkpoints, ``(B, S/C, 64, N·16)`` float32, are for this backend's backward.

Off a GPU the kernels run in the Mosaic GPU interpreter, whose wgmma takes the A operand only
from SMEM and which cannot run inline Mosaic GPU code: there the products are the same bf16
parts as a ``jnp.dot`` with float32 accumulation and the per-warp sums are jnp sums.
``jax.export(..., platforms=["cuda"])`` runs Mosaic GPU's layout inference and lowering for
sm_90 on a machine without a GPU, which is how CI checks the GPU paths.

Modules: ``common`` (supported inputs, input layout, launch, hi/lo split), ``warp_sums`` (inline
per-warp reductions), ``forward``, ``backward``.
"""

from pallas_kernels.m2rnn.mosaic_gpu.backward import backward
from pallas_kernels.m2rnn.mosaic_gpu.common import DEFAULT_CHUNK_SIZE, choose_chunk_size, supports
from pallas_kernels.m2rnn.mosaic_gpu.forward import forward

__all__ = ["DEFAULT_CHUNK_SIZE", "backward", "choose_chunk_size", "forward", "supports"]
