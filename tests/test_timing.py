"""benchmarks/timing.py: the median rule (host clock, sleeping stand-ins for device work)."""

import os
import sys
import time

import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import timing  # noqa: E402


def test_median_seconds_skips_the_warm_up_and_takes_the_median():
    durations = iter([0.05, 0.05, 0.002, 0.03, 0.004])  # 2 warm-up calls, then 3 timed
    calls = []

    def fn(x):
        calls.append(x)
        time.sleep(next(durations))
        return x + 1

    got = timing.median_seconds(fn, jnp.ones(3), repeats=3, warmup=2)
    assert len(calls) == 5
    assert 0.004 <= got < 0.03  # the median of 2, 30 and 4 ms; the 50 ms warm-ups are left out
