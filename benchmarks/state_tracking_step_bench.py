"""Times one model's state-tracking train step under named variants (XLA flags, config changes).

The S5 runs are many small steps (batch 512, length <= 64, a 2-layer model of ~0.3M parameters):
their speed is set by per-step overheads (kernel launches, the scan's loop), not by the
arithmetic. Each variant runs in its own process (XLA_FLAGS must be set before JAX starts) and
times ``ModelRunner``'s jitted step the way training calls it: ``--steps`` steps dispatched
back to back, one wait at the end; the median over ``--reps`` such blocks after a warm-up.

    PYTHONPATH=. python3 benchmarks/state_tracking_step_bench.py \
        --config configs/state_tracking/s5_long.yaml --model m2rnn --widths 8,64 \
        --variants scan,unroll_auto,command_buffer_while [--seeds-per-step K]

``--seeds-per-step K`` times the step as ``run_seeds`` runs it for K seeds (vmapped over them);
the table's seed-steps/s is K steps per step. ``--profile DIR`` also records a ``jax.profiler``
trace of ``--steps`` steps of each variant and width after its timing (``DIR/<variant>_w<width>``)
and prints ``benchmarks/trace_summary.py``'s table of the busiest device timelines.
"""

import argparse
import dataclasses
import functools
import json
import os
import subprocess
import sys
import time

M2RNN = "models.m2rnn.m2rnn."
# name -> (XLA_FLAGS, config overrides[, a vector_kernel_bench.py CONFIGS name for the
# pallas_gpu_vector kernels])
VARIANTS = {
    "scan": ("", []),
    "unroll_auto": ("--xla_gpu_enable_while_loop_unrolling=WHILE_LOOP_UNROLLING_AUTO_UNROLL", []),
    "unroll_full": ("--xla_gpu_enable_while_loop_unrolling=WHILE_LOOP_UNROLLING_FULL_UNROLL", []),
    # CUDA graphs that also capture the scan's while loops: no host round trip per iteration.
    "command_buffer_while": ("--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,"
                             "WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1", []),
    "pallas_gpu": ("", [f"{M2RNN}backend=pallas_gpu"]),
    "pallas_gpu_vector": ("", [f"{M2RNN}backend=pallas_gpu_vector"]),
    # q, k, f and their gradients rearranged time-major, the default until the ninth session:
    # XLA then transposes the whole 1026-wide q|k|v tensor (H200: 8.12 against 6.28 ms).
    "pallas_gpu_vector_scalars_tm": ("", [f"{M2RNN}backend=pallas_gpu_vector"],
                                     "d_scalars_time_major"),
    "auto": ("", [f"{M2RNN}backend=auto"]),
}


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/state_tracking/s5_long.yaml")
    p.add_argument("--model", default="m2rnn")
    p.add_argument("--batch-size", type=int, help="default: the config's train.batch_size")
    p.add_argument("--widths", default="8,64", help="comma-separated step widths (lengths)")
    p.add_argument("--variants", default="scan,unroll_auto,command_buffer_while",
                   help=f"comma-separated names from {sorted(VARIANTS)}")
    p.add_argument("--seeds-per-step", type=int, default=1,
                   help="seeds in one vmapped step (train.seeds_per_step)")
    p.add_argument("--steps", type=int, default=50, help="steps per timed block")
    p.add_argument("--reps", type=int, default=5, help="timed blocks (the median is reported)")
    p.add_argument("--profile", metavar="DIR",
                   help="record a jax.profiler trace per variant and width under DIR")
    p.add_argument("--child", help=argparse.SUPPRESS)  # a variant's name: time it here
    args = p.parse_args(argv)
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {sorted(VARIANTS)}")
    return args


