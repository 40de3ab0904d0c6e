"""Times the M²RNN op on a GPU and measures its error against a float64 implementation.

Run from the repository root on a machine with a GPU:

    python benchmarks/kernel_bench.py [--backend auto] [--shapes all] [--reps 10] [--out DIR]
    python benchmarks/kernel_bench.py --no-checks --shape 512 16 16 --state 64 64
        --dtype float32 --backend scan,pallas_gpu     (another shape, backends side by side)

1. float32 checks: the public op with ``backend="pallas_gpu"`` (the kernels that serve float32)
   against a float64 implementation of the recurrence on odd shapes with grouped heads, an
   initial state, packed segments and clipping: y, final state and every gradient.
2. bf16 accuracy: the op (``--backend``) against the float64 implementation on the same
   bf16-rounded inputs at 2×1024×84 and 1×4096×12 (K = 64, V = 16, ``W = I + 0.1·N(0, 1)``,
   ``f = sigmoid(N(0, 1) + 1)``, state-gradient clipping c = 1 as in training): y and the
   gradient of every input. (Unclipped, the backward through 1024 steps is ill-conditioned:
   even the float32-state scan on these bf16 inputs is then 65-84 % off in dk, dv, dW, df.)
3. Timings at 8×4096×84, 4×4096×132, 1×16384×84 and 1×65536×84 (bf16, K = 64, V = 16,
   ``Nq = Nk = 1``, no initial state, clipping c = 1): forward and forward+backward (the median
   rule of ``benchmarks/timing.py``) and the extra memory of forward+backward from XLA's
   compiled memory analysis (temporaries + outputs − aliases: everything beyond the inputs).
   ``--shape B S N`` times that shape instead, ``--state K V`` and ``--dtype`` change the state
   and the inputs' dtype, and ``--backend`` takes a comma-separated list, each backend timed in
   the same run on the same inputs (the bf16 accuracy run uses the first).

Errors are relative in the Frobenius norm, ``|got − want| / |want|``. A table is printed last;
``--out`` also gets the rows as JSON lines. ``--smoke`` runs tiny shapes anywhere (interpret
mode off a GPU): it checks this script, not the kernels' speed.
"""

import argparse
import concurrent.futures
import functools
import json
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from m2rnn_jax import m2rnn
from m2rnn_jax.ops import BACKENDS, resolve_backend
from m2rnn_jax.segments import keep_mask
from pallas_kernels.m2rnn.heads import expand_heads
from timing import median_seconds  # benchmarks/ is on sys.path when run as a script

SHAPES = [(8, 4096, 84), (4, 4096, 132), (1, 16384, 84), (1, 65536, 84)]
ACCURACY_SHAPES = [(2, 1024, 84), (1, 4096, 12)]
# CLIP: the paper's state-gradient clipping, as the models train (timings and bf16 accuracy)
KEY_DIM, VALUE_DIM, CLIP = 64, 16, 1.0
OUTPUT_NAMES = ("y", "final_state", "dq", "dk", "dv", "dw", "df", "dh0")
# (name, (B, S, heads (Nq, Nk, Nv, Nf, Nw), K, V), initial state, segments, clip)
FLOAT32_CASES = [
    ("paper grouping, segments, clip", (2, 200, (1, 1, 8, 8, 8), 64, 16), True, True, 0.5),
    ("odd K/V, mixed groups", (2, 77, (2, 3, 6, 6, 3), 7, 5), True, False, 0.3),
    ("no initial state, no clip", (1, 130, (1, 2, 4, 1, 4), 32, 8), False, False, None),
]


def relative_error(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not np.all(np.isfinite(got)):
        return float("inf")
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))


# ----------------------------------------------------------------------------- float64 reference


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _clamp_cotangent(h, clip):
    """Identity; the cotangent passing back through it is clamped to ``[-clip, clip]``."""
    return h


_clamp_cotangent.defvjp(lambda h, clip: (h, None),
                        lambda clip, _, g: (jnp.clip(g, -clip, clip),))


def float64_recurrence(q, k, v, w, f, h0, keep, clip):
    """``(y, final state)`` of the recurrence (docs/math.md §1) as a plain ``lax.scan`` over
    float64 arrays, differentiated by JAX. The state gradient arriving from later steps is
    clamped (docs/math.md §2): the state handed to the next step passes through
    ``_clamp_cotangent``; the read-out uses it before. Call under ``jax.enable_x64(True)``."""
    n = h0.shape[1]
    qn, kn, vn, fn = (expand_heads(x, n, axis=2) for x in (q, k, v, f))
    wn = expand_heads(w, n, axis=0)

    def step(h, xs):
        q_t, k_t, v_t, f_t, keep_t = xs
        h = h * keep_t[:, None, None, None]
        z = jnp.tanh(jnp.einsum("bnkv,nvw->bnkw", h, wn) + k_t[..., :, None] * v_t[..., None, :])
        f_t = f_t[..., None, None]
        h = f_t * h + (1.0 - f_t) * z
        y = jnp.einsum("bnkv,bnk->bnv", h, q_t)
        return (h if clip is None else _clamp_cotangent(h, clip)), y

    xs = tuple(jnp.moveaxis(x, 1, 0) for x in (qn, kn, vn, fn, keep))
    h_final, y = lax.scan(step, h0, xs)
    return jnp.moveaxis(y, 0, 1), h_final


