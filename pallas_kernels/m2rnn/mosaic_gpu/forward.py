"""The Mosaic GPU forward kernel (see the package docstring for what lives where)."""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from m2rnn_jax.heads import expand_heads
from pallas_kernels.m2rnn.mosaic_gpu.common import (_check_supported, _per_head_inputs, _launch,
                                                    _bf16_parts, _tanh, _products, state_splitter,
                                                    check_hi_lo_split, check_state_product,
                                                    check_mma_accumulators, MMA_SYNC_PRODUCTS,
                                                    mma_state_products, mma_weight_fragments,
                                                    mma_tf32_state_products, tf32_hi_lo,
                                                    wgmma_products_apart, DEFAULT_CHUNK_SIZE,
                                                    DEFAULT_STAGE_SIZE, KEY_DIM, VALUE_DIM, _F32,
                                                    _BF16, _F16)
from pallas_kernels.m2rnn.mosaic_gpu.warp_sums import (_store_warp_partial_products,
                                                       _store_warp_partial_sums)

def _kernel(*refs, chunk, num_chunks, ckpt_every, heads_per_group, state_parts, weight_parts,
            has_keep, save_checkpoints, unroll, y_reduction, interpret, heads_per_cta=1,
            acc_init="zero", f16_state=False, f16_tanh=False, hi_lo_split="bits",
            state_product="wgmma", mma_accumulators=1):
    q_ref, k_ref, v_ref, f_ref, w_ref, h0_ref, *rest = refs
    mma_sync = state_product in MMA_SYNC_PRODUCTS
    tf32 = state_product == "mma_sync_tf32"
    w_frag_ref = rest.pop(0) if mma_sync else None
    keep_ref = rest.pop(0) if has_keep else None
    y_ref, h_final_ref, *rest = rest
    ckpt_ref = rest.pop(0) if save_checkpoints else None
    (q_smem, k_smem, v_smem, f_smem, keep_smem, y_smem, part_smem, w_smem, h_smem,
     in_barriers, w_barrier, *more_heads) = rest
    w_frag_smem = more_heads.pop(0) if mma_sync else None
    # Per head of the CTA: its v, f, y, per-warp y, W and state buffers (head 0: the ones above;
    # ``heads_per_cta`` > 1 appends six per further head).
    per_head = [(v_smem, f_smem, y_smem, part_smem, w_smem, h_smem)] + [
        tuple(more_heads[6 * i:6 * i + 6]) for i in range(heads_per_cta - 1)]
    v_bufs, f_bufs, y_bufs, part_bufs, w_bufs, h_bufs = (list(x) for x in zip(*per_head))
    warp_partials = y_reduction != "per_step"
    fused_hq = y_reduction == "warp_scatter_fma"
    if warp_partials:
        scatter = y_reduction in ("warp_scatter", "warp_scatter_fma")
        if fused_hq:  # H ⊙ q inside the inline code: (H, q broadcast, partials)
            store_partials = plgpu.inline_mgpu(
                arg_types=(plgpu.Layout.WGMMA, plgpu.Layout.WGMMA, plgpu.RefType()))(
                functools.partial(_store_warp_partial_products, scatter=scatter))
        else:
            store_partials = plgpu.inline_mgpu(
                arg_types=(plgpu.Layout.WGMMA, plgpu.RefType()))(
                functools.partial(_store_warp_partial_sums, scatter=scatter))

    split_state = tf32_hi_lo if tf32 else state_splitter(state_parts, f16_state, hi_lo_split,
                                                          interpret)
    b = lax.axis_index("b")
    n = lax.axis_index("n")
    if heads_per_cta == 1:
        heads = [n]
    else:
        heads = [n * heads_per_cta + i for i in range(heads_per_cta)]
    g = lax.div(heads[0], jnp.int32(heads_per_group))  # the CTA's heads share one q/k group
    wgmma_layout = plgpu.Layout.WGMMA
    row_layout = plgpu.Layout.WGMMA.reduce(1)   # (64,): one value per row of H
    col_layout = plgpu.Layout.WGMMA.reduce(0)   # (16,): one value per column of H

    def start_chunk_copies(c, slot):
        steps = pl.ds(c * chunk, chunk)
        barrier = in_barriers.at[slot]
        plgpu.copy_gmem_to_smem(q_ref.at[b, steps, g], q_smem.at[slot], barrier)
        plgpu.copy_gmem_to_smem(k_ref.at[b, steps, g], k_smem.at[slot], barrier)
        for hh, head in enumerate(heads):
            plgpu.copy_gmem_to_smem(v_ref.at[b, steps, head], v_bufs[hh].at[slot], barrier)
            plgpu.copy_gmem_to_smem(f_ref.at[b, head, steps], f_bufs[hh].at[slot], barrier)
        if has_keep:
            plgpu.copy_gmem_to_smem(keep_ref.at[b, steps], keep_smem.at[slot], barrier)

    # W (bf16 parts) and h0 once per CTA; the first chunk's inputs.
    for hh, head in enumerate(heads):
        plgpu.copy_gmem_to_smem(w_ref.at[head], w_bufs[hh], w_barrier)
        plgpu.copy_gmem_to_smem(h0_ref.at[b, head], h_bufs[hh], w_barrier)
    if mma_sync:
        plgpu.copy_gmem_to_smem(w_frag_ref.at[heads[0]], w_frag_smem, w_barrier)
    start_chunk_copies(0, 0)
    plgpu.barrier_wait(w_barrier)
    hs = tuple(plgpu.load(h_bufs[hh], layout=wgmma_layout, optimized=False)
               for hh in range(heads_per_cta))
    if mma_sync and not interpret:
        # W's mma.sync B fragments: loop-invariant registers (4 per thread; 8 for tf32).
        w_frag = plgpu.load(w_frag_smem, layout=wgmma_layout, optimized=False)
        if tf32:
            products_by_tf32 = mma_tf32_state_products(mma_accumulators)
        else:
            w_frag = w_frag.astype(_BF16)
            products_by_mma = mma_state_products(hi_lo_split)

    def step(t, hs, slot):
        k_t = plgpu.load(k_smem.at[slot, t], layout=row_layout, optimized=False).astype(_F32)
        vs = [plgpu.load(v_bufs[hh].at[slot, t], layout=col_layout,
                         optimized=False).astype(_F32) for hh in range(heads_per_cta)]
        q_t = plgpu.load(q_smem.at[slot, t], layout=row_layout, optimized=False).astype(_F32)
        fs = [f_bufs[hh][slot, t] for hh in range(heads_per_cta)]
        if has_keep:
            keep_t = keep_smem[slot, t]
            hs = [h * keep_t for h in hs]
        k_b = lax.broadcast_in_dim(k_t, (KEY_DIM, VALUE_DIM), [0])
        kvs = [k_b * lax.broadcast_in_dim(v_t, (KEY_DIM, VALUE_DIM), [1]) for v_t in vs]
        pairs = []  # per head: the (bf16 state part, weight part) products
        for h in ([] if mma_sync and not interpret else hs):
            h_parts = split_state(h)
            pairs.append([(h_parts[i], j) for i, j in _products(state_parts, weight_parts)])
        if interpret:
            # The interpreter's wgmma takes the A operand only from SMEM: the same bf16
            # products with float32 accumulation, as a dot.
            us = [sum(jnp.dot(a, w_bufs[hh][p], preferred_element_type=_F32)
                      for a, p in pairs[hh]) + kvs[hh] for hh in range(heads_per_cta)]
        elif tf32:
            us = [products_by_tf32(*tf32_hi_lo(hs[0]), w_frag, kvs[0])]
        elif mma_sync:
            us = [products_by_mma(hs[0], w_frag, kvs[0])]
        elif acc_init == "kv":
            # The accumulators start at k vᵀ: no zero-initialised registers, no add after.
            def products(acc_refs):
                for hh, acc_ref in enumerate(acc_refs):
                    for a, p in pairs[hh]:
                        plgpu.wgmma(acc_ref, a, w_bufs[hh].at[p])

            us = list(pl.run_state(products)(tuple(plgpu.ACC.init(kv) for kv in kvs)))
        elif acc_init == "per_part":
            # One zero-initialised accumulator per (head, state part): a step's wgmmas are
            # independent instead of chained through one accumulator; their sum is added after.
            flat = [(hh, a, p) for hh in range(heads_per_cta) for a, p in pairs[hh]]
            parts = wgmma_products_apart([(a, w_bufs[hh], p) for hh, a, p in flat])
            us = list(kvs)
            for (hh, _, _), part in zip(flat, parts):
                us[hh] = us[hh] + part
        else:
            def products(*acc_refs):  # zero-initialised accumulators
                for hh, acc_ref in enumerate(acc_refs):
                    for a, p in pairs[hh]:
                        plgpu.wgmma(acc_ref, a, w_bufs[hh].at[p])
                return tuple(acc_ref[...] for acc_ref in acc_refs)  # waits for the WGMMAs

            hws = pl.run_scoped(products, *[plgpu.ACC((KEY_DIM, VALUE_DIM), _F32)
                                            for _ in range(heads_per_cta)])
            us = [hw + kv for hw, kv in zip(hws, kvs)]
        out = []
        for hh, (h, u, f_t) in enumerate(zip(hs, us, fs)):
            z = _tanh(u, f16_tanh)
            h = z + f_t * (h - z)
            q_b = lax.broadcast_in_dim(q_t, (KEY_DIM, VALUE_DIM), [0])
            if fused_hq:
                store_partials(h, q_b, part_bufs[hh].at[:, t])
            elif warp_partials:
                store_partials(h * q_b, part_bufs[hh].at[:, t])  # summed over the warps per chunk
            else:
                hq = h * q_b
                y_bufs[hh][slot, t] = jnp.sum(hq, axis=0).astype(y_bufs[hh].dtype)
            out.append(h)
        return tuple(out)

    def chunk_body(c, hs):
        slot = lax.rem(c, 2)
        if save_checkpoints:
            # The state every ``ckpt_every`` staging blocks (the checkpoint interval), through
            # SMEM to (B, S/C_ckpt, Kp, N·Vp).
            @pl.when(lax.rem(c, ckpt_every) == 0)
            def _():
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                for hh in range(heads_per_cta):
                    h_bufs[hh][...] = hs[hh]
                plgpu.commit_smem()
                for hh, head in enumerate(heads):
                    plgpu.copy_smem_to_gmem(
                        h_bufs[hh], ckpt_ref.at[b, lax.div(c, ckpt_every), :,
                                                pl.ds(head * VALUE_DIM, VALUE_DIM)])
        # Every thread is past its reads of the other slot (the last chunk): prefetch into it.
        plgpu.commit_smem()

        @pl.when(c + 1 < num_chunks)
        def _():
            start_chunk_copies(c + 1, 1 - slot)

        plgpu.barrier_wait(in_barriers.at[slot])
        # The y slot written two chunks ago must have been read by its copy to GMEM.
        plgpu.wait_smem_to_gmem(heads_per_cta, wait_read_only=True)
        def steps(i, hs):
            for j in range(unroll):
                hs = step(i * unroll + j, hs, slot)
            return hs

        hs = lax.fori_loop(0, chunk // unroll, steps, hs)
        if warp_partials:
            plgpu.commit_smem()  # every warp's partial sums are written
            for hh in range(heads_per_cta):
                part = part_bufs[hh]
                y_bufs[hh][slot] = (part[0] + part[1] + part[2] + part[3]).astype(
                    y_bufs[hh].dtype)
        plgpu.commit_smem()
        for hh, head in enumerate(heads):
            plgpu.copy_smem_to_gmem(y_bufs[hh].at[slot],
                                    y_ref.at[b, pl.ds(c * chunk, chunk), head])
        return hs

    hs = lax.fori_loop(0, num_chunks, chunk_body, hs)
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)
    for hh in range(heads_per_cta):
        h_bufs[hh][...] = hs[hh]
    plgpu.commit_smem()
    for hh, head in enumerate(heads):
        plgpu.copy_smem_to_gmem(h_bufs[hh], h_final_ref.at[b, head])
    plgpu.wait_smem_to_gmem(0)