def time_variant(args):
    """Runs in the child process: JSON lines {variant, width, ms_per_step, compile_s}."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from m2rnn_experiments.state_tracking.cli import build_group, load_config, parse_args as cli_args
    from m2rnn_experiments.state_tracking.tasks import sample_word_problems
    from m2rnn_experiments.state_tracking.training import ModelRunner
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import trace_summary  # benchmarks/trace_summary.py

    overrides = sum((["--set", s] for s in VARIANTS[args.child][1]), [])
    if len(VARIANTS[args.child]) > 2:
        import vector_kernel_bench  # benchmarks/vector_kernel_bench.py

        vector_kernel_bench.with_config(VARIANTS[args.child][2])
    config, _ = load_config(cli_args(["--config", args.config, "--models", args.model]
                                     + overrides))
    group = build_group(config.task)
    train = config.train if args.batch_size is None else \
        dataclasses.replace(config.train, batch_size=args.batch_size)
    runner = ModelRunner(args.model, config.model_config(args.model, group.order), train)
    rng = np.random.default_rng(0)
    k = args.seeds_per_step
    stack = functools.partial(jax.tree.map, lambda *xs: jnp.stack(xs))
    for width in (int(w) for w in args.widths.split(",")):
        # The runner's step is vmapped over a leading seed axis (run_seeds): K seeds.
        params = stack(*[runner.init_params(seed) for seed in range(k)])
        opt_state = stack(*[runner.optimizer.init(runner.init_params(seed))
                            for seed in range(k)])
        batches = []
        for _ in range(4):
            words = [sample_word_problems(group, rng, train.batch_size, width) for _ in range(k)]
            batches.append([np.stack([getattr(w, name) for w in words])
                            for name in ("tokens", "targets", "mask")])
        start = time.perf_counter()
        step = functools.partial(runner._train_step,
                                 noise_root=jax.vmap(jax.random.key)(np.arange(k)),
                                 step=np.zeros(k, np.int32), lr_factor=np.ones(k, np.float32))
        for i in range(3):  # compile, then warm up
            params, opt_state, loss, _ = step(params, opt_state, *batches[i % len(batches)])
            loss.block_until_ready()
            if i == 0:
                compile_s = time.perf_counter() - start
        times = []
        for _ in range(args.reps):
            start = time.perf_counter()
            for i in range(args.steps):
                params, opt_state, loss, _ = step(params, opt_state, *batches[i % len(batches)])
            loss.block_until_ready()
            times.append((time.perf_counter() - start) / args.steps)
        if args.profile:
            trace_dir = os.path.join(args.profile, f"{args.child}_w{width}")
            with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
                for i in range(args.steps):
                    params, opt_state, loss, _ = step(params, opt_state,
                                                      *batches[i % len(batches)])
                loss.block_until_ready()
            try:  # the device's timelines ("/device:GPU:0", or "/host:CPU" on a CPU)
                trace_summary.main([trace_dir, "--top", "12", "--threads", "4", "--process",
                                    jax.devices()[0].platform.upper()])
            except SystemExit as err:
                print(f"trace summary: {err}", flush=True)
        print(json.dumps({"variant": args.child, "width": width, "seeds_per_step": k,
                          "compile_s": compile_s,
                          "ms_per_step": 1e3 * float(np.median(times)),
                          "device": str(jax.devices()[0].device_kind)}), flush=True)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.child:
        time_variant(args)
        return
    rows = []
    for name in args.variants.split(","):
        flags = " ".join(f for f in (os.environ.get("XLA_FLAGS", ""), VARIANTS[name][0]) if f)
        cmd = [sys.executable, __file__, "--child", name, "--config", args.config, "--model",
               args.model, "--widths", args.widths, "--steps", str(args.steps), "--reps",
               str(args.reps), "--seeds-per-step", str(args.seeds_per_step)] + (
                   ["--profile", args.profile] if args.profile else []) + (
                   [] if args.batch_size is None else
                                  ["--batch-size", str(args.batch_size)])
        proc = subprocess.run(cmd, env={**os.environ, "XLA_FLAGS": flags}, capture_output=True,
                              text=True)
        found = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0:
            print(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}", flush=True)
        if args.profile:  # the child's trace summaries
            print("\n".join(line for line in proc.stdout.splitlines()
                            if not line.startswith("{")), flush=True)
        for row in found:
            print(json.dumps(row), flush=True)
        rows += found
    print(f"\n{'variant':<22} {'width':>5} {'seeds':>5} {'ms/step':>8} {'seed-steps/s':>12} "
          f"{'compile s':>9}")
    for r in rows:
        k = r.get("seeds_per_step", 1)
        print(f"{r['variant']:<22} {r['width']:>5} {k:>5} {r['ms_per_step']:>8.2f} "
              f"{1e3 * k / r['ms_per_step']:>12.0f} {r['compile_s']:>9.1f}")


if __name__ == "__main__":
    main()
