"""Checks the vector-state kernels (``pallas_gpu_vector``, K = 1) against the scan on the GPU,
then times them against the scan at the state-tracking shapes.

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 benchmarks/vector_kernel_bench.py [--configs ...]

1. Correctness, float32 on the GPU: the public op against ``backend="scan"`` on fresh random
   inputs (y, final state, every gradient; relative error < 1e-4) at two shapes: the S5
   model's (B=512, S=64, N=16, V=64; clipping, initial state) and an odd one (B=37, S=45, V=5,
   grouped heads, segments), for every timed kernel configuration.
   Every configuration compiles four times (two checks, two timings): about 20 s each, so
   pick a few with ``--configs`` when device time is short.
2. Timings (median of ``--reps`` after warm-up), float32 as the state-tracking models run:
   forward+backward at B×S×N×V = 512×64×16×64 (a training step's recurrence), forward at
   512×1024×16×64 (the 16× evaluation), for the scan and each configuration.

A short table is printed last.
"""

import argparse
import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np

from m2rnn_jax import m2rnn
from pallas_kernels.m2rnn import gpu_vector
from timing import median_seconds  # benchmarks/ is on sys.path when run as a script

# The defaults until the eighth session: the sixth and seventh sessions' names are relative
# to them.
_BEFORE = {"float32_dots": "ieee", "unroll": 8, "subchunk": 2, "num_warps": 8,
           "backward_num_warps": 8, "scalar_layout": "time_major"}
_TIME_MAJOR = {"scalar_layout": "time_major"}  # the scalars' layout until the ninth session

# name -> VectorKernelConfig overrides
CONFIGS = {
    "default": {},  # R = 16 rows, 4 warps, unroll 1, sub-chunk 1, split dots (eighth session),
    # batch-major scalars (ninth session)
    "before": _BEFORE,  # R = 16, 8 warps, unroll 8, sub-chunk 2, exact float32 dots
    "sub4": {**_BEFORE, "subchunk": 4},
    "warps4": {**_BEFORE, "num_warps": 4, "backward_num_warps": 4},
    "rows32": {**_BEFORE, "block_rows": 32},
    "split": {**_BEFORE, "float32_dots": "split"},
    "tf32x3": {**_BEFORE, "float32_dots": "tf32x3"},
    "unroll2": {**_BEFORE, "unroll": 2},
    "unroll4": {**_BEFORE, "unroll": 4},
    "warps16": {**_BEFORE, "num_warps": 16, "backward_num_warps": 16},
    # Fewest spills in benchmarks/triton_registers.py's offline estimate (seventh session):
    # forward unroll 1 (255 registers, no spills; then default 944 B spilled), backward
    # sub-chunk 1 (255 registers, 0.5 KiB spilled; then default: 32 registers, 8 KiB spilled).
    # The split dots never spill: forward 64 registers (4 programs per SM), backward 164; with
    # 4 warps 96 and 245 (5 and 2 programs per SM).
    "unroll1": {**_BEFORE, "unroll": 1},
    "sub1": {**_BEFORE, "subchunk": 1},
    "unroll1_sub1": {**_BEFORE, "unroll": 1, "subchunk": 1},
    "unroll2_sub1": {**_BEFORE, "unroll": 2, "subchunk": 1},
    "split_unroll1_sub1": {**_BEFORE, "float32_dots": "split", "unroll": 1, "subchunk": 1},
    # fastest of the seventh session's: the default of the eighth session
    "split_unroll1_sub1_warps4": _TIME_MAJOR,
    # Around the eighth session's default (offline: forward unroll 2 126 registers, 4
    # programs per SM; unroll 4 164, 3; R = 32 168, 3 (backward 8 B spilled); 2 forward warps
    # 180, 5; backward unchanged at 245, 2 programs per SM, in all of them).
    "d_unroll2": {**_TIME_MAJOR, "unroll": 2},
    "d_unroll4": {**_TIME_MAJOR, "unroll": 4},
    "d_rows32": {**_TIME_MAJOR, "block_rows": 32},
    "d_fwd_warps2": {**_TIME_MAJOR, "num_warps": 2},
    # q, k, f, keep, dq, dk, df rearranged to (N_x, S, Bp) (offline: forward 96 registers, 4
    # programs per SM; batch-major 98 and 4; backward 255 / 245, 2 per SM).
    "d_scalars_time_major": _TIME_MAJOR,
}


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


