"""Optimizer steps per second of the state-tracking training loop, as the experiment runs it.

Run from the repository root (GPU), with the package installed:

    python benchmarks/state_tracking_bench.py [--config FILE] [--group S5] [--lengths 4 64]
        [--dispatch 1 64] [--seeds 1 3] [--seconds 6] [--profile DIR] [--set KEY=VALUE]

For each scored length L (the curriculum's width: positions past it are not computed), steps
per call N (``train.steps_per_dispatch``: 1 is a host-drawn batch per jitted step, N > 1 a
``lax.scan`` of N steps drawing its words on the device) and seeds per step K
(``train.seeds_per_step``, vmapped), the config's first model is trained by
``ModelRunner.run_seeds``, the loop the experiment uses (its logging and read-backs): two calls
to compile and size the run, then fresh seeds for about ``--seconds`` (three calls at least).
Reported: seed-steps per second (K × steps over the timed calls' wall time, the first call
excluded), ms per step (of all K seeds) and the gain over one seed at one step per call at the
same length. ``--profile DIR`` traces one more run of the last point and prints its busiest GPU
kernels. ``--set`` overrides a config key as the experiment's flag does, e.g. the M²RNN's
backend: ``--set models.shipped.m2rnn.backend=scan``.
"""

import argparse
import contextlib
import dataclasses
import io
import os
import sys

import jax

from m2rnn_experiments.state_tracking import cli
from m2rnn_experiments.state_tracking.training import ModelRunner

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trace_summary  # noqa: E402  (benchmarks/trace_summary.py)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(cli.CONFIG_DIR / "recipe.yaml"))
    p.add_argument("--group", help="the word problems' group (default the config's)")
    p.add_argument("--model", help="a model of the config (default its first in run)")
    p.add_argument("--lengths", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--dispatch", type=int, nargs="+", default=[1, 64],
                   help="steps per jitted call")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 3], help="seeds per step")
    p.add_argument("--batch-size", type=int, help="words per step (default the config's)")
    p.add_argument("--seconds", type=float, default=6.0, help="timed training per point")
    p.add_argument("--profile", metavar="DIR",
                   help="trace the last point's training; print its busiest kernels")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), as m2rnn-state-tracking's --set")
    return p.parse_args(argv)


def fixed_task(task, length):
    """``task`` at one scored length, no curriculum, evaluated briefly at that length."""
    return dataclasses.replace(task, train_length=length, curriculum_accuracy=None,
                               curriculum_steps=0, eval_lengths=[length], eval_sequences=128)


def run_calls(runner, group, task, seeds, calls):
    """Fresh seeds ``0..seeds-1`` trained for ``calls`` calls of ``runner``; the first's
    ``RunResult``."""
    steps = calls * runner.train_config.steps_per_dispatch
    runner.train_config = dataclasses.replace(runner.train_config, steps=steps)
    with contextlib.redirect_stdout(io.StringIO()):  # the runs' schedule notes
        return runner.run_seeds(list(range(seeds)), group, task, progress=False)[0]


def time_point(runner, group, task, length, seeds, seconds):
    """``(seed-steps per second, first call's seconds)`` of ``run_seeds`` at ``length``: a run
    of two calls compiles and sizes a timed run of about ``seconds`` (three calls at least)."""
    fixed = fixed_task(task, length)
    n = runner.train_config.steps_per_dispatch
    warm = run_calls(runner, group, fixed, seeds, 2)
    timed = run_calls(runner, group, fixed, seeds,
                      1 + max(3, round(seconds / max(warm.train_s, 1e-6))))
    # The first call's steps fall in compile_s.
    return seeds * (timed.steps - n) / timed.train_s, warm.compile_s


def main(argv=None):
    args = parse_args(argv)
    flags = ["--config", args.config, *(["--group", args.group] if args.group else [])]
    if args.batch_size:
        flags += ["--batch-size", str(args.batch_size)]
    for assignment in args.set:
        flags += ["--set", assignment]
    config, _ = cli.load_config(cli.parse_args(flags))
    group = cli.build_group(config.task)
    name = args.model or config.model_names[0]
    base = dataclasses.replace(config.train, checkpoint_every_s=None, time_budget_s=None,
                               word_generator="auto")
    print(f"{name} on {group.name}, batch {base.batch_size}, {jax.devices()[0].device_kind}, "
          f"jax {jax.__version__}", flush=True)
    rows, runner = [], None
    for length in args.lengths:
        for n in args.dispatch:
            for k in args.seeds:
                train = dataclasses.replace(base, steps_per_dispatch=n, seeds_per_step=k)
                runner = ModelRunner(name, config.model_config(name, group.order), train)
                rate, first_s = time_point(runner, group, config.task, length, k, args.seconds)
                rows.append((length, n, k, rate, first_s))
                print(f"L={length} N={n} K={k}: {rate:,.0f} seed-steps/s "
                      f"(first call {first_s:.1f} s)", flush=True)
    if args.profile:
        with jax.profiler.trace(args.profile, create_perfetto_trace=True):
            run_calls(runner, group, fixed_task(config.task, args.lengths[-1]),
                      args.seeds[-1], 1)
        events = trace_summary.read_events(trace_summary.find_trace(args.profile))
        trace_summary.print_summary(trace_summary.summarize(events, "GPU"), threads=2)
    one = {length: rate for length, n, k, rate, _ in rows if n == 1 and k == 1}
    print("\n| length | steps per call | seeds per step | seed-steps/s | ms per step | gain |")
    print("| --- | --- | --- | --- | --- | --- |")
    for length, n, k, rate, _ in rows:
        gain = f"{rate / one[length]:.2f}x" if length in one else "-"
        print(f"| {length} | {n} | {k} | {rate:,.0f} | {1e3 * k / rate:.2f} | {gain} |")
    return rows


if __name__ == "__main__":
    main()
