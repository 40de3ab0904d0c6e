"""benchmarks/hopper_compile.py's parsing and occupancy arithmetic (the deviceless compile itself
needs JAX's CUDA plugin, which CI does not install), and ``platforms.lowered_for``."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.m2rnn import platforms

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import hopper_compile  # noqa: E402

PTXAS_REPORT = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function 'm2rnn_backward_mosaic_mosaic_gpu_kernel' for 'sm_90a'
ptxas info    : Function properties for m2rnn_backward_mosaic_mosaic_gpu_kernel
    0 bytes stack frame, {stores} bytes spill stores, {loads} bytes spill loads
ptxas info    : Used {registers} registers, used 2 barriers, 1 bytes smem
ptxas info    : Compile time = 106.883 ms
"""
RESOURCES_REPORT = ("Resources(smem_scratch_bytes={smem}, tmem_scratch_cols=0, "
                    "tmem_collective_scratch_cols=0, barrier_counts=Counter(), "
                    "scoped_gmem_semaphores={{}})")


def test_ptxas_and_resources_reports_parse():
    assert hopper_compile.parse_ptxas(PTXAS_REPORT.format(
        stores=0, loads=0, registers=209)) == (209, 0)
    assert hopper_compile.parse_ptxas(PTXAS_REPORT.format(
        stores=8, loads=12, registers=255)) == (255, 20)
    assert hopper_compile.parse_smem(RESOURCES_REPORT.format(smem=111616)) == 111616
    with pytest.raises(ValueError, match="ptxas"):
        hopper_compile.parse_ptxas("ptxas fatal: unresolved symbol")
    with pytest.raises(ValueError, match="resources"):
        hopper_compile.parse_smem("Resources()")


def test_kernel_reports_are_collected_per_kernel(tmp_path):
    for stem, registers, smem in (("m2rnn_forward_mosaic_0", 54, 35840),
                                  ("m2rnn_backward_mosaic_1", 209, 111616)):
        (tmp_path / f"{stem}.ptxas").write_text(
            PTXAS_REPORT.format(stores=0, loads=4, registers=registers))
        (tmp_path / f"{stem}.resources.txt").write_text(RESOURCES_REPORT.format(smem=smem))
    (tmp_path / "m2rnn_forward_mosaic_0.ptx").write_text("// not a report")
    found = {k.name: k for k in hopper_compile.collect_kernel_reports(tmp_path)}
    assert found == {
        "m2rnn_forward_mosaic": hopper_compile.KernelResources("m2rnn_forward_mosaic", 54, 4,
                                                               35840),
        "m2rnn_backward_mosaic": hopper_compile.KernelResources("m2rnn_backward_mosaic", 209, 4,
                                                                111616)}


@pytest.mark.parametrize("registers, smem, expected", [
    # 209 registers: 6,688 per warp -> 6,912 allocated, 27,648 per CTA -> 2; 112,640 B -> 2
    (209, 111616, (2, 2)),
    # 155: 4,960 -> 5,120 per warp, 20,480 per CTA -> 3; 74,752 + 1,024 B -> 3
    (155, 74752, (3, 3)),
    # 168 is the most that still gives 3: 5,376 per warp exactly, 21,504 per CTA
    (168, 0, (3, 228)),
    (169, 0, (2, 228)),
    (54, 35840, (9, 6)),
])
def test_ctas_per_sm_from_registers_and_smem(registers, smem, expected):
    assert hopper_compile.KernelResources("k", registers, 0, smem).ctas_per_sm() == expected


HLO_WITH_A_LOOP = """HloModule m

%fused_a (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  ROOT %t = f32[4]{0} tanh(%p)
}

%body (carry: (s32[], f32[4])) -> (s32[], f32[4]) {
  %carry = (s32[], f32[4]{0}) parameter(0)
  %i = s32[] get-tuple-element(%carry), index=0
  %x = f32[4]{0} get-tuple-element(%carry), index=1
  %f1 = f32[4]{0} fusion(%x), kind=kLoop, calls=%fused_a, metadata={op_name="jit(f)/tanh"}
  %pair = (f32[4]{0}, f32[4]{0}) fusion(%f1), kind=kLoop, calls=%fused_a
  %g = f32[4]{0} get-tuple-element(%pair), index=0
  %gemm = f32[4]{0} custom-call(%g), custom_call_target="__cublas$gemm"
  %c = f32[4]{0} copy(%gemm)
  %one = s32[] constant(1)
  %next = s32[] add(%i, %one)
  ROOT %out = (s32[], f32[4]{0}) tuple(%next, %c)
}

%cond (carry.1: (s32[], f32[4])) -> pred[] {
  %carry.1 = (s32[], f32[4]{0}) parameter(0)
  %j = s32[] get-tuple-element(%carry.1), index=0
  ROOT %lt = pred[] fusion(%j), kind=kLoop, calls=%fused_a
}

ENTRY %main (x.1: f32[4]) -> f32[4] {
  %x.1 = f32[4]{0} parameter(0)
  %before = f32[4]{0} fusion(%x.1), kind=kLoop, calls=%fused_a
  %zero = s32[] constant(0)
  %init = (s32[], f32[4]{0}) tuple(%zero, %before)
  %loop = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%body
  ROOT %r = f32[4]{0} get-tuple-element(%loop), index=1
}
"""


def test_while_loop_launches_counts_one_iteration_only():
    found = hopper_compile.while_loop_launches(HLO_WITH_A_LOOP)
    # body: two fusions (one with a tuple shape), the library call, the copy; condition: one
    # fusion; not the fusion before the loop, nor the views and the scalar add.
    assert [opcode for opcode, _, _ in found] == ["fusion", "fusion", "custom-call", "copy",
                                                  "fusion"]
    assert found[0] == ("fusion", "tanh", "f32[4]")
    assert found[1] == ("fusion", "", "(f32[4], f32[4])")


def test_while_loop_launches_of_a_real_compiled_loop():
    """The parser on XLA's own text (the CPU compiler's): a loop body with work in it."""
    def loop(x, n):
        return jax.lax.fori_loop(0, n, lambda i, y: jnp.tanh(y * 2.0 + i), x)

    text = jax.jit(loop).lower(jnp.ones(1000), 5).compile().as_text()
    found = hopper_compile.while_loop_launches(text)
    assert found and all(opcode in hopper_compile.LAUNCHING for opcode, _, _ in found)


def test_lowered_for_switches_the_interpreter_off_inside_only():
    assert platforms.interpret("gpu")  # the tests run on the CPU
    with platforms.lowered_for("gpu"):
        assert not platforms.interpret("gpu")
        assert platforms.interpret("tpu")
    assert platforms.interpret("gpu")
    with pytest.raises(KeyError):
        with platforms.lowered_for("gpu"):
            raise KeyError
    assert platforms.interpret("gpu")