def float64_outputs_and_grads(args, seg, cotangents, clip):
    """[y, final state, d(each input)] of the float64 recurrence on the same values."""
    with jax.enable_x64(True):
        q, k, v, w, f, h0 = (None if x is None else jnp.asarray(np.asarray(x, np.float64))
                             for x in args)
        batch, seq_len = q.shape[:2]
        keep = (jnp.ones((batch, seq_len), jnp.float64) if seg is None
                else keep_mask(jnp.asarray(seg)).astype(jnp.float64))
        dy, dh = (jnp.asarray(np.asarray(x, np.float64)) for x in cotangents)
        with_state = h0 is not None
        if not with_state:
            h0 = jnp.zeros(dh.shape, jnp.float64)

        @jax.jit
        def run(q, k, v, w, f, h0, keep, dy, dh):
            out, vjp = jax.vjp(lambda *xs: float64_recurrence(*xs, keep, clip),
                               q, k, v, w, f, h0)
            return [*out, *vjp((dy, dh))]

        results = run(q, k, v, w, f, h0, keep, dy, dh)
        results = [np.asarray(x) for x in results]
    return results if with_state else results[:-1]


# ----------------------------------------------------------------------------- the op


def random_problem(key, batch, seq_len, heads, key_dim, value_dim, dtype, *, initial_state,
                   segments, weight_scale=0.3, forget_offset=2.0):
    """Fresh random inputs (never zeros) in the op's layout, segment ids and cotangents;
    heads = (Nq, Nk, Nv, Nf, Nw)."""
    nq, nk, nv, nf, nw = heads
    n = max(heads)
    ks = jax.random.split(key, 9)
    q = (jax.random.normal(ks[0], (batch, seq_len, nq, key_dim)) / math.sqrt(key_dim)).astype(dtype)
    k = (jax.random.normal(ks[1], (batch, seq_len, nk, key_dim)) / math.sqrt(key_dim)).astype(dtype)
    v = jax.random.normal(ks[2], (batch, seq_len, nv, value_dim)).astype(dtype)
    w = (jnp.eye(value_dim)
         + weight_scale * jax.random.normal(ks[3], (nw, value_dim, value_dim))).astype(dtype)
    f = jax.nn.sigmoid(forget_offset + jax.random.normal(ks[4], (batch, seq_len, nf))).astype(dtype)
    h0 = jax.random.normal(ks[5], (batch, n, key_dim, value_dim)) if initial_state else None
    seg = None
    if segments:
        starts = jax.random.bernoulli(ks[6], 0.05, (batch, seq_len)).astype(jnp.int32)
        seg = jnp.cumsum(starts, axis=1)
    dy = jax.random.normal(ks[7], (batch, seq_len, n, value_dim)).astype(dtype)
    dh = jax.random.normal(ks[8], (batch, n, key_dim, value_dim))
    return (q, k, v, w, f, h0), seg, (dy, dh)


def op_outputs_and_grads(backend, args, seg, cotangents, clip):
    """[y, final state, d(each input given)] of the public op."""
    given = [x for x in args if x is not None]

    @jax.jit
    def run(given, seg, cotangents):
        def op(*xs):
            return m2rnn(*xs, *([None] * (len(args) - len(xs))), clip, segment_ids=seg,
                         backend=backend)

        out, vjp = jax.vjp(op, *given)
        return [*out, *vjp(cotangents)]

    return run(given, seg, cotangents)


def check_float32(key, cases):
    """The op's float32 kernels against the float64 recurrence: rows of (case, errors)."""
    rows = []
    for name, (b, s, heads, kd, vd), initial_state, segments, clip in cases:
        key, sub = jax.random.split(key)
        args, seg, cot = random_problem(sub, b, s, heads, kd, vd, jnp.float32,
                                        initial_state=initial_state, segments=segments)
        got = op_outputs_and_grads("pallas_gpu", args, seg, cot, clip)
        want = float64_outputs_and_grads(args, seg, cot, clip)
        rows.append((name, [relative_error(g, w) for g, w in zip(got, want)]))
        print(f"[f32] {name}: " + " ".join(f"{e:.1e}" for e in rows[-1][1]), flush=True)
    return rows