def problem(seed, batch, seq_len, heads, value_dim, *, initial_state, segments):
    nq, nk, nv, nf, nw = heads
    n = max(heads)
    ks = jax.random.split(jax.random.PRNGKey(seed), 9)
    q = jax.random.normal(ks[0], (batch, seq_len, nq, 1))
    k = jax.random.normal(ks[1], (batch, seq_len, nk, 1))
    v = jax.random.normal(ks[2], (batch, seq_len, nv, value_dim))
    w = 0.5 / np.sqrt(value_dim) * jax.random.normal(ks[3], (nw, value_dim, value_dim))
    f = jax.random.uniform(ks[4], (batch, seq_len, nf), minval=0.05, maxval=0.95)
    h0 = jax.random.normal(ks[5], (batch, n, 1, value_dim)) if initial_state else None
    seg = None
    if segments:
        seg = jnp.cumsum(jax.random.bernoulli(ks[6], 0.05, (batch, seq_len)), axis=1)
    dy = jax.random.normal(ks[7], (batch, seq_len, n, value_dim))
    dh = jax.random.normal(ks[8], (batch, n, 1, value_dim))
    return (q, k, v, w, f, h0), seg, (dy, dh)


def outputs_and_grads(backend, args, seg, cotangents, clip):
    diff = tuple(x for x in args if x is not None)

    @jax.jit
    def run(diff, seg, cotangents):
        def op(*xs):
            full = list(xs) + [None] * (len(args) - len(xs))
            return m2rnn(*full, clip, segment_ids=seg, backend=backend)

        out, vjp = jax.vjp(op, *diff)
        return [*out, *vjp(cotangents)]

    return run(diff, seg, cotangents)


def with_config(name):
    """Installs a configuration as the module default (the op takes no kernel config)."""
    gpu_vector.DEFAULT_CONFIG = gpu_vector.VectorKernelConfig(**CONFIGS[name])


def check(names):
    """Prints each configuration's worst error; returns the names that pass (< 1e-4)."""
    cases = {
        "s5_shape": (0, 512, 64, (1, 1, 16, 16, 16), 64, True, False, 1.0),
        "odd_grouped_segments": (1, 37, 45, (2, 1, 4, 4, 2), 5, False, True, 0.5),
    }
    worst = {name: 0.0 for name in names}
    for case, (seed, b, s, heads, v, init, segs, clip) in cases.items():
        args, seg, cot = problem(seed, b, s, heads, v, initial_state=init, segments=segs)
        want = outputs_and_grads("scan", args, seg, cot, clip)
        for name in names:
            with_config(name)
            try:
                got = outputs_and_grads("pallas_gpu_vector", args, seg, cot, clip)
            except Exception as err:  # a configuration that does not compile is reported
                print(f"check {case:<22} {name:<20} FAILED: {type(err).__name__}: "
                      f"{str(err)[:300]}", flush=True)
                worst[name] = float("inf")
                continue
            errors = [relative_error(g, w) for g, w in zip(got, want)]
            worst[name] = max(worst[name], max(errors))
            print(f"check {case:<22} {name:<20} max rel err {max(errors):.2e} "
                  f"({', '.join(f'{e:.1e}' for e in errors)})", flush=True)
    for name in names:
        print(f"CHECK {name:<20} {'PASS' if worst[name] < 1e-4 else 'FAIL'} "
              f"(worst relative error {worst[name]:.2e})")
    return [name for name in names if worst[name] < 1e-4]


def timings(names, reps):
    rows = []
    for label, batch, seq_len, backward in (("fwd+bwd 512x64", 512, 64, True),
                                            ("fwd 512x1024", 512, 1024, False)):
        args, _, cot = problem(2, batch, seq_len, (1, 1, 16, 16, 16), 64, initial_state=False,
                               segments=False)
        q, k, v, w, f, _ = args

        def fn(backend, q, k, v, w, f):
            if not backward:
                return m2rnn(q, k, v, w, f, None, 1.0, backend=backend)[0]
            loss = lambda *xs: jnp.sum(m2rnn(*xs, None, 1.0, backend=backend)[0] * cot[0])
            return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, w, f)

        for name in ["scan"] + list(names):
            backend = "scan" if name == "scan" else "pallas_gpu_vector"
            if name != "scan":
                with_config(name)
            run = jax.jit(functools.partial(fn, backend))
            ms = 1e3 * median_seconds(run, q, k, v, w, f, repeats=reps)
            rows.append((label, name, ms))
            print(f"time {label:<16} {name:<16} {ms:8.3f} ms", flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--reps", type=int, default=10)
    args = p.parse_args(argv)
    names = args.configs.split(",")
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown configs {unknown}; known: {sorted(CONFIGS)}")
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}")
    passed = check(names)
    rows = timings(passed, args.reps)
    print(f"\n{'shape':<16} {'variant':<16} {'ms':>9}")
    for label, name, ms in rows:
        print(f"{label:<16} {name:<16} {ms:9.3f}")
    sys.exit(0 if "default" in passed else 1)


if __name__ == "__main__":
    main()
