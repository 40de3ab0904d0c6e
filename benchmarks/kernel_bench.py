"""Checks the GPU Pallas kernel against the scan on the GPU, then times it (SPEC §4 shapes).

Run from the repository root on a machine with a GPU:

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/kernel_bench.py [--variants] [--out DIR]

1. Correctness, float32 on the GPU: the public op (``backend="pallas_gpu"``) against
   ``backend="scan"`` on fresh random inputs at small shapes (odd K/V, groupings, segments,
   clipping, initial state): y, final state and every gradient, relative error < 1e-4.
2. bfloat16 at the paper's head shape (N=84, K=64, V=16, Nq=Nk=1) on a short sequence against the
   scan (within 1e-2), for every kernel variant that is timed.
3. Timings (median of ``--reps`` after warm-up; host clock around ``block_until_ready``) of the
   forward and forward+backward, and the extra memory of forward+backward from XLA's compiled
   memory analysis (temporaries + outputs: everything beyond the inputs), bf16, K=64, V=16,
   Nq=Nk=1, no initial state, clipping c=1, at 8×4096×84, 4×4096×132, 1×16384×84, 1×65536×84.

A short table is printed last; ``--out`` also gets the rows as JSON lines.
"""

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from m2rnn_jax import m2rnn
from pallas_kernels.m2rnn import gpu

SHAPES = [(8, 4096, 84), (4, 4096, 132), (1, 16384, 84), (1, 65536, 84)]
KEY_DIM, VALUE_DIM, CLIP = 64, 16, 1.0

# name -> (KernelConfig overrides, chunk size). "default" is gpu.DEFAULT_CONFIG.
VARIANTS = {
    "default": ({}, gpu.DEFAULT_CHUNK_SIZE),
    "warps2": ({"num_warps": 2}, 64),
    "warps1": ({"num_warps": 1}, 64),
    "heads2": ({"heads_per_program": 2}, 64),
    "heads4": ({"heads_per_program": 4}, 64),
    "heads4_warps8": ({"heads_per_program": 4, "num_warps": 8}, 64),
    "no_prefetch": ({"prefetch": False}, 64),
    "unroll4_sub4": ({"unroll": 4, "subchunk": 4}, 64),
    "unroll16": ({"unroll": 16}, 64),
    "chunk128": ({}, 128),
    "ieee_dots": ({"bf16_precision": "ieee"}, 64),
    "approx_tanh": ({"approx_tanh": True}, 64),
}


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def random_problem(key, batch, seq_len, heads, key_dim, value_dim, dtype, *, initial_state=True,
                   segments=False):
    """Fresh random inputs (never zeros) in the op's layout; heads = (Nq, Nk, Nv, Nf, Nw)."""
    nq, nk, nv, nf, nw = heads
    n = max(heads)
    ks = jax.random.split(key, 9)
    q = (jax.random.normal(ks[0], (batch, seq_len, nq, key_dim)) / math.sqrt(key_dim)).astype(dtype)
    k = (jax.random.normal(ks[1], (batch, seq_len, nk, key_dim)) / math.sqrt(key_dim)).astype(dtype)
    v = jax.random.normal(ks[2], (batch, seq_len, nv, value_dim)).astype(dtype)
    w = (jnp.eye(value_dim) + 0.3 * jax.random.normal(ks[3], (nw, value_dim, value_dim))).astype(dtype)
    f = jax.nn.sigmoid(2.0 + jax.random.normal(ks[4], (batch, seq_len, nf))).astype(dtype)
    h0 = jax.random.normal(ks[5], (batch, n, key_dim, value_dim)) if initial_state else None
    seg = None
    if segments:
        starts = jax.random.bernoulli(ks[6], 0.05, (batch, seq_len)).astype(jnp.int32)
        seg = jnp.cumsum(starts, axis=1)
    dy = jax.random.normal(ks[7], (batch, seq_len, n, value_dim)).astype(dtype)
    dh = jax.random.normal(ks[8], (batch, n, key_dim, value_dim))
    return (q, k, v, w, f, h0), seg, (dy, dh)


def op_outputs_and_grads(backend, args, seg, cotangents, clip, chunk_size=None):
    def fn(*xs):
        return m2rnn(*xs, clip, segment_ids=seg, backend=backend, chunk_size=chunk_size)

    @jax.jit
    def run(args, cotangents):
        out, vjp = jax.vjp(fn, *args)
        return out, vjp(cotangents)

    out, grads = run(args, cotangents)
    return list(out) + [g for g in grads if g is not None]


