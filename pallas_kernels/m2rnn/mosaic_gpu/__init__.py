"""M²RNN forward and backward kernels in Pallas Mosaic GPU (Hopper: TMA + WGMMA, fixed layouts).

For the paper's shape family (K = 64, V = 16, bfloat16). Same ``forward`` signature as the
backend interface of ``m2rnn_jax.reference``; the checkpoints it returns (when asked) have the
layout of ``pallas_kernels.m2rnn.gpu.forward`` (``(B, S/C, Kp, N·Vp)`` float32, Kp = 64,
Vp = 16), so the Triton backward of ``gpu.py`` can consume them.

Tiling (what lives where):
  * Grid ``(B, N)``: one CTA of one warpgroup (128 threads) per (batch row, head). The CTA walks
    the whole sequence in chunks of ``C`` steps.
  * The state ``H`` (64×16 float32) is a register array in the WGMMA accumulator layout
    (8 values per thread). ``H W`` runs on the tensor core as ``wgmma m64n16k16`` with the A
    operand from registers: ``H`` is split into ``state_split`` bf16 parts (hi, lo[, lo2]) and
    float32 ``W`` likewise; the products of total order < ``state_split`` are accumulated in
    float32 (bf16 inputs: 2 parts of H, W exact: 2 wgmmas; float32 inputs: 3 and 3: 6 wgmmas,
    ~24 mantissa bits). ``f16_state`` (opt-in): one float16 part of H and float16 W, one wgmma
    — faster, less exact (see ``forward``). The accumulator starts at zero; ``k_t v_tᵀ`` is
    added after.
  * Per staging block (32 steps), q/k (the head's q/k group), v, f, keep are copied GMEM→SMEM
    with TMA into one of two slots (the next block is prefetched while this one runs); ``y``
    is written to an SMEM slot and copied to GMEM once per block; the state is saved every
    ``chunk_size`` steps when checkpoints are asked for.
  * ``y_t = H_tᵀ q_t`` is a reduction over the 64 rows (across the 4 warps). Default
    ``y_reduction="warp_scatter"``: each warp sums its 16 rows with a lane reduce-scatter
    (inline Mosaic GPU code: 4 shuffles, no barrier) into SMEM partials that the 4 warps add
    once per block, so ``y_t`` is off the dependency chain (``H_{t+1}`` does not need it);
    ``"warp_partials"``: the same with a full butterfly; ``"per_step"``: Mosaic's
    ``reduce_sum(axis=0)`` each step (an SMEM exchange and a warpgroup barrier per step).
  * Knobs for the GPU run: ``approx_tanh`` (``CompilerParams(approx_math=True)``: tanh.approx),
    ``unroll`` (steps per loop iteration), ``no_auto_barriers``
    (``CompilerParams(unsafe_no_auto_barriers=True)``).

Backward (``backward``; what lives where): grid ``(B, N)``, one warpgroup per CTA, chunks in
reverse. Per chunk: q/k/v/dy/f/keep and the chunk's checkpoint TMA'd to SMEM; the state every
4 steps recomputed into SMEM (``sub_s``, C/4 × 64×16 float32); per sub-chunk the 4 states in
registers; ``g`` (the state gradient) a WGMMA-layout register array; ``du Wᵀ`` a register-A
wgmma on bf16 hi/lo parts of ``du``; dW a 64×64 wgmma accumulator fed from bf16 SMEM stacks of
H_{t-1} and du (``xs_s``, ``ds_s``, written every step). Defaults (measured fastest, see
``backward``): per step each warp writes its dq/dk row sums (float32, warp-local), its dv column
partials (lane reduce-scatter) and its df total to SMEM without barriers; the 4 warps' partials
are added once per chunk; each chunk's float32 dq/dk are TMA reduce-added into zero-initialised
(B, S, L, 64) float32 ``jax.new_ref`` buffers shared by a q/k group's heads; no automatic
barriers; approx tanh in the recomputation. Options: ``reductions="per_step"``,
``qk_grad_sum="xla"``, ``scatter_sums=False``, ``f16_state``, ``f16_tanh``, ``hi_lo_split``.

Inputs are re-laid out in XLA first: q/k expanded to ``L = lcm(Nq, Nk)`` groups, v to N heads,
f transposed to ``(B, N, S)`` float32 (a 1-D TMA per head and chunk), W to bf16 hi/lo parts.

Test off the GPU with ``interpret=True`` (the Mosaic GPU interpreter). Its wgmma takes the A
operand only from SMEM and it cannot run inline Mosaic GPU code, so in interpret mode the products
are the same bf16 parts as a ``jnp.dot`` with float32 accumulation and y is reduced per step.
``jax.export`` for ``platforms=["cuda"]`` runs Mosaic GPU's layout inference and lowering on a
CPU-only machine (for sm_90) and so checks the real paths (``tests/test_kernel_mosaic_gpu.py``).

Modules: ``common`` (supported inputs, input layout, launch), ``warp_sums`` (inline per-warp
reductions), ``forward``, ``backward``.
"""

from pallas_kernels.m2rnn.mosaic_gpu.backward import SUBCHUNK, backward
from pallas_kernels.m2rnn.mosaic_gpu.common import (DEFAULT_CHUNK_SIZE, DEFAULT_STAGE_SIZE,
                                                    KEY_DIM, VALUE_DIM, _unsupported,
                                                    choose_chunk_size, supports)
from pallas_kernels.m2rnn.mosaic_gpu.forward import forward

__all__ = ["DEFAULT_CHUNK_SIZE", "DEFAULT_STAGE_SIZE", "KEY_DIM", "VALUE_DIM", "SUBCHUNK",
           "backward", "choose_chunk_size", "forward", "supports"]
