"""benchmarks/trace_summary.py on a hand-made trace (the format jax.profiler's perfetto traces
use) and on a real CPU trace of a jitted function."""

import gzip
import json
import os
import sys

import jax
import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import trace_summary  # noqa: E402


def _trace(tmp_path):
    events = [
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
        {"ph": "M", "pid": 1, "tid": 7, "name": "thread_name", "args": {"name": "Stream #13"}},
        {"ph": "M", "pid": 1, "tid": 8, "name": "thread_name", "args": {"name": "XLA Ops"}},
        {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
        {"ph": "X", "pid": 1, "tid": 7, "name": "fusion_1", "ts": 0, "dur": 30.0},
        {"ph": "X", "pid": 1, "tid": 7, "name": "m2rnn_forward", "ts": 40, "dur": 100.0},
        {"ph": "X", "pid": 1, "tid": 7, "name": "fusion_1", "ts": 150, "dur": 20.0},
        {"ph": "X", "pid": 1, "tid": 8, "name": "fusion_1", "ts": 0, "dur": 50.0},
        {"ph": "X", "pid": 2, "tid": 3, "name": "PjitFunction", "ts": 0, "dur": 999.0},
        {"ph": "i", "pid": 1, "tid": 7, "name": "marker", "ts": 5},
    ]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    return path


def test_summary_per_device_timeline(tmp_path, capsys):
    path = _trace(tmp_path)
    rows = trace_summary.summarize(trace_summary.read_events(str(path)), "gpu")
    assert [(r[0], r[1], r[2], r[3]) for r in rows] == [
        ("/device:GPU:0", "Stream #13", 150.0, 3), ("/device:GPU:0", "XLA Ops", 50.0, 1)]
    assert rows[0][4] == [("m2rnn_forward", 100.0, 1), ("fusion_1", 50.0, 2)]
    assert [r[1] for r in trace_summary.summarize(
        trace_summary.read_events(str(path)), "")] == ["3", "Stream #13", "XLA Ops"]
    trace_summary.main([str(tmp_path), "--top", "1"])  # a directory: finds the file
    out = capsys.readouterr().out
    assert "Stream #13: 0.150 ms busy in 3 events" in out and "m2rnn_forward" in out
    assert "fusion_1" in out.split("XLA Ops")[1]
    with pytest.raises(SystemExit, match="no complete events"):
        trace_summary.main([str(path), "--process", "TPU"])
    with pytest.raises(SystemExit, match="no perfetto_trace"):
        trace_summary.main([str(tmp_path / "missing")])


def test_summary_of_a_real_cpu_trace(tmp_path, capsys):
    f = jax.jit(lambda x: jnp.tanh(x @ x).sum())
    x = jnp.ones((64, 64))
    f(x).block_until_ready()
    with jax.profiler.trace(str(tmp_path), create_perfetto_trace=True):
        for _ in range(3):
            f(x).block_until_ready()
    trace_summary.main([str(tmp_path), "--process", "CPU"])
    out = capsys.readouterr().out
    assert "/host:CPU" in out and "ms busy in" in out


def test_busy_kernels_found_in_the_optimized_hlo(tmp_path, capsys):
    """``--hlo``: the profiler's ``fusion_5`` is the HLO's ``fusion.5``; its line and the head
    of the computation it calls (up to its closing brace) are printed."""
    dump = tmp_path / "dump"
    dump.mkdir()
    (dump / "module_0001.jit_step.sm_9.0a_gpu_after_optimizations.txt").write_text("""HloModule m
%fused_transpose.6 (p0: f32[8,4]) -> f32[4,8] {
  %p0 = f32[8,4]{1,0} parameter(0)
  ROOT %t = f32[4,8]{1,0} transpose(%p0), dimensions={1,0}
}

%other_computation (p: f32[]) -> f32[] {
  ROOT %p = f32[] parameter(0)
}

ENTRY %main (x: f32[8,4]) -> f32[4,8] {
  %x = f32[8,4]{1,0} parameter(0)
  ROOT %input_transpose_fusion.5 = f32[4,8]{1,0} fusion(%x), kind=kInput, calls=%fused_transpose.6
}
""")
    found = trace_summary.hlo_definitions(str(dump), ["input_transpose_fusion_5", "absent_1"])
    assert list(found) == ["input_transpose_fusion_5"]
    text = found["input_transpose_fusion_5"].splitlines()
    assert text[0].startswith("ROOT %input_transpose_fusion.5 = f32[4,8]")
    assert "transpose(%p0)" in text[-2] and text[-1].strip() == "}"  # stops at the brace
    assert not any("other_computation" in line for line in text)
    trace = tmp_path / "trace"
    trace.mkdir()
    events = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
              {"ph": "X", "pid": 1, "tid": 7, "name": "input_transpose_fusion_5", "ts": 0,
               "dur": 30.0}]
    with gzip.open(trace / "perfetto_trace.json.gz", "wt") as fh:
        json.dump({"traceEvents": events}, fh)
    trace_summary.main([str(trace), "--hlo", str(dump)])
    out = capsys.readouterr().out
    assert "1 of 1 found" in out and "calls=%fused_transpose.6" in out