def check_float32(key):
    """The public op against the scan on the GPU; returns rows of (case, worst error)."""
    cases = [
        ("paper grouping, segments, clip", (2, 200, (1, 1, 8, 8, 8), 64, 16),
         dict(initial_state=True, segments=True), 0.5),
        ("odd K/V, mixed groups", (2, 77, (2, 3, 6, 6, 3), 7, 5),
         dict(initial_state=True, segments=False), 0.3),
        ("no initial state, no clip", (1, 130, (1, 2, 4, 1, 4), 32, 8),
         dict(initial_state=False, segments=False), None),
    ]
    rows = []
    for name, (b, s, heads, kd, vd), kw, clip in cases:
        key, sub = jax.random.split(key)
        args, seg, cot = random_problem(sub, b, s, heads, kd, vd, jnp.float32, **kw)
        want = op_outputs_and_grads("scan", args, seg, cot, clip)
        got = op_outputs_and_grads("pallas_gpu", args, seg, cot, clip)
        errors = [relative_error(g, w) for g, w in zip(got, want)]
        rows.append((name, max(errors), errors))
        print(f"[f32] {name}: worst {max(errors):.2e}  "
              + " ".join(f"{e:.1e}" for e in errors), flush=True)
    return rows


def kernel_fns(config, chunk):
    """jit'd forward and forward+backward of the backend functions (what the op's vjp runs)."""

    @jax.jit
    def forward(q, k, v, w, f, h0):
        y, h_final, _ = gpu.forward(q, k, v, w, f, h0, None, chunk_size=chunk,
                                    save_checkpoints=False, config=config)
        return y, h_final

    @jax.jit
    def forward_backward(q, k, v, w, f, h0, dy, dh):
        y, h_final, ckpt = gpu.forward(q, k, v, w, f, h0, None, chunk_size=chunk,
                                       save_checkpoints=True, config=config)
        grads = gpu.backward(q, k, v, w, f, h0, None, ckpt, dy, dh, gradient_clipping=CLIP,
                             chunk_size=chunk, config=config)
        return y, h_final, grads

    return forward, forward_backward


def scan_fns(chunk=64):
    from m2rnn_jax import reference

    @jax.jit
    def forward_backward(q, k, v, w, f, h0, dy, dh):
        y, h_final, ckpt = reference.forward(q, k, v, w, f, h0, None, chunk_size=chunk)
        grads = reference.backward(q, k, v, w, f, h0, None, ckpt, dy, dh,
                                   gradient_clipping=CLIP, chunk_size=chunk)
        return y, h_final, grads

    return forward_backward


def timed(fn, *args, reps):
    jax.block_until_ready(fn(*args))  # compile + warm-up
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def extra_memory_gib(fn, *args):
    stats = fn.lower(*args).compile().memory_analysis()
    extra = stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
    return extra / 2**30


def bench_inputs(key, batch, seq_len, heads):
    (q, k, v, w, f, _), _, (dy, _) = random_problem(
        key, batch, seq_len, (1, 1, heads, heads, heads), KEY_DIM, VALUE_DIM, jnp.bfloat16,
        initial_state=False)
    h0 = jnp.zeros((batch, heads, KEY_DIM, VALUE_DIM), jnp.float32)
    dh = jnp.zeros_like(h0)  # the final state is unused in training
    return (q, k, v, w, f, h0), (dy, dh)


