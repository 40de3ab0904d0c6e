"""The one timing rule of the benchmarks: median wall time of repeated calls after warm-up."""

import statistics
import time

import jax


def median_seconds(fn, *args, repeats, warmup=2):
    """Median seconds of ``fn(*args)`` over ``repeats`` calls, after ``warmup`` untimed calls
    (the first compiles); each call is waited for with ``block_until_ready``."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(calls, *, rounds=5, repeats=4, warmup=2):
    """``{name: (median seconds, spread)}`` for ``calls = {name: (fn, args)}``, timed in
    ``rounds`` rounds that each call every entry ``repeats`` times in turn, after ``warmup``
    untimed calls of each. A slow drift of the device (clocks, a neighbour's load) then falls
    on every entry alike instead of on whichever ran during it, and the spread (largest minus
    smallest of an entry's per-round medians) says how far its number moves within one call:
    a difference between two entries smaller than their spreads is noise."""
    for fn, args in calls.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*args))
    samples = {name: [] for name in calls}
    round_medians = {name: [] for name in calls}
    for _ in range(rounds):
        for name, (fn, args) in calls.items():
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times.append(time.perf_counter() - start)
            samples[name] += times
            round_medians[name].append(statistics.median(times))
    return {name: (statistics.median(samples[name]),
                   max(round_medians[name]) - min(round_medians[name])) for name in calls}
