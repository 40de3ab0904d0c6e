"""benchmarks/triton_registers.py's pieces that need no triton package: the Triton modules
captured from Pallas' lowering for an H200 on this CPU machine, ptxas output parsing and the
programs-per-SM arithmetic. (Compiling the modules needs the triton package, which the library
does not depend on; the script is run by hand.)"""

import os
import sys

import jax.numpy as jnp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import triton_registers  # noqa: E402


def test_captures_the_vector_kernels_triton_modules(monkeypatch):
    from pallas_kernels.m2rnn import gpu_vector

    monkeypatch.setattr(gpu_vector, "_interpret", lambda: False)
    config = gpu_vector.VectorKernelConfig(unroll=2, subchunk=1, num_warps=8, backward_num_warps=8)
    calls = triton_registers.vector_kernel_calls(config, 40, 16, 2, 5, 8, jnp.float32)
    assert [(name, warps) for name, _, _, warps in calls] == [("forward", 8), ("backward", 8)]
    for name, fn, args, _ in calls:
        (module,) = triton_registers.capture_triton_modules(fn, *args)
        assert f"tt.func public @m2rnn_vector_{name}" in module
        assert "tt.dot" in module and "loc(" not in module  # no debug info to trip parsers


def test_captures_the_sequence_kernels_triton_modules(monkeypatch):
    from pallas_kernels.m2rnn import gpu

    monkeypatch.setattr(gpu, "_interpret", lambda: False)
    calls = triton_registers.sequence_kernel_calls(gpu.KernelConfig(), 2, 16, 2, 64, 16, 8,
                                                   jnp.bfloat16)
    assert [(name, warps) for name, _, _, warps in calls] == [("forward", 4), ("backward", 4)]
    for name, fn, args, _ in calls:
        (module,) = triton_registers.capture_triton_modules(fn, *args)
        assert f"tt.func public @m2rnn_{name}" in module and "tt.dot" in module


def test_ptxas_output_and_occupancy():
    text = """ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function 'm2rnn_vector_forward' for 'sm_90a'
ptxas info    : Function properties for m2rnn_vector_forward
    288 bytes stack frame, 944 bytes spill stores, 1064 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 288 bytes cumulative stack size
ptxas info    : Compiling entry function 'other' for 'sm_90a'
ptxas info    : Function properties for other
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers"""
    assert triton_registers.parse_ptxas(text) == {
        "m2rnn_vector_forward": {"registers": 255, "spill_stores": 944, "spill_loads": 1064,
                                 "stack": 288},
        "other": {"registers": 40, "spill_stores": 0, "spill_loads": 0, "stack": 0}}
    with pytest.raises(ValueError, match="no register counts"):
        triton_registers.parse_ptxas("ptxas info    : 11 bytes gmem")
    # 255 registers -> 256 per thread: one 8-warp program fills the 64K register file.
    assert triton_registers.programs_per_sm(255, 8, 20 * 1024) == 1
    assert triton_registers.programs_per_sm(32, 8, 20 * 1024) == 8     # threads: 2048 / 256
    assert triton_registers.programs_per_sm(32, 4, 40 * 1024) == 5     # shared: 228 / 40 KiB
    assert triton_registers.programs_per_sm(100, 4, 0) == 4            # 104 regs: 65536 / 13312
    assert triton_registers.parse_configs("default; unroll=2,float32_dots=split") == [
        ("default", {}), ("unroll=2,float32_dots=split", {"unroll": 2, "float32_dots": "split"})]
