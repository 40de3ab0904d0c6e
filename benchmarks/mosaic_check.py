"""Checks the Mosaic GPU forward and backward on the GPU against the scan, then times them.

Run from the repository root on a machine with an H100/H200 (one run, a few minutes):

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/mosaic_check.py [--all] [--only SUBSTR]

1. Correctness, bfloat16, B=2, S=256, N=4 (Nq=Nk=1, K=64, V=16, random initial state, resets,
   gradient clipping c=1): the scan (``m2rnn_jax.reference``) on the same bf16 inputs against
   Mosaic forward + Mosaic backward variants (``_variants``: the default — chunk 32, dq/dk
   summed over a group's heads by TMA reduce-add in the kernel, no per-step cross-warp
   exchange, no automatic barriers, approx tanh —, the first measured path, chunk 64); with
   ``--all`` also the Triton backward;
   relative error of y, h_final and every gradient (want < 1e-2).
   Before those, the opt-in forward variants (``FWD_OPTIONS``: ``heads_per_cta=2`` = two heads
   per CTA as two interleaved state chains, ``acc_init="kv"`` = wgmma accumulator initialised
   with k vᵀ) against the scan's forward (y, h_final, checkpoints).
2. Timings, bf16, no initial state, median of 10 after 3 warm-ups (``benchmarks/timing.py``), at
   8×4096×84 and 4×4096×132: forward (Triton; Mosaic approx tanh + warp partials, and the
   ``FWD_OPTIONS`` variants) and forward+backward variants, with the extra memory of the compiled fwd+bwd
   (``memory_analysis()``: temp + output − alias). Each variant runs in its own try/except.
"""

import functools
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import interleaved_medians, median_seconds  # noqa: E402  (benchmarks/ on sys.path)

from m2rnn_jax import reference  # noqa: E402
from pallas_kernels.m2rnn import gpu, mosaic_gpu  # noqa: E402

SHAPES = [(8, 4096, 84), (4, 4096, 132)]
FAST_FWD = {}  # the forward's defaults (hi/lo state parts split by bit operations, lane
#               reduce-scatter y partials, approx tanh)
# Forward options (mosaic_gpu.forward keywords) of the named forward variants, on top of the
# defaults. Measured 2026-11-30 (8×4096×84), with the hi/lo split by conversions as the base:
# base 2.81–3.12 ms; hi/lo split by bit operations (now the default) 2.60 vs 2.91 (same call);
# f16_state 2.25; butterfly (an earlier default) 3.10; f16_state_tanh 2.40. With the butterfly
# path as the base: heads2 3.01 vs 3.06 ms, acc_kv 3.25, heads2_acc_kv 3.11, + nab 3.09.
F16 = {"f16_state": True}
BUTTERFLY = {"y_reduction": "warp_partials"}
HI_LO_CVT = {"hi_lo_split": "cvt"}  # the default until 2026-11-30's measurement
BITS_LO = {"hi_lo_split": "bits_lo"}  # lo rounded by an integer add too (no conversion)
FMA_Y = {"y_reduction": "warp_scatter_fma"}  # H ⊙ q fused into the y partials' row sums
MMA_SYNC = {"state_product": "mma_sync"}  # H W (and du Wᵀ) by warp-level mma.sync
# The same on tf32 hi/lo parts (m16n8k8; tenth session, under contention: fwd +14 %, fwd+bwd
# +28-37 % against the default in the same call).
MMA_TF32 = {"state_product": "mma_sync_tf32"}
MMA_TF32_2ACC = {**MMA_TF32, "mma_accumulators": 2}  # one chain per k block, added after
FWD_OPTIONS = {
    "mma_sync": MMA_SYNC,
    "mma_sync_tf32": MMA_TF32,
    "mma_sync_tf32_2acc": MMA_TF32_2ACC,
    "hi_lo_cvt": HI_LO_CVT,
    "bits_lo": BITS_LO,
    "fma_y": FMA_Y,
    "bits_lo_fma_y": {**BITS_LO, **FMA_Y},
    "f16_state": F16,
    "butterfly": BUTTERFLY,
    "f16_state_tanh": {"f16_state": True, "f16_tanh": True},
    "heads2": {"heads_per_cta": 2},
    "acc_kv": {"acc_init": "kv"},
    "acc_per_part": {"acc_init": "per_part"},  # hi·W and lo·W in separate accumulators
    "heads2_acc_kv": {"heads_per_cta": 2, "acc_init": "kv"},
    "heads2_acc_kv_nab": {"heads_per_cta": 2, "acc_init": "kv", "no_auto_barriers": True},
}
NAMES = ("dq", "dk", "dv", "dw", "df", "dh0")