def flatten(tree):
    return [x for x in jax.tree_util.tree_leaves(tree)]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="all",
                        help="comma-separated variant names to time at 8×4096×84, 'all' or 'none'")
    parser.add_argument("--shapes", default="all", help="'all' or 'first' (8×4096×84 only)")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--budget-s", type=float, default=400.0,
                        help="skip the remaining variants once this many seconds have passed")
    parser.add_argument("--out", default=os.environ.get("OUT"))
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes, runs anywhere (interpret mode off the GPU): checks "
                             "this script, not the kernel's speed")
    args = parser.parse_args()
    global SHAPES
    if args.smoke:
        SHAPES = [(1, 64, 4)]
    started = time.time()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}",
          flush=True)
    if jax.default_backend() != "gpu" and not args.smoke:
        sys.exit("kernel_bench.py needs a GPU")
    rows = []

    def emit(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(os.path.join(args.out, "kernel_bench.jsonl"), "a") as fh:
                fh.write(json.dumps(row) + "\n")

    key = jax.random.PRNGKey(0)
    for name, worst, _ in ([] if args.smoke else check_float32(jax.random.fold_in(key, 1))):
        emit({"kind": "check_f32", "case": name, "worst_rel_err": worst, "pass": worst < 1e-4})

    # bf16 reference at the paper's head shape on a short sequence (scan on the GPU).
    check_shape = (1, 64, 4) if args.smoke else (4, 256, 84)
    check_args, check_cot = bench_inputs(jax.random.fold_in(key, 2), *check_shape)
    check_cot = (check_cot[0], jax.random.normal(jax.random.fold_in(key, 3),
                                                 check_cot[1].shape))
    scan_out = flatten(scan_fns()(*check_args, *check_cot))

    names = list(VARIANTS) if args.variants == "all" else (
        [] if args.variants == "none" else args.variants.split(","))
    if "default" not in names:
        names.insert(0, "default")
    main_shape = SHAPES[0]
    main_args, main_cot = bench_inputs(jax.random.fold_in(key, 4), *main_shape)
    for name in names:
        if time.time() - started > args.budget_s:
            emit({"kind": "skipped", "variant": name, "why": "time budget"})
            continue
        overrides, chunk = VARIANTS[name]
        config = dataclasses.replace(gpu.DEFAULT_CONFIG, **overrides)
        try:
            forward, forward_backward = kernel_fns(config, chunk)
            got = flatten(forward_backward(*check_args, *check_cot))
            bf16_err = max(relative_error(g, w) for g, w in zip(got, scan_out))
            t0 = time.time()
            fwd_ms = timed(forward, *main_args, reps=args.reps)
            compile_fwd_s = time.time() - t0
            fb_ms = timed(forward_backward, *main_args, *main_cot, reps=args.reps)
            emit({"kind": "variant", "variant": name, "chunk": chunk, "shape": main_shape,
                  "fwd_ms": fwd_ms, "fwd_bwd_ms": fb_ms, "bf16_rel_err_S256": bf16_err,
                  "compile_and_time_fwd_s": compile_fwd_s, "config": dataclasses.asdict(config)})
        except Exception as err:  # keep going: one failing variant must not lose the others
            emit({"kind": "error", "variant": name, "error": f"{type(err).__name__}: {err}"[:800]})

    # The default configuration through the public op at every shape, with memory.
    shapes = SHAPES if args.shapes == "all" else SHAPES[:1]
    for batch, seq_len, heads in shapes:
        if time.time() - started > args.budget_s + 120:
            emit({"kind": "skipped", "shape": [batch, seq_len, heads], "why": "time budget"})
            continue
        try:
            (q, k, v, w, f, _), (dy, _) = bench_inputs(jax.random.fold_in(key, seq_len),
                                                        batch, seq_len, heads)

            @jax.jit
            def op_forward(q, k, v, w, f):
                return m2rnn(q, k, v, w, f, None, CLIP, backend="pallas_gpu")

            @jax.jit
            def op_forward_backward(q, k, v, w, f, dy):
                (y, h), vjp = jax.vjp(
                    lambda *xs: m2rnn(*xs, None, CLIP, backend="pallas_gpu"), q, k, v, w, f)
                return y, vjp((dy, jnp.zeros_like(h)))

            fwd_ms = timed(op_forward, q, k, v, w, f, reps=args.reps)
            fb_ms = timed(op_forward_backward, q, k, v, w, f, dy, reps=args.reps)
            mem = extra_memory_gib(op_forward_backward, q, k, v, w, f, dy)
            emit({"kind": "op", "shape": [batch, seq_len, heads], "fwd_ms": fwd_ms,
                  "fwd_bwd_ms": fb_ms, "extra_mem_gib": mem,
                  "us_per_step_fwd": fwd_ms * 1e3 / seq_len})
        except Exception as err:
            emit({"kind": "error", "shape": [batch, seq_len, heads],
                  "error": f"{type(err).__name__}: {err}"[:800]})

    print(f"\n== summary ({time.time() - started:.0f} s) ==")
    for row in rows:
        if row["kind"] == "check_f32":
            print(f"check f32  {row['case']:<34} worst {row['worst_rel_err']:.1e} "
                  f"{'ok' if row['pass'] else 'FAIL'}")
    print(f"{'variant':<16}{'fwd ms':>9}{'fwd+bwd ms':>12}{'bf16 err':>10}")
    for row in rows:
        if row["kind"] == "variant":
            print(f"{row['variant']:<16}{row['fwd_ms']:>9.2f}{row['fwd_bwd_ms']:>12.2f}"
                  f"{row['bf16_rel_err_S256']:>10.1e}")
        elif row["kind"] in ("error", "skipped") and "variant" in row:
            print(f"{row['variant']:<16} {row['kind']}: {row.get('error', row.get('why'))[:200]}")
    print(f"{'B×S×N':<16}{'fwd ms':>9}{'fwd+bwd ms':>12}{'extra GiB':>10}")
    for row in rows:
        if row["kind"] == "op":
            b, s, n = row["shape"]
            print(f"{f'{b}×{s}×{n}':<16}{row['fwd_ms']:>9.2f}{row['fwd_bwd_ms']:>12.2f}"
                  f"{row['extra_mem_gib']:>10.3f}")
        elif row["kind"] in ("error", "skipped") and "shape" in row and "variant" not in row:
            print(f"{row['shape']} {row['kind']}: {row.get('error', row.get('why'))[:200]}")


if __name__ == "__main__":
    main()