def check_bf16_accuracy(key, backend, shapes):
    """The op in bf16 against the float64 recurrence on the same bf16-rounded inputs."""
    rows = []
    for batch, seq_len, heads in shapes:
        key, sub = jax.random.split(key)
        args, _, cot = random_problem(sub, batch, seq_len, (1, 1, heads, heads, heads), KEY_DIM,
                                      VALUE_DIM, jnp.bfloat16, initial_state=False,
                                      segments=False, weight_scale=0.1, forget_offset=1.0)
        got = op_outputs_and_grads(backend, args, None, cot, CLIP)
        want = float64_outputs_and_grads(args, None, cot, CLIP)
        errors = [relative_error(g, w) for g, w in zip(got, want)]
        rows.append(((batch, seq_len, heads), resolve_backend(backend, *args[:5]), errors))
        print(f"[bf16] {batch}×{seq_len}×{heads}: " + " ".join(f"{e:.1e}" for e in errors),
              flush=True)
    return rows


def bench_inputs(key, batch, seq_len, heads, key_dim, value_dim, dtype):
    (q, k, v, w, f, _), _, (dy, _) = random_problem(
        key, batch, seq_len, (1, 1, heads, heads, heads), key_dim, value_dim, dtype,
        initial_state=False, segments=False)
    return (q, k, v, w, f), dy


def op_fns(backend):
    @jax.jit
    def forward(q, k, v, w, f):
        return m2rnn(q, k, v, w, f, None, CLIP, backend=backend)

    @jax.jit
    def forward_backward(q, k, v, w, f, dy):
        (y, h), vjp = jax.vjp(lambda *xs: m2rnn(*xs, None, CLIP, backend=backend),
                              q, k, v, w, f)
        return y, vjp((dy, jnp.zeros_like(h)))  # the final state is unused in training

    return forward, forward_backward


def extra_memory_gib(compiled):
    """Temporaries + outputs (everything beyond the inputs) of a compiled computation."""
    stats = compiled.memory_analysis()
    extra = stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
    return extra / 2**30


def compile_all(jobs, workers):
    """Lowers each job, then compiles them in parallel threads; sets job["compiled"] or
    job["error"]."""
    pending = []
    for job in jobs:
        try:
            pending.append((job, job["fn"].lower(*job["args"])))
        except Exception as err:
            job["error"] = f"lowering: {type(err).__name__}: {err}"[:800]
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(lowered.compile): job for job, lowered in pending}
        for future in concurrent.futures.as_completed(futures):
            job = futures[future]
            try:
                job["compiled"] = future.result()
            except Exception as err:
                job["error"] = f"compile: {type(err).__name__}: {err}"[:800]


