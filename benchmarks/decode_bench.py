"""Decode speed and memory against context length: the 400M hybrid vs an attention-only model.

Run from the repository root (GPU), with the package installed:

    python benchmarks/decode_bench.py [--quick] [--contexts L ...] [--out FILE]

For each model (``configs/model/hybrid_400m.yaml`` and the same model with every layer
attention, ``A`` × 24, ~406M parameters), batch (1, 32) and context length L (1K, 4K, 16K, 64K;
``--quick``: 1K, 16K), the caches are built as they stand after a prompt of L tokens (M²RNN:
the (B, N, K, V) float32 state and the conv ring; attention: a KV cache of L + steps), then
``--steps`` greedy decode steps are timed after warm-up, two ways: one dispatch per token
(``Generator.step``: one jit-compiled decode step + argmax each, the tokens fed back by the
host) and all
``--steps`` tokens in one dispatch (``Generator.decode``: the loop on the device, what
``Generator.generate`` runs). No prompt is run: the caches are filled
synthetically (zeros, attention's first L steps marked visible), since the time of a step does
not depend on their contents; so a 64K context needs no 64K prefill. A point whose caches (from
the shapes) do not fit in ``--memory-fraction`` of the device memory left free is recorded as
``OOM (needs X GiB ...)`` without allocating anything (e.g. attention-only at batch 32 x 64K:
~192 GiB of KV cache against an H200's 141 GB); an out-of-memory error while running is
recorded the same way instead of ending the script. ``--memory-limit-gib`` sets the device
memory by hand (where the backend reports none, e.g. CPU, to test that path). Parameters are
cast to ``--param-dtype`` (bfloat16 by default, as for serving); compute is bfloat16.

Rows are appended to ``--out`` (JSON lines) as they are measured, so an interrupted run keeps
its points; ``--contexts`` and ``--batches`` pick the points to (re)measure.

Columns: decode tokens/s (batch × steps / time) and ms per step with the loop on the device,
the same with one dispatch per token, cache GiB (from the shapes),
device GiB in use during decoding (parameters + caches + workspace; where the backend reports
it); the JSON rows also give the first step's time (compilation included). ``--tiny`` runs the
tiny configs at short contexts, a smoke test for CPU.

``--profile DIR`` then traces one more dispatch of the loop per point (``jax.profiler``, trace in
``DIR/<model>_b<batch>_<context>``) and prints, per decode step (a token per row; "per token"
in the JSON's names), the busiest device timeline's busy time against the wall time and its
busiest kernels (count and µs): where a step's time goes (``profile`` in the JSON rows).
"""

import argparse
import dataclasses
import json
import os
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from m2rnn_jax import HybridLM, ModelConfig
from m2rnn_jax.generation import Generator
from m2rnn_jax.typed_config import load_yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trace_summary  # noqa: E402  (benchmarks/trace_summary.py)

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "model"
GiB = 2 ** 30


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="contexts 1K and 16K only")
    parser.add_argument("--tiny", action="store_true", help="tiny configs, short contexts (CPU)")
    parser.add_argument("--contexts", type=int, nargs="*", default=None)
    parser.add_argument("--batches", type=int, nargs="*", default=[1, 32])
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (>= 1)")
    parser.add_argument("--param-dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--memory-fraction", type=float, default=0.85)
    parser.add_argument("--memory-limit-gib", type=float, default=None,
                        help="device memory to plan against (default: what the backend reports)")
    parser.add_argument("--models", default="hybrid,attention-only")
    parser.add_argument("--out", default=None, help="also write the rows as JSON lines here")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="trace one more dispatch of the loop per point into DIR")
    parser.add_argument("--profile-top", type=int, default=12, help="kernels listed per point")
    return parser.parse_args(argv)


def model_configs(args):
    base = load_yaml(ModelConfig, CONFIGS / ("tiny_hybrid.yaml" if args.tiny else
                                             "hybrid_400m.yaml"))
    base = dataclasses.replace(base, compute_dtype="float32" if args.tiny else "bfloat16",
                               param_dtype=args.param_dtype)
    attention_only = dataclasses.replace(base, layer_pattern="A" * base.num_layers)
    return {"hybrid": base, "attention-only": attention_only}