def _relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return f"shape {got.shape} != {want.shape}"
    if not np.all(np.isfinite(got)):
        return "non-finite"
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def _inputs(seed, batch, seq_len, heads, *, random_state):
    dtype = jnp.bfloat16
    ks = jax.random.split(jax.random.PRNGKey(seed), 8)
    q = jax.random.normal(ks[0], (batch, seq_len, 1, 64), dtype)
    k = (0.5 * jax.random.normal(ks[1], (batch, seq_len, 1, 64))).astype(dtype)
    v = jax.random.normal(ks[2], (batch, seq_len, heads, 16), dtype)
    w = (0.3 * jax.random.normal(ks[3], (heads, 16, 16))).astype(dtype)
    f = jax.random.uniform(ks[4], (batch, seq_len, heads), dtype, 0.05, 0.95)
    h0 = (jax.random.normal(ks[5], (batch, heads, 64, 16)) if random_state
          else jnp.zeros((batch, heads, 64, 16)))
    dy = jax.random.normal(ks[6], (batch, seq_len, heads, 16), dtype)
    dh = jax.random.normal(ks[7], (batch, heads, 64, 16)) if random_state else jnp.zeros(
        (batch, heads, 64, 16))
    return (q, k, v, w, f, h0), dy, dh


def _fwd_bwd(fwd, bwd, chunk, clip):
    def run(args, keep, dy, dh):
        y, h_final, ckpt = fwd(*args, keep, chunk_size=chunk, save_checkpoints=True)
        grads = bwd(*args, keep, ckpt, dy, dh, gradient_clipping=clip, chunk_size=chunk)
        return y, h_final, grads
    return run


# Backward options (mosaic_gpu.backward keywords) of the named variants, and the forward's
# options where they differ from its defaults (the backward recomputes the forward's states the
# same way); {} = the defaults (hi/lo states split by bit operations, reduce-scatter dv sums,
# warp sums, in-kernel dq/dk sums, no automatic barriers, approx tanh: 12.0 ms, 0.56 GiB at
# 8×4096×84 on 2026-11-30; hi/lo by conversions 13.2 ms; f16 10.6 ms; KERNEL_NOTES run 7 has the
# earlier combinations).
PREVIOUS = {"reductions": "per_step", "qk_grad_sum": "xla", "approx_tanh": False,
            "scatter_sums": False}
BWD_OPTIONS = {
    "c32": (32, {}),                                                    # the default
    "c32_f16": (32, F16, F16),
    "c32_mma_sync": (32, MMA_SYNC, MMA_SYNC),
    "c32_mma_sync_tf32": (32, MMA_TF32, MMA_TF32),
    "c32_mma_sync_tf32_2acc": (32, MMA_TF32_2ACC, MMA_TF32_2ACC),
    "c32_hi_lo_cvt": (32, HI_LO_CVT, HI_LO_CVT),
    "c32_bits_lo": (32, BITS_LO, BITS_LO),
    "c32_bits_lo_fma_y": (32, BITS_LO, {**BITS_LO, **FMA_Y}),
    "c32_butterfly": (32, {"scatter_sums": False}, BUTTERFLY),
    "c32_previous": (32, PREVIOUS, BUTTERFLY),    # the first measured path (21.6 ms)
    "c64": (64, {}),
    # hi·W and lo·W (and du's parts · Wᵀ) in separate accumulators, forward and backward
    # (ninth session: 12.29 against 11.92 ms at 8×4096×84).
    "c32_acc_per_part": (32, {"acc_per_part": True}, {"acc_init": "per_part"}),
}
ARGS = None  # the parsed command line (main)


