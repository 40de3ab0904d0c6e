"""benchmarks/timing.py: interleaved timing of several calls (host clock, sleeping stand-ins
for device work)."""

import os
import sys
import time

import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import timing  # noqa: E402


def _sleeper(seconds, log, name):
    def fn(x):
        log.append(name)
        time.sleep(seconds)
        return x + 1

    return fn


def test_interleaved_medians_time_each_entry_in_turn():
    log = []
    x = jnp.ones(3)
    calls = {"short": (_sleeper(0.002, log, "short"), (x,)),
             "long": (_sleeper(0.012, log, "long"), (x,))}
    got = timing.interleaved_medians(calls, rounds=3, repeats=2, warmup=1)
    assert set(got) == {"short", "long"}
    (short, short_spread), (long, long_spread) = got["short"], got["long"]
    assert 0.002 <= short < 0.012 <= long < 0.1
    assert short_spread >= 0 and long_spread >= 0
    # Warm-up of each, then rounds that alternate: never all of one entry's calls in a row.
    assert log[:2] == ["short", "long"]
    assert log[2:] == (["short"] * 2 + ["long"] * 2) * 3