def synthetic_caches(model, batch, context, max_len):
    """Caches as after a prompt of ``context`` tokens, with zero contents."""
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    _, shapes = nnx.eval_shape(lambda m, t: m.prefill(t, None, max_len=max_len), model, tokens)

    def fill(cache):
        cache = {name: jnp.zeros(s.shape, s.dtype) for name, s in cache.items()}
        if "key" in cache:  # attention: the first `context` steps are filled and visible
            cache["length"] = jnp.asarray(context, jnp.int32)
            cache["position"] = jnp.full((batch,), context, jnp.int32)
            cache["visible"] = jnp.broadcast_to(jnp.arange(max_len) < context, (batch, max_len))
        return cache

    return [fill(c) for c in shapes]


def nbytes(tree):
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def device_bytes_in_use(args=None):
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    if args is not None and args.memory_limit_gib is not None:
        limit = args.memory_limit_gib * GiB
    return stats.get("bytes_in_use", 0 if limit else None), limit


def is_out_of_memory(err) -> bool:
    return "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower()


def cache_length(context, args):
    """Steps the caches hold: the context, the warm-up, three runs of ``--steps`` (one dispatch
    per token, then the loop twice) and, with ``--profile``, the traced one."""
    return context + args.warmup + (4 if args.profile else 3) * args.steps + 1


def bench_one(generator, model, batch, context, args, name="model"):
    max_len = cache_length(context, args)
    _, shapes = nnx.eval_shape(lambda m, t: m.prefill(t, None, max_len=max_len), model,
                               jax.ShapeDtypeStruct((batch, 1), jnp.int32))
    cache_bytes = nbytes(shapes)
    in_use, limit = device_bytes_in_use(args)
    needs = (cache_bytes + (in_use or 0)) / GiB
    if limit and in_use is not None and cache_bytes > args.memory_fraction * limit - in_use:
        return dict(cache_gib=cache_bytes / GiB, skipped=(
            f"OOM (needs {needs:.3g} GiB: cache {cache_bytes / GiB:.3g} + in use "
            f"{in_use / GiB:.3g}; {args.memory_fraction:.0%} of {limit / GiB:.3g} GiB "
            f"available)"))
    try:
        return run_point(generator, model, batch, context, args, max_len, cache_bytes, name)
    except Exception as err:  # noqa: BLE001 — only out-of-memory is recorded, not raised
        if not is_out_of_memory(err):
            raise
        return dict(cache_gib=cache_bytes / GiB, skipped=(
            f"OOM while running (needs more than {needs:.3g} GiB from the shapes; "
            f"{str(err).splitlines()[0][:160]})"))


def run_point(generator, model, batch, context, args, max_len, cache_bytes, name):
    caches = synthetic_caches(model, batch, context, max_len)
    tokens = jnp.zeros((batch,), jnp.int32)
    start = time.perf_counter()
    tokens, caches = generator.step(tokens, caches)  # compiles
    jax.block_until_ready((tokens, caches))
    compile_s = time.perf_counter() - start
    for _ in range(args.warmup - 1):
        tokens, caches = generator.step(tokens, caches)
    jax.block_until_ready((tokens, caches))
    start = time.perf_counter()
    for _ in range(args.steps):
        tokens, caches = generator.step(tokens, caches)
    jax.block_until_ready((tokens, caches))
    seconds = time.perf_counter() - start
    key = jax.random.key(0)
    loop_seconds = []
    for _ in range(2):  # the first call compiles the loop
        start = time.perf_counter()
        new, caches = generator.decode(tokens, caches, args.steps, key=key)
        jax.block_until_ready((new, caches))
        loop_seconds.append(time.perf_counter() - start)
        tokens = new[-1]
    in_use, _ = device_bytes_in_use()
    profile = None
    if args.profile:
        profile, caches = profile_loop(generator, new[-1], caches, key, args,
                                       f"{name}_b{batch}_{context}", loop_seconds[1])
    del caches
    return dict(profile=profile, tokens_per_s=batch * args.steps / loop_seconds[1],
                ms_per_step=1e3 * loop_seconds[1] / args.steps,
                dispatch_tokens_per_s=batch * args.steps / seconds,
                dispatch_ms_per_step=1e3 * seconds / args.steps,
                cache_gib=cache_bytes / GiB, first_step_s=compile_s,
                loop_compile_s=loop_seconds[0],
                device_gib=None if in_use is None else in_use / GiB)