def time_shapes(key, backends, shapes, reps, workers, state, dtype):
    """Rows of forward / forward+backward milliseconds and extra memory per shape and backend
    (each backend on the same inputs)."""
    jobs, fns = [], {backend: op_fns(backend) for backend in backends}
    for batch, seq_len, heads in shapes:
        args, dy = bench_inputs(jax.random.fold_in(key, seq_len), batch, seq_len, heads, *state,
                                dtype)
        for backend in backends:
            forward, forward_backward = fns[backend]
            # What ran, read from the inputs themselves; "kernel" is what the name resolves to.
            common = {"shape": (batch, seq_len, heads), "backend": backend,
                      "kernel": resolve_backend(backend, *args),
                      "state": [args[0].shape[-1], args[2].shape[-1]],
                      "dtype": args[0].dtype.name}
            jobs.append({**common, "what": "fwd", "fn": forward, "args": args})
            jobs.append({**common, "what": "fwd_bwd", "fn": forward_backward,
                         "args": (*args, dy)})
    compile_all(jobs, workers)
    rows = {}
    for job in jobs:
        row = rows.setdefault((job["shape"], job["backend"]), {
            name: job[name] for name in ("shape", "backend", "kernel", "state", "dtype")})
        if "error" in job:
            row.setdefault("errors", []).append(f"{job['what']}: {job['error']}")
            continue
        try:
            seconds = median_seconds(job["compiled"], *job["args"], repeats=reps)
            row[f"{job['what']}_ms"] = seconds * 1e3
            if job["what"] == "fwd_bwd":
                row["extra_mem_gib"] = extra_memory_gib(job["compiled"])
        except Exception as err:
            row.setdefault("errors", []).append(f"{job['what']}: {type(err).__name__}: {err}"[:800])
        print(f"[done] {job['shape']} {job['what']} {row}", flush=True)
    return list(rows.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="auto",
                        help="backend of the bf16 accuracy and timing runs: auto (the Mosaic "
                             "kernels on a Hopper GPU), pallas_gpu, mosaic_gpu, scan; a "
                             "comma-separated list times each (the bf16 accuracy run uses the "
                             "first)")
    parser.add_argument("--shapes", default="all", choices=["all", "first", "none"],
                        help="shapes to time: 'all', 'first' (8×4096×84 only) or 'none'")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("B", "S", "N"),
                        help="time this shape instead of --shapes")
    parser.add_argument("--state", type=int, nargs=2, default=[KEY_DIM, VALUE_DIM],
                        metavar=("K", "V"), help="state size of the timings (default 64 16)")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="dtype of the timings' inputs")
    parser.add_argument("--no-checks", action="store_true",
                        help="skip the float32 checks and the bf16 accuracy runs")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=8, help="parallel compilations")
    parser.add_argument("--out", help="folder for kernel_bench.jsonl")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny shapes (the timed one --shape where given), runs anywhere "
                             "(interpret mode off a GPU)")
    args = parser.parse_args(argv)
    backends = [name.strip() for name in args.backend.split(",") if name.strip()]
    unknown = [name for name in backends if name not in BACKENDS]
    if not backends or unknown or len(set(backends)) < len(backends):
        parser.error(f"--backend takes distinct names from {', '.join(BACKENDS)}; got "
                     f"{args.backend!r}")
    started = time.time()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}",
          flush=True)
    if jax.default_backend() != "gpu" and not args.smoke:
        sys.exit("kernel_bench.py needs a GPU (or --smoke)")
    shapes = ([tuple(args.shape)] if args.shape else
              {"all": SHAPES, "first": SHAPES[:1], "none": []}[args.shapes])
    float32_cases, accuracy_shapes = FLOAT32_CASES, ACCURACY_SHAPES
    if args.smoke:
        accuracy_shapes = [(1, 40, 3)]
        if not args.shape:
            shapes = [(1, 64, 4)][:len(shapes)]
        float32_cases = [("smoke", (1, 21, (1, 1, 2, 2, 2), 5, 3), True, True, 0.5)]

    rows = []
    if args.out:
        os.makedirs(args.out, exist_ok=True)

    def emit(row):
        rows.append(row)
        if args.out:
            with open(os.path.join(args.out, "kernel_bench.jsonl"), "a") as fh:
                fh.write(json.dumps(row) + "\n")

    key = jax.random.PRNGKey(0)
    if not args.no_checks:
        for name, errors in check_float32(jax.random.fold_in(key, 1), float32_cases):
            emit({"kind": "check_f32", "case": name, "errors": dict(zip(OUTPUT_NAMES, errors))})
        for shape, backend, errors in check_bf16_accuracy(jax.random.fold_in(key, 2),
                                                          backends[0], accuracy_shapes):
            emit({"kind": "accuracy_bf16", "shape": shape, "backend": backend,
                  "errors": dict(zip(OUTPUT_NAMES, errors))})
        print(f"checks done at {time.time() - started:.0f} s", flush=True)
    for row in time_shapes(jax.random.fold_in(key, 3), backends, shapes, args.reps,
                           args.workers, tuple(args.state), jnp.dtype(args.dtype)):
        emit({"kind": "timing", **row})

    print(f"\n== summary ({time.time() - started:.0f} s) ==")
    for row in rows:
        if row["kind"] == "check_f32":
            print(f"f32 vs float64  {row['case']:<32} worst {max(row['errors'].values()):.1e}")
    for row in rows:
        if row["kind"] == "accuracy_bf16":
            b, s, n = row["shape"]
            errors = row["errors"]
            grads = [errors[name] for name in OUTPUT_NAMES[2:] if name in errors]
            print(f"bf16 vs float64 {f'{b}×{s}×{n}':<12} y {errors['y']:.1%}, gradients "
                  f"{min(grads):.1%}–{max(grads):.1%}  ({row['backend']})")
    print(f"{'B×S×N':<14}{'K×V':<7}{'dtype':<10}{'fwd ms':>9}{'fwd+bwd ms':>12}"
          f"{'extra GiB':>10}  backend")
    for row in rows:
        if row["kind"] == "timing":
            b, s, n = row["shape"]
            key_dim, value_dim = row["state"]
            print(f"{f'{b}×{s}×{n}':<14}{f'{key_dim}×{value_dim}':<7}{row['dtype']:<10}"
                  f"{row.get('fwd_ms', float('nan')):>9.2f}"
                  f"{row.get('fwd_bwd_ms', float('nan')):>12.2f}"
                  f"{row.get('extra_mem_gib', float('nan')):>10.3f}  {row['backend']}"
                  + (f" ({row['kernel']})" if row["kernel"] != row["backend"] else "")
                  + (f"  ERR {row['errors']}"[:300] if "errors" in row else ""))


if __name__ == "__main__":
    main()
