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
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from m2rnn_jax import m2rnn
from m2rnn_jax.ops import resolve_backend
from pallas_kernels.m2rnn import gpu
from timing import median_seconds  # benchmarks/ is on sys.path when run as a script

SHAPES = [(8, 4096, 84), (4, 4096, 132), (1, 16384, 84), (1, 65536, 84)]
KEY_DIM, VALUE_DIM, CLIP = 64, 16, 1.0

# name -> (KernelConfig overrides, chunk size, time the backward too).
VARIANTS = {
    "default": ({}, gpu.DEFAULT_CHUNK_SIZE, True),
    "exact_dots": ({"split_dots": False}, 64, True),  # the default before 2026-11-30
    "approx_tanh": ({"approx_tanh": True}, 64, True),
    "tf32_dots": ({"bf16_precision": "tf32"}, 64, True),
    "prefetch": ({"prefetch": True}, 64, True),
    "sub8": ({"subchunk": 8}, 64, True),
    "unroll4": ({"unroll": 4}, 64, True),
    "unroll16": ({"unroll": 16}, 64, True),
    "warps2": ({"num_warps": 2}, 64, True),
    "chunk128": ({}, 128, True),
    "replicas8": ({"qk_replicas": 8}, 64, True),
    "approx_unroll4": ({"approx_tanh": True, "unroll": 4}, 64, True),
    # bf16 tensor-core dots with hi/lo-split float32 operands (KernelConfig.split_dots).
    "split": ({"split_dots": True}, 64, True),
    "split_warps1": ({"split_dots": True, "num_warps": 1}, 64, True),
    "split_warps2": ({"split_dots": True, "num_warps": 2}, 64, True),
    "split_approx": ({"split_dots": True, "approx_tanh": True}, 64, True),
    "split_approx_warps1": ({"split_dots": True, "approx_tanh": True, "num_warps": 1}, 64, True),
    "split_approx_warps2": ({"split_dots": True, "approx_tanh": True, "num_warps": 2}, 64, True),
    "split_warps1_unroll4": ({"split_dots": True, "num_warps": 1, "unroll": 4}, 64, True),
    # Several heads per program: the block-diagonal dot's waste is cheap on tensor cores, while
    # each step's loads, address arithmetic and barriers are shared by the heads.
    "split_approx_heads2": ({"split_dots": True, "approx_tanh": True,
                             "heads_per_program": 2}, 64, True),
    "split_approx_heads2_warps8": ({"split_dots": True, "approx_tanh": True,
                                    "heads_per_program": 2, "num_warps": 8}, 64, True),
    "split_approx_heads4_warps8": ({"split_dots": True, "approx_tanh": True,
                                    "heads_per_program": 4, "num_warps": 8}, 64, True),
    "split_approx_heads4": ({"split_dots": True, "approx_tanh": True,
                             "heads_per_program": 4}, 64, True),
    "split_approx_unroll16": ({"split_dots": True, "approx_tanh": True, "unroll": 16}, 64, True),
}


def _patched(module, **replacements):
    """Context manager: temporarily replace module attributes (for the ablations below)."""
    import contextlib

    @contextlib.contextmanager
    def patch():
        saved = {name: getattr(module, name) for name in replacements}
        for name, value in replacements.items():
            setattr(module, name, value)
        try:
            yield
        finally:
            for name, value in saved.items():
                setattr(module, name, value)

    return patch


class _JnpWithoutSum:
    """jnp with ``sum`` returning zeros: removes the forward's per-step y reduction."""

    def __getattr__(self, name):
        return getattr(jnp, name)

    @staticmethod
    def sum(x, axis=None):
        shape = tuple(d for i, d in enumerate(x.shape) if i != axis) if axis is not None else ()
        return jnp.zeros(shape, x.dtype)


_PLTRITON = gpu.pltriton


class _TritonWithStores:
    """pallas.triton with atomic_add replaced by a plain store (wrong sums; timing only)."""

    def __getattr__(self, name):
        return getattr(_PLTRITON, name)

    @staticmethod
    def atomic_add(ref, idx, value):
        ref[idx] = value


