"""The one timing rule of the benchmarks: median wall time of repeated calls after warm-up."""

import statistics
import time

import jax


def median_seconds(fn, *args, repeats, warmup=2):
    """Median seconds of ``fn(*args)`` over ``repeats`` calls, after ``warmup`` untimed calls
    (the first compiles); each call is waited for with ``block_until_ready``, so the time is
    the device's, not only the dispatch's."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