def profile_loop(generator, tokens, caches, key, args, point, wall_seconds):
    """One more dispatch of ``--steps`` tokens under ``jax.profiler``; prints and returns, per
    token, the busiest device timeline's busy µs against the wall µs of the timed dispatch, and
    its busiest kernels. Returns ``(profile, caches)``."""
    directory = os.path.join(args.profile, point)
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        new, caches = generator.decode(tokens, caches, args.steps, key=key)
        jax.block_until_ready((new, caches))
    on_gpu = jax.devices()[0].platform == "gpu"
    events = trace_summary.read_events(trace_summary.find_trace(directory))
    rows = trace_summary.summarize(events, "GPU" if on_gpu else "", args.profile_top)
    if not rows:
        return None, caches
    process, thread, busy, count, ranked = rows[0]
    steps = args.steps
    profile = {"timeline": f"{process} / {thread}", "busy_us_per_token": busy / steps,
               "wall_us_per_token": 1e6 * wall_seconds / steps,
               "kernels_per_token": count / steps,
               "top": [{"name": name, "us_per_token": total / steps, "per_token": calls / steps}
                       for name, total, calls in ranked]}
    print(f"  {point}: busy {profile['busy_us_per_token']:.0f} of "
          f"{profile['wall_us_per_token']:.0f} us per step ({process} / {thread}), "
          f"{profile['kernels_per_token']:.0f} events per step:", flush=True)
    for entry in profile["top"]:
        print(f"    {entry['us_per_token']:8.1f} us {entry['per_token']:5.1f}x  "
              f"{entry['name'][:80]}", flush=True)
    return profile, caches


def main(argv=None):
    args = parse_args(argv)
    # One handwritten ThreeFry kernel instead of a compiled hash per parameter init (faster
    # compiles of the eager random init on GPU; no effect elsewhere).
    jax.config.update("jax_threefry_gpu_kernel_lowering", True)
    if args.warmup < 1 or args.steps < 1:
        sys.exit("decode_bench: --warmup and --steps must be >= 1")
    contexts = args.contexts or ([64, 256] if args.tiny else
                                 [1024, 16384] if args.quick else [1024, 4096, 16384, 65536])
    print(f"device: {jax.devices()[0].device_kind}; steps {args.steps}; params "
          f"{args.param_dtype}", flush=True)
    rows = []
    begin = time.perf_counter()
    if args.out:
        open(args.out, "w").close()
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    for name, config in model_configs(args).items():
        if name not in wanted:
            continue
        start = time.perf_counter()
        model = HybridLM(config, rngs=nnx.Rngs(0))
        jax.block_until_ready(nnx.state(model))
        print(f"{name}: model built in {time.perf_counter() - start:.1f} s", flush=True)
        params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
        generator = Generator(model)
        for batch in args.batches:
            for context in contexts:
                row = dict(model=name, params_m=params / 1e6, batch=batch, context=context)
                row.update(bench_one(generator, model, batch, context, args, name))
                rows.append(row)
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as fh:
                        fh.write(json.dumps(row) + "\n")
        del model, generator
    print(f"\n{'':<30}{'loop on device':>20}{'dispatch per token':>20}")
    print(f"{'model':<15}{'batch':>6}{'context':>9}{'tok/s':>11}{'ms/step':>9}{'tok/s':>11}"
          f"{'ms/step':>9}{'cache GiB':>11}{'device GiB':>12}")
    for r in rows:
        if "skipped" in r:
            print(f"{r['model']:<15}{r['batch']:>6}{r['context']:>9}{'—':>11}{'—':>9}{'—':>11}"
                  f"{'—':>9}{r['cache_gib']:>11.2f}   {r['skipped']}")
            continue
        device = "n/a" if r["device_gib"] is None else f"{r['device_gib']:.2f}"
        print(f"{r['model']:<15}{r['batch']:>6}{r['context']:>9}{r['tokens_per_s']:>11.0f}"
              f"{r['ms_per_step']:>9.2f}{r['dispatch_tokens_per_s']:>11.0f}"
              f"{r['dispatch_ms_per_step']:>9.2f}{r['cache_gib']:>11.2f}{device:>12}")
    print(f"total {time.perf_counter() - begin:.0f} s")


if __name__ == "__main__":
    sys.exit(main())