def _advance_without_dot(self, h, inputs):
    _, k, v, f, keep = inputs
    if keep is not None:
        h = h * keep
    z = gpu._tanh(h + k[:, None] * v[None, :], self.approx_tanh)
    return h, z, z + f[None, :] * (h - z)


def _load_once(self, t):
    return _ORIGINAL_LOAD(self, 0)


_ORIGINAL_LOAD = gpu._Step.load

# Timing-only ablations of the default kernel (results are wrong on purpose): what each part
# of a step costs. name -> (patch, time the backward too).
ABLATIONS = {
    "abl_no_tanh": (_patched(gpu, _tanh=lambda x, approx: x), False),
    "abl_no_dot": (_patched(gpu._Step, advance=_advance_without_dot), False),
    "abl_no_y": (_patched(gpu, jnp=_JnpWithoutSum()), False),
    "abl_loads_hoisted": (_patched(gpu._Step, load=_load_once), False),
    "abl_bwd_no_atomics": (_patched(gpu, pltriton=_TritonWithStores()), True),
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


def extra_memory_gib(compiled):
    """Temporaries + outputs (everything beyond the inputs) of a compiled computation."""
    stats = compiled.memory_analysis()
    extra = stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
    return extra / 2**30


def bench_inputs(key, batch, seq_len, heads):
    (q, k, v, w, f, _), _, (dy, _) = random_problem(
        key, batch, seq_len, (1, 1, heads, heads, heads), KEY_DIM, VALUE_DIM, jnp.bfloat16,
        initial_state=False)
    h0 = jnp.zeros((batch, heads, KEY_DIM, VALUE_DIM), jnp.float32)
    dh = jnp.zeros_like(h0)  # the final state is unused in training
    return (q, k, v, w, f, h0), (dy, dh)


def op_fns(backend):
    @jax.jit
    def op_forward(q, k, v, w, f):
        return m2rnn(q, k, v, w, f, None, CLIP, backend=backend)

    @jax.jit
    def op_forward_backward(q, k, v, w, f, dy):
        (y, h), vjp = jax.vjp(lambda *xs: m2rnn(*xs, None, CLIP, backend=backend),
                              q, k, v, w, f)
        return y, vjp((dy, jnp.zeros_like(h)))

    return op_forward, op_forward_backward


def compile_all(jobs, workers):
    """Lowers each job (serially: ablations patch the module while tracing), then compiles them
    in parallel threads. Sets job["compiled"] or job["error"]."""
    import concurrent.futures
    import contextlib

    pending = []
    for job in jobs:
        try:
            with (job.get("patch") or contextlib.nullcontext)():
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


def flatten(tree):
    return list(jax.tree_util.tree_leaves(tree))


def dump_ptx_and_registers(out_dir, variant="default"):
    """Compiles a variant's kernels at 8×4096×84 in a child process with XLA dumping, then
    reports ptxas' register/spill counts for the Pallas kernels."""
    import glob
    import subprocess
    import tempfile

    dump = tempfile.mkdtemp()
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, XLA_FLAGS=f"--xla_dump_to={dump}",
               PYTHONPATH=os.pathsep.join([here, os.path.dirname(here),
                                           os.environ.get("PYTHONPATH", "")]))
    code = ("import benchmarks.kernel_bench as kb, jax;"
            "a, c = kb.bench_inputs(jax.random.PRNGKey(0), 8, 4096, 84);"
            f"o, c, _ = kb.VARIANTS[{variant!r}];"
            "fwd, fb = kb.kernel_fns(kb.dataclasses.replace(kb.gpu.DEFAULT_CONFIG, **o), c);"
            "fb.lower(*a, *c).compile()")
    subprocess.run([sys.executable, "-c", code], env=env, check=True)
    ptx_files = sorted(glob.glob(os.path.join(dump, "*.ptx")), key=os.path.getsize)[-3:]
    print(f"[ptxas] {len(glob.glob(os.path.join(dump, '*')))} dumped files; PTX: {ptx_files}")
    ptxas = os.path.join(os.path.dirname(__import__("triton").__file__),
                         "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        ptxas = "ptxas"
    for path in ptx_files:
        result = subprocess.run([ptxas, "-arch=sm_90", "-v", path, "-o", "/dev/null"],
                                capture_output=True, text=True)
        for line in (result.stdout + result.stderr).splitlines():
            if "entry function" in line or "Used" in line or "spill" in line:
                print("[ptxas]", line.strip())
        if out_dir:
            import shutil
            shutil.copy(path, os.path.join(out_dir, os.path.basename(path)[-60:]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="all",
                        help="comma-separated variant/ablation names to time at 8×4096×84, "
                             "'all' (variants and ablations) or 'none'")
    parser.add_argument("--shapes", default="all",
                        help="op shapes to time: 'all', 'first' (8×4096×84 only) or 'none'")
    parser.add_argument("--op-backend", default="auto",
                        help="backend of the op timings: auto (Mosaic kernels on a Hopper GPU "
                             "for bf16 K=64 V=16, else Triton), pallas_gpu or mosaic_gpu")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=12, help="parallel compilations")
    parser.add_argument("--ptx", metavar="VARIANT",
                        help="also dump this variant's kernel PTX and print ptxas register use")
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

    if args.ptx:
        try:
            dump_ptx_and_registers(args.out, args.ptx)
        except Exception as err:
            print(f"[ptxas] failed: {type(err).__name__}: {err}"[:500], flush=True)

    key = jax.random.PRNGKey(0)
    for name, worst, _ in ([] if args.smoke else check_float32(jax.random.fold_in(key, 1))):
        emit({"kind": "check_f32", "case": name, "worst_rel_err": worst, "pass": worst < 1e-4})
    print(f"f32 checks done at {time.time() - started:.0f} s", flush=True)

    # Jobs: bf16 check at the paper's head shape on a short sequence (vs the scan on the GPU),
    # then forward / forward+backward timings at 8×4096×84, then the op at every shape.
    check_shape = (1, 64, 4) if args.smoke else (4, 256, 84)
    check_args, check_cot = bench_inputs(jax.random.fold_in(key, 2), *check_shape)
    check_cot = (check_cot[0], jax.random.normal(jax.random.fold_in(key, 3),
                                                 check_cot[1].shape))
    main_args, main_cot = bench_inputs(jax.random.fold_in(key, 4), *SHAPES[0])
    jobs = [{"name": "scan", "what": "check", "fn": scan_fns(), "args": (*check_args, *check_cot)}]
    names = (list(VARIANTS) + list(ABLATIONS)) if args.variants == "all" else (
        [] if args.variants == "none" else args.variants.split(","))
    if "default" not in names:
        names.insert(0, "default")
    for name in names:
        if name in VARIANTS:
            overrides, chunk, with_backward = VARIANTS[name]
            patch = None
        else:
            overrides, chunk = {}, gpu.DEFAULT_CHUNK_SIZE
            patch, with_backward = ABLATIONS[name]
        config = dataclasses.replace(gpu.DEFAULT_CONFIG, **overrides)
        forward, forward_backward = kernel_fns(config, chunk)
        common = {"name": name, "patch": patch, "config": config, "chunk": chunk}
        if patch is None:
            jobs.append({**common, "what": "check", "fn": forward_backward,
                         "args": (*check_args, *check_cot)})
        jobs.append({**common, "what": "fwd", "fn": forward, "args": main_args})
        if with_backward:
            jobs.append({**common, "what": "fwd_bwd", "fn": forward_backward,
                         "args": (*main_args, *main_cot)})
    shapes = {"all": SHAPES, "first": SHAPES[:1], "none": []}[args.shapes]
    for batch, seq_len, heads in shapes:
        (q, k, v, w, f, _), (dy, _) = bench_inputs(jax.random.fold_in(key, seq_len),
                                                    batch, seq_len, heads)
        op_forward, op_forward_backward = op_fns(args.op_backend)
        shape = (batch, seq_len, heads)
        label = resolve_backend(args.op_backend, q, k, v, w, f)
        jobs.append({"name": "op", "shape": shape, "what": "fwd", "fn": op_forward,
                     "args": (q, k, v, w, f), "backend": label})
        jobs.append({"name": "op", "shape": shape, "what": "fwd_bwd", "fn": op_forward_backward,
                     "args": (q, k, v, w, f, dy), "backend": label})

    compile_all(jobs, args.workers)
    print(f"compiled {len(jobs)} jobs at {time.time() - started:.0f} s", flush=True)

    scan_out = flatten(jobs[0]["compiled"](*jobs[0]["args"]))
    results = {}
    for job in jobs[1:]:
        slot = results.setdefault((job["name"], tuple(job.get("shape", SHAPES[0]))), {})
        if "error" in job:
            slot.setdefault("errors", []).append(f"{job['what']}: {job['error']}")
            continue
        try:
            if job["what"] == "check":
                got = flatten(job["compiled"](*job["args"]))
                errors = [relative_error(g, w) for g, w in zip(got, scan_out)]
                slot["bf16_rel_err_S256"] = max(errors)
                slot["bf16_errs"] = [float(f"{e:.2e}") for e in errors]
            else:
                seconds = median_seconds(job["compiled"], *job["args"], repeats=args.reps)
                slot[f"{job['what']}_ms"] = seconds * 1e3
                if job["what"] == "fwd_bwd" and job["name"] == "op":
                    slot["extra_mem_gib"] = extra_memory_gib(job["compiled"])
        except Exception as err:
            slot.setdefault("errors", []).append(f"{job['what']}: {type(err).__name__}: {err}"[:800])
        if "backend" in job:
            slot["backend"] = job["backend"]
        if "config" in job:
            slot["config"] = {**dataclasses.asdict(job["config"]), "chunk": job["chunk"]}
        print(f"[done] {job['name']} {job.get('shape', '')} {job['what']} "
              f"{ {k: v for k, v in slot.items() if k != 'config'} }", flush=True)
    for (name, shape), slot in results.items():
        emit({"kind": "op" if name == "op" else "variant", "variant": name, "shape": shape,
              **slot})

    print(f"\n== summary ({time.time() - started:.0f} s) ==")
    for row in rows:
        if row["kind"] == "check_f32":
            print(f"check f32  {row['case']:<34} worst {row['worst_rel_err']:.1e} "
                  f"{'ok' if row['pass'] else 'FAIL'}")
    print(f"{'variant (8×4096×84)':<22}{'fwd ms':>9}{'fwd+bwd ms':>12}{'bf16 err':>10}")
    for row in rows:
        if row["kind"] == "variant":
            err = row.get("bf16_rel_err_S256")
            print(f"{row['variant']:<22}{row.get('fwd_ms', float('nan')):>9.2f}"
                  f"{row.get('fwd_bwd_ms', float('nan')):>12.2f}"
                  f"{'' if err is None else f'{err:.1e}':>10}"
                  + (f"  ERR {row['errors']}"[:300] if "errors" in row else ""))
    print(f"{'op B×S×N':<22}{'fwd ms':>9}{'fwd+bwd ms':>12}{'extra GiB':>10}  backend")
    for row in rows:
        if row["kind"] == "op":
            b, s_, n = row["shape"]
            print(f"{f'{b}×{s_}×{n}':<22}{row.get('fwd_ms', float('nan')):>9.2f}"
                  f"{row.get('fwd_bwd_ms', float('nan')):>12.2f}"
                  f"{row.get('extra_mem_gib', float('nan')):>10.3f}  {row.get('backend', '')}"
                  + (f"  ERR {row['errors']}"[:300] if "errors" in row else ""))


if __name__ == "__main__":
    main()