Y_REDUCTIONS = ("per_step", "warp_partials", "warp_scatter", "warp_scatter_fma")


def forward(q, k, v, w, f, h0, keep, *, chunk_size=DEFAULT_CHUNK_SIZE, save_checkpoints=True,
            stage_size=DEFAULT_STAGE_SIZE, approx_tanh=True, state_split=None, unroll=1,
            no_auto_barriers=False, y_reduction="warp_scatter", heads_per_cta=1,
            acc_init="zero", f16_state=False, f16_tanh=False, hi_lo_split="bits",
            state_product="wgmma", mma_accumulators=1, interpret=None):
    """The backend-interface forward: ``(y (B,S,N,V), h_final (B,N,K,V) f32, checkpoints)``.

    ``checkpoints`` is ``(B, S/C, 64, N·16)`` float32 (the state at each chunk start, the layout
    of ``gpu.forward``) or ``None``. ``interpret``: run the Mosaic GPU interpreter (default: when
    JAX's default backend is not a GPU).

    ``chunk_size`` is the op's checkpoint interval (the backward consumes one state per
    ``chunk_size`` steps); ``stage_size`` is the SMEM staging block of the inputs and y (32:
    measured faster than 64). When ``chunk_size`` is a multiple of ``stage_size`` the kernel stages
    ``stage_size`` steps and saves the state every ``chunk_size / stage_size`` blocks; otherwise it
    stages ``chunk_size`` steps.

    Defaults (H200, 2026-11-30, 8×4096×84 bf16, median of 10; ``benchmarks/mosaic_check.py``,
    RESULTS.md): ``H W`` on bf16 hi/lo parts of ``H`` (``state_split=2``, ≈ 17 significant
    bits) made by integer operations (``hi_lo_split="bits"``: hi = ``H`` rounded to its upper
    16 bits by an integer add, packed by one ``prmt`` per pair, lo = the rest converted: one
    conversion per pair instead of two): 2.91 → 2.60 ms, the same values as the conversions'
    split but at ties (the same errors against the scan),
    ``y_reduction="warp_scatter"`` (each warp sums its 16 rows of ``H_t ⊙ q_t`` with a lane
    reduce-scatter, 4 shuffles per step instead of 12, into SMEM partials the 4 warps add once
    per staging block: 3.10 → 2.81 ms; ``"warp_partials"``: full butterflies; ``"per_step"``:
    Mosaic's cross-warp reduction every step, 4.41 ms), ``approx_tanh`` (``tanh.approx.f32``,
    relative error ~2⁻¹¹; exact tanh 5.35 ms).

    * ``f16_state`` (opt-in, faster, less exact): ``H W`` as one wgmma on float16 ``H`` (11
      significant bits) and float16 ``W``: 2.81 → 2.25 ms (fwd+bwd with the backward's
      ``f16_state`` 13.4 → 10.6 ms). y vs the scan 8.0e-4 instead of 1.5e-4 for a contracting
      recurrence (W ~ 0.3·N(0, 1), S = 256 and 2048), but where the recurrence amplifies
      perturbations (W ~ 0.6·N(0, 1), no clipping) gradients differ from the scan by 0.1–0.2
      (hi/lo parts: 4e-3). ``|H|`` stays ≤ max(|H_0|, 1) under the gated tanh update, so
      float16's range holds for ``|H_0|`` < 65504. Needs ``state_split`` 1 (the default then).

    Options measured without gain (kept opt-in for the record, RESULTS "Mosaic GPU variants"):

    * ``heads_per_cta=2``: two heads of one q/k group per CTA as two interleaved state chains
      (grid ``(B, N/2)``; needs ``N / L`` even): 3.01 vs 3.06 ms.
    * ``acc_init="kv"``: the wgmma accumulator starts at ``k_t v_tᵀ``: 3.25 vs 3.06 ms.

    Prepared, not yet measured: ``acc_init="per_part"``, each bf16 state part's product in its
    own zero-initialised accumulator (two independent wgmmas per step instead of two chained
    through one accumulator, then two adds), in case the chained accumulation serialises them.
    * ``hi_lo_split="cvt"``: the hi/lo parts by two conversions, the default until the bit
      split was measured: 2.91 vs 2.60 ms (the bit split with a truncated hi, one bit less:
      3.12 vs 2.58 ms in another call, but errors up to 4× larger where the recurrence
      amplifies them).
    * ``hi_lo_split="bits_lo"``: lo rounded by the integer add too (no conversion in the
      split): 3.27 vs 2.70 ms (fifth session: the integer pipe saturates instead).
    * ``y_reduction="warp_scatter_fma"``: ``H ⊙ q`` fused into the sum of each lane's two rows
      (one multiply and one FMA per register pair instead of two multiplies and an add):
      2.76 vs 2.70 ms.
    * ``state_product="mma_sync"``: ``H W`` by warp-level ``mma.sync.m16n8k16`` (four per warp
      per step on the same bf16 hi/lo parts, W's B fragments held in registers) instead of two
      register-A wgmmas: each warp's 16 rows go on without the warpgroup's rendezvous. Needs
      ``heads_per_cta=1``, ``acc_init="zero"``, the bit split. Interpret mode computes the same
      products as a dot.
    * ``state_product="mma_sync_tf32"``: ``H W`` by ``mma.sync.m16n8k8`` on tf32 hi/lo parts
      of ``H`` (``common.tf32_hi_lo``: hi = ``H`` with its low 13 bits cleared by one ``and``,
      lo = the rest; ≥ 21 significant bits against ≈ 17, and no conversion instruction, whose
      pipe limited the bf16 split) — eight mma.sync per warp per step; the A fragments are
      ``H``'s own registers (W's rows permuted to match). Same restrictions as "mma_sync".
      ``mma_accumulators=2``: one accumulator per k block (two chains two mmas deep, added
      after) instead of one chain of four. Measured slower (tenth session, interleaved in
      one call): forward +14 %, fwd+bwd +28–37 % against the default.
    * ``f16_tanh``: ``tanh.approx.f16x2`` on float16 pairs (half the MUFU ops, more
      conversions; needs ``approx_tanh``): 3.19 vs 3.14 ms, and 2.40 vs 2.25 ms with f16_state.
    """
    _check_supported(q, k, v, w, f, h0, keep, chunk_size)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    batch, seq_len = q.shape[:2]
    num_heads = h0.shape[1]
    dtype = v.dtype
    groups, qg, kg, vn, fn = _per_head_inputs(q, k, v, f, num_heads)
    if not isinstance(stage_size, int) or stage_size < 8 or stage_size % 8:
        raise ValueError(f"stage_size must be a positive multiple of 8, got {stage_size!r}")
    stage = stage_size if chunk_size % stage_size == 0 else chunk_size
    if not isinstance(unroll, int) or unroll < 1 or stage % unroll:
        raise ValueError(f"unroll must be a positive divisor of chunk_size, got {unroll!r}")
    if y_reduction not in Y_REDUCTIONS:
        raise ValueError(f"y_reduction must be one of {Y_REDUCTIONS}, got {y_reduction!r}")
    if heads_per_cta not in (1, 2):
        raise ValueError(f"heads_per_cta must be 1 or 2, got {heads_per_cta!r}")
    if (num_heads // groups) % heads_per_cta:
        raise ValueError(f"heads_per_cta={heads_per_cta} needs the heads per q/k group "
                         f"({num_heads // groups}) to be a multiple of it")
    if acc_init not in ("zero", "kv", "per_part"):
        raise ValueError(f"acc_init must be 'zero', 'kv' or 'per_part', got {acc_init!r}")
    # The interpreter cannot run inline Mosaic GPU code: it reduces per step.
    if interpret:
        y_reduction = "per_step"
    if state_split is None:
        state_split = 1 if f16_state else (3 if jnp.dtype(dtype) == jnp.float32 else 2)
    if f16_state and (state_split != 1 or jnp.dtype(w.dtype) != jnp.bfloat16):
        raise ValueError("f16_state needs state_split=1 and bfloat16 W")
    if f16_tanh and not approx_tanh:
        raise ValueError("f16_tanh needs approx_tanh (tanh.approx.f16x2)")
    check_hi_lo_split(hi_lo_split)
    if state_split not in (1, 2, 3):
        raise ValueError(f"state_split must be 1, 2 or 3, got {state_split!r}")
    # bfloat16 W is exact in one part; float32 W in as many parts as the state.
    weight_parts = 1 if jnp.dtype(w.dtype) == jnp.bfloat16 else state_split
    check_state_product(state_product, state_split, weight_parts, f16_state, hi_lo_split)
    mma_sync = state_product in MMA_SYNC_PRODUCTS
    if mma_sync and (heads_per_cta != 1 or acc_init != "zero"):
        raise ValueError(f"state_product={state_product!r} needs heads_per_cta=1 and "
                         f"acc_init='zero'")
    check_mma_accumulators(mma_accumulators, state_product)
    w_heads = expand_heads(w, num_heads, axis=0)
    w_parts = (w_heads.astype(_F16)[:, None] if f16_state
               else jnp.stack(_bf16_parts(w_heads, weight_parts), axis=1))
    num_chunks = seq_len // stage
    has_keep = keep is not None

    inputs = [qg, kg, vn, fn, w_parts, h0.astype(_F32)]
    if mma_sync:
        inputs.append(mma_weight_fragments(w_heads))
    if has_keep:
        inputs.append(keep.astype(_F32))
    out_type = [jax.ShapeDtypeStruct((batch, seq_len, num_heads, VALUE_DIM), dtype),
                jax.ShapeDtypeStruct((batch, num_heads, KEY_DIM, VALUE_DIM), _F32)]
    if save_checkpoints:
        out_type.append(jax.ShapeDtypeStruct(
            (batch, seq_len // chunk_size, KEY_DIM, num_heads * VALUE_DIM), _F32))

    w_transforms = (plgpu.TilingTransform((8, VALUE_DIM)), plgpu.SwizzleTransform(32))
    scratch = [
        plgpu.SMEM((2, stage, KEY_DIM), dtype),             # q
        plgpu.SMEM((2, stage, KEY_DIM), dtype),             # k
        plgpu.SMEM((2, stage, VALUE_DIM), dtype),           # v
        plgpu.SMEM((2, stage), _F32),                       # f
        plgpu.SMEM((2, stage), _F32),                       # keep (unused without keep)
        plgpu.SMEM((2, stage, VALUE_DIM), dtype),           # y
        plgpu.SMEM((4, stage if y_reduction != "per_step" else 1, VALUE_DIM), _F32),  # per-warp y
        plgpu.SMEM((weight_parts, VALUE_DIM, VALUE_DIM), w_parts.dtype, transforms=w_transforms),
        plgpu.SMEM((KEY_DIM, VALUE_DIM), _F32),                  # h0 / checkpoints / final
        # One arrival per TMA copy that signals the barrier.
        plgpu.Barrier(num_barriers=2,
                      num_arrivals=(5 if has_keep else 4) + 2 * (heads_per_cta - 1)),
        plgpu.Barrier(num_arrivals=2 * heads_per_cta + mma_sync),
    ]
    if mma_sync:
        scratch.append(plgpu.SMEM((KEY_DIM, VALUE_DIM), _F32))  # W's mma.sync fragments
    for _ in range(heads_per_cta - 1):  # the further heads' v, f, y, per-warp y, W, state
        scratch += [scratch[2], scratch[3], scratch[5], scratch[6], scratch[7], scratch[8]]
    kernel = functools.partial(
        _kernel, chunk=stage, num_chunks=num_chunks, ckpt_every=chunk_size // stage,
        heads_per_group=num_heads // groups, state_parts=state_split,
        weight_parts=weight_parts, has_keep=has_keep, unroll=unroll,
        y_reduction=y_reduction, f16_state=f16_state, f16_tanh=f16_tanh, hi_lo_split=hi_lo_split,
        save_checkpoints=save_checkpoints, interpret=bool(interpret),
        **({"heads_per_cta": heads_per_cta} if heads_per_cta != 1 else {}),
        **({"acc_init": acc_init} if acc_init != "zero" else {}),
        **({"state_product": state_product} if mma_sync else {}),
        **({"mma_accumulators": mma_accumulators} if mma_accumulators != 1 else {}))
    outs = _launch(kernel, out_type, scratch, (batch, num_heads // heads_per_cta), approx_tanh,
                   no_auto_barriers, interpret, "m2rnn_forward_mosaic")(*inputs)
    y, h_final = outs[0], outs[1]
    checkpoints = outs[2] if save_checkpoints else None
    return y, h_final, checkpoints
