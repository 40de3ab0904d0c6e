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
    ~24 mantissa bits). The accumulator starts at zero; ``k_t v_tᵀ`` is added after.
  * Per chunk, q/k (C×64, the head's q/k group), v (C×16), f (C), keep (C) are copied
    GMEM→SMEM with TMA into one of two slots (the next chunk is prefetched while this one runs);
    ``y`` (C×16) is written to an SMEM slot and copied to GMEM once per chunk.
  * ``y_t = H_tᵀ q_t`` is a reduction over the 64 rows (across the 4 warps). ``y_reduction=
    "per_step"``: Mosaic's ``reduce_sum(axis=0)`` each step (shuffles, then an SMEM exchange and
    a warpgroup barrier). ``"warp_partials"``: each warp sums its 16 rows with shuffles and
    stores 16 partial sums to SMEM (inline Mosaic GPU code, no barrier); the 4 warps' partials
    are added once per chunk. ``y_t`` is off the dependency chain (``H_{t+1}`` does not need it).
  * Knobs for the GPU run: ``approx_tanh`` (``CompilerParams(approx_math=True)``: tanh.approx),
    ``unroll`` (steps per loop iteration), ``no_auto_barriers``
    (``CompilerParams(unsafe_no_auto_barriers=True)``: threads exchange data through SMEM only
    across explicit ``commit_smem`` barriers — the per-warp partials, TMA'd inputs/outputs —
    and h_smem is read and written by each thread at the same addresses).

Backward (``backward``; what lives where): grid ``(B, N)``, one warpgroup per CTA, chunks in
reverse. Per chunk: q/k/v/dy/f/keep and the chunk's checkpoint TMA'd to SMEM; the state every
4 steps recomputed into SMEM (``sub_s``, C/4 × 64×16 float32); per sub-chunk the 4 states in
registers; ``g`` (the state gradient) a WGMMA-layout register array; ``du Wᵀ`` a register-A
wgmma; dW a 64×64 wgmma accumulator fed from bf16 SMEM stacks of H_{t-1} and du (``xs_s``,
``ds_s``, written every step). Per-step outputs dq, dk (row sums), dv (column sums) and df
(total) go to SMEM blocks copied to GMEM once per chunk. Defaults (measured): Pallas stores
per step with Mosaic's automatic barriers, dv/df reduced across the 4 warps every step, dq/dk
per head in bf16 summed in XLA. Options (opt-in, see ``backward``): ``reductions="warp_sums"``
(inline per-warp sums in SMEM: ``dvp`` (4, C, 16), ``dfp`` (C, 4), float32 dq/dk rows (C, 64);
added once per chunk), ``qk_grad_sum="kernel"`` (float32 dq/dk blocks TMA reduce-added into
zero-initialised (B, S, L, 64) float32 ``jax.new_ref`` buffers), ``no_auto_barriers``,
``approx_tanh``.

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