def _variants():
    out = {}
    for name, (chunk, options, *fwd_options) in BWD_OPTIONS.items():
        mosaic_fwd = functools.partial(mosaic_gpu.forward,
                                       **{**FAST_FWD, **(fwd_options[0] if fwd_options else {})})
        out[f"mosaic_fwd+mosaic_bwd_{name}"] = _fwd_bwd(
            mosaic_fwd, functools.partial(mosaic_gpu.backward, **options), chunk, 1.0)
    mosaic_fwd = functools.partial(mosaic_gpu.forward, **FAST_FWD)
    if ARGS is not None and ARGS.all:
        out.update({
            "mosaic_fwd+triton_bwd_c64": _fwd_bwd(mosaic_fwd, gpu.backward, 64, 1.0),
            "triton_fwd+triton_bwd_c64": _fwd_bwd(gpu.forward, gpu.backward, 64, 1.0),
        })
    if ARGS is not None and ARGS.only:
        keep = set(ARGS.only.split(","))
        unknown = keep - set(BWD_OPTIONS)
        if unknown:
            raise SystemExit(f"--only: unknown backward variants {sorted(unknown)}; known: "
                             f"{list(BWD_OPTIONS)}")
        out = {name: fn for name, fn in out.items()
               if name.rsplit("mosaic_bwd_", 1)[-1] in keep}
    return out


def _forward_options():
    """FWD_OPTIONS, or those named by ``--fwd``."""
    if ARGS is None or ARGS.fwd is None:
        return FWD_OPTIONS
    names = [n for n in ARGS.fwd.split(",") if n]
    unknown = set(names) - set(FWD_OPTIONS)
    if unknown:
        raise SystemExit(f"--fwd: unknown forward options {sorted(unknown)}; known: {list(FWD_OPTIONS)}")
    return {n: FWD_OPTIONS[n] for n in names}


def _report(label, errs):
    """One correctness line: each relative error (or why there is none), pass = all < 1e-2."""
    ok = all(isinstance(e, float) and e < 1e-2 for e in errs.values())
    shown = {n: (f"{e:.1e}" if isinstance(e, float) else e) for n, e in errs.items()}
    print(f"correctness bf16 {label} {shown} pass={ok}", flush=True)


def check_forward_variants(args, keep):
    """The opt-in forward variants (FWD_OPTIONS) against the scan: y, h_final, checkpoints."""
    want = jax.jit(functools.partial(reference.forward, chunk_size=64))(*args, keep)
    for name, options in _forward_options().items():
        try:
            fn = jax.jit(functools.partial(mosaic_gpu.forward, chunk_size=64,
                                           **{**FAST_FWD, **options}))
            y, h_final, ckpt = fn(*args, keep)
            want_ckpt = jnp.transpose(want[2], (1, 0, 3, 2, 4)).reshape(ckpt.shape)
            _report(f"fwd mosaic_{name:24s}", {
                "y": _relative_error(y, want[0]), "h_final": _relative_error(h_final, want[1]),
                "ckpt": _relative_error(ckpt, want_ckpt)})
        except Exception:  # noqa: BLE001 - report and go on
            print(f"correctness bf16 fwd mosaic_{name} FAILED:", flush=True)
            traceback.print_exc()


CHECK_SHAPE = (2, 256, 4)


def check_correctness():
    batch, seq_len, heads = CHECK_SHAPE
    keep = jnp.ones((batch, seq_len)).at[0, seq_len // 6].set(0.0)
    keep = keep.at[batch - 1, seq_len * 3 // 4].set(0.0)
    args, dy, dh = _inputs(0, batch, seq_len, heads, random_state=True)
    check_forward_variants(args, keep)
    ref = jax.jit(_fwd_bwd(reference.forward, reference.backward, 64, 1.0))
    y_ref, hf_ref, g_ref = ref(args, keep, dy, dh)
    for name, fn in _variants().items():
        if name.startswith("triton_fwd"):
            continue
        try:
            y, h_final, grads = jax.jit(fn)(args, keep, dy, dh)
            errs = {"y": _relative_error(y, y_ref), "h_final": _relative_error(h_final, hf_ref)}
            errs.update({n: _relative_error(g, w) for n, g, w in zip(NAMES, grads, g_ref)})
            _report(f"{name:34s}", errs)
        except Exception:  # noqa: BLE001 - report and go on
            print(f"correctness bf16 {name} FAILED:", flush=True)
            traceback.print_exc()


def _extra_memory(jitted, *args):
    try:
        m = jitted.lower(*args).compile().memory_analysis()
        extra = m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        return f"{extra / 2**30:.2f}"
    except Exception as err:  # noqa: BLE001
        return f"? ({type(err).__name__})"


def time_all():
    rows = []
    for batch, seq_len, heads in SHAPES:
        shape = f"{batch}x{seq_len}x{heads}"
        args, dy, dh = _inputs(1, batch, seq_len, heads, random_state=False)
        forwards = {
            "fwd triton_c64": functools.partial(gpu.forward, chunk_size=64,
                                                save_checkpoints=False),
            "fwd mosaic_approx_warppart": functools.partial(
                mosaic_gpu.forward, chunk_size=64, save_checkpoints=False, **FAST_FWD),
            "fwd mosaic_approx_warppart_ckpt64": functools.partial(
                mosaic_gpu.forward, chunk_size=64, save_checkpoints=True, **FAST_FWD),
        }
        for fname, options in _forward_options().items():
            forwards[f"fwd mosaic_approx_warppart_{fname}"] = functools.partial(
                mosaic_gpu.forward, chunk_size=64, save_checkpoints=False,
                **{**FAST_FWD, **options})
        if ARGS is not None and ARGS.skip_forward:
            forwards = {}
        # Compile every variant first, then time them interleaved (timing.interleaved_medians):
        # one forward timed alone moved by up to 0.5 ms between calls (ninth session).
        compiled = {}  # row name -> (jitted, args, compile seconds, extra GiB)
        for name, fn in forwards.items():
            _compile(compiled, rows, shape, name, jax.jit(lambda a, fn=fn: fn(*a, None)), (args,),
                     memory=False)
        for name, fn in _variants().items():
            _compile(compiled, rows, shape, "fwd+bwd " + name,
                     jax.jit(lambda a, d, h, fn=fn: fn(a, None, d, h)), (args, dy, dh),
                     memory=True)
        timed = interleaved_medians({name: (jitted, a) for name, (jitted, a, _, _)
                                     in compiled.items()}, rounds=5, repeats=4, warmup=3)
        for name, (seconds, spread) in timed.items():
            _, _, compile_s, mem = compiled[name]
            rows.append((shape, name, f"{seconds * 1e3:.3f} ±{spread * 1e3 / 2:.3f}",
                         f"{compile_s:.1f}", mem))
            print("  ".join(rows[-1]), flush=True)
    print(f"\n{'shape':13s} {'variant':58s} {'ms ±half-spread':>16s}  first call s  extra GiB")
    for shape, name, ms, compile_s, mem in rows:
        print(f"{shape:13s} {name:58s} {ms:>16s} {compile_s:>13s}  {mem}")


def _compile(compiled, rows, shape, name, jitted, args, *, memory):
    """Runs ``jitted(*args)`` once (compiling it) into ``compiled[name]``, or a FAILED row."""
    try:
        start = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        compile_s = time.perf_counter() - start
        mem = _extra_memory(jitted, *args) if memory else "-"
        compiled[name] = (jitted, args, compile_s, mem)
    except Exception as err:  # noqa: BLE001
        traceback.print_exc()
        rows.append((shape, name, "FAILED", "-", f"{type(err).__name__}"[:40]))
        print("  ".join(rows[-1]), flush=True)


class _JnpWithoutTanh:
    """jnp with ``tanh`` the identity (timing-only ablation of the forward)."""

    def __getattr__(self, name):
        return getattr(jnp, name)

    @staticmethod
    def tanh(x):
        return x


def _forward_ablations():
    """Timing-only ablations of the default Mosaic forward (results wrong on purpose): what
    each part of a step costs. name -> (patch context manager, forward keywords)."""
    from kernel_bench import _patched
    import importlib
    fwd_module = importlib.import_module("pallas_kernels.m2rnn.mosaic_gpu.forward")
    return {
        "default": (_patched(fwd_module), {}),
        "state_split1 (one bf16 wgmma: no lo part)": (_patched(fwd_module), {"state_split": 1}),
        "abl_no_tanh": (_patched(fwd_module, jnp=_JnpWithoutTanh()), {}),
        "abl_no_y (no y partials)": (_patched(
            fwd_module, _store_warp_partial_sums=lambda ctx, p, ref, scatter=False: None), {}),
        "abl_no_wgmma (no split, no H W)": (_patched(fwd_module, _products=lambda s, w: []), {}),
    }


SCALING_BATCHES = (1, 2, 3, 4, 5, 6)  # × 132 heads: 1..6 CTAs on every SM of an H200
SCALING_HEADS = 132


def _time_forward(label, fn, args):
    try:
        start = time.perf_counter()
        jitted = jax.jit(lambda a: fn(*a, None))
        jax.block_until_ready(jitted(args))
        compile_s = time.perf_counter() - start
        ms = median_seconds(jitted, args, repeats=10, warmup=3) * 1e3
        return ms, compile_s
    except Exception:  # noqa: BLE001 - report and go on
        print(f"{label} FAILED:", flush=True)
        traceback.print_exc()
        return None, None


def probe_forward():
    """The forward's ablations at the first shape, and its time against the number of CTAs per
    SM (B × S × 132 heads, B = 1..6): how much of a step is one chain's latency and how much
    is sharing the SM."""
    batch, seq_len, heads = SHAPES[0]
    args, _, _ = _inputs(1, batch, seq_len, heads, random_state=False)
    rows = []
    for name, (patch, options) in _forward_ablations().items():
        with patch():  # active while the kernel is traced (first call)
            fn = functools.partial(mosaic_gpu.forward, chunk_size=64, save_checkpoints=False,
                                   **{**FAST_FWD, **options})
            ms, _ = _time_forward(name, fn, args)
        rows.append((f"{batch}x{seq_len}x{heads}", name, ms))
        print(f"probe {rows[-1][0]} {name}: {ms} ms", flush=True)
    sms = jax.devices()[0].core_count if hasattr(jax.devices()[0], "core_count") else 132
    scaling = []
    for b in SCALING_BATCHES:
        args, _, _ = _inputs(1, b, seq_len, SCALING_HEADS, random_state=False)
        fn = functools.partial(mosaic_gpu.forward, chunk_size=64, save_checkpoints=False,
                               **FAST_FWD)
        ms, _ = _time_forward(f"scaling B={b}", fn, args)
        per_sm = -(-b * SCALING_HEADS // sms)
        scaling.append((b, per_sm, ms))
        print(f"probe scaling {b}x{seq_len}x{SCALING_HEADS}: {ms} ms", flush=True)
    print("\nforward ablations (ms, median of 10)")
    for shape, name, ms in rows:
        print(f"{shape:13s} {name:44s} {'FAILED' if ms is None else f'{ms:9.3f}'}")
    print(f"\nforward vs CTAs per SM ({sms} SMs): ns per step, and per step per CTA")
    for b, per_sm, ms in scaling:
        ctas = b * SCALING_HEADS
        if ms is None:
            print(f"B={b} ({ctas} CTAs, {per_sm}/SM)  FAILED")
            continue
        ns = ms * 1e6 / seq_len
        print(f"B={b} ({ctas} CTAs, {per_sm}/SM)  {ms:8.3f} ms  {ns:7.1f} ns/step  "
              f"{ns / per_sm:7.1f} ns/step/CTA")


def main():
    import argparse
    global ARGS, SHAPES, CHECK_SHAPE, SCALING_BATCHES, SCALING_HEADS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true",
                        help="also the Triton backward (measured 2026-11-30)")
    parser.add_argument("--only", default="",
                        help="comma-separated BWD_OPTIONS names of the fwd+bwd variants to run "
                             f"(default all: {', '.join(BWD_OPTIONS)})")
    parser.add_argument("--skip-forward", action="store_true", help="no forward-only timings")
    parser.add_argument("--fwd", default=None,
                        help="comma-separated FWD_OPTIONS names to check and time (default all)")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated BxSxN shapes to time (default "
                             + ",".join("x".join(map(str, sh)) for sh in SHAPES) + ")")
    parser.add_argument("--check-shape", default=None,
                        help="BxSxN of the correctness check (default "
                             + "x".join(map(str, CHECK_SHAPE)) + ")")
    parser.add_argument("--no-timing", action="store_true", help="the correctness check only")
    parser.add_argument("--probe", action="store_true",
                        help="also the forward's timing-only ablations and its time against "
                             "CTAs per SM (probe_forward)")
    parser.add_argument("--dump", metavar="DIR",
                        help="have Mosaic GPU write each kernel's PTX, SASS and ptxas resource "
                             "report (registers, spills, shared memory) under DIR, and "
                             "DIR/summary.txt (benchmarks/sass_summary.py: ptxas lines, SASS "
                             "instructions per loop by kind). SASS needs nvdisasm on PATH: carry "
                             "the nvidia-cuda-nvdisasm wheel (KERNEL_NOTES.md)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes in interpret mode off the GPU: checks this script "
                             "runs end to end (every variant), not the kernels' speed")
    ARGS = parser.parse_args()
    if ARGS.smoke:
        SHAPES, CHECK_SHAPE, SCALING_BATCHES, SCALING_HEADS = [(1, 64, 2)], (1, 64, 2), (1,), 2
    if ARGS.check_shape:
        CHECK_SHAPE = tuple(int(x) for x in ARGS.check_shape.split("x"))
    if ARGS.shapes:
        SHAPES = [tuple(int(x) for x in sh.split("x")) for sh in ARGS.shapes.split(",")]
    if ARGS.dump:
        # Read by the Mosaic GPU compiler when a kernel is compiled, i.e. after this point.
        os.makedirs(ARGS.dump, exist_ok=True)
        os.environ.update(MOSAIC_GPU_DUMP_TO=ARGS.dump, MOSAIC_GPU_DUMP_PTX="1",
                          MOSAIC_GPU_DUMP_SASS="1", MOSAIC_GPU_DUMP_PTXAS="1")
    print(f"jax {jax.__version__}, devices: {jax.devices()}", flush=True)
    check_correctness()
    if ARGS.probe:
        probe_forward()
    if not ARGS.no_timing:
        time_all()
    if ARGS.dump:  # the dump is large (85 MB compressed); its summary is what to bring back
        from sass_summary import summarize
        with open(os.path.join(ARGS.dump, "summary.txt"), "w") as fh:
            fh.write(summarize(ARGS.dump))
        print(f"wrote {os.path.join(ARGS.dump, 'summary.txt')}", flush=True)


if __name__ == "__main__":
    main()
