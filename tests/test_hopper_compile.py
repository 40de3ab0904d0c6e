"""benchmarks/hopper_compile.py's parsing and occupancy arithmetic (the deviceless compile itself
needs JAX's CUDA plugin, which CI does not install), and ``platforms.lowered_for``."""

import os
import sys

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels import platforms

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


MODULE_TEXT = ("%3 = gpu.launch async [%2] blocks(%a, %b, %c) in (%x = %c84, %y = %c4, %z = %c1) "
               "threads(%d, %e, %f) in (%u = %c128, %v = %c1, %w = %c1) "
               "dynamic_shared_memory_size %c{smem}_i32 {{")


SASS = """        .text.kernel:
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0020*/                   FADD R2, R2, R3 ;
.L_x_2:
        /*0030*/                   FFMA R2, R2, R3, R4 ;
        /*0040*/              @P0 BRA `(.L_x_2) ;
   -:-:-:Y:01        /*0050*/      HGMMA.64x16x16.F32.BF16 R24, gdesc[UR8], R24 ;
   -:-:-:Y:06        /*0060*/  @P1 BRA `(.L_x_1) ;
.L_x_3:
        /*0070*/                   HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0080*/                   FMUL R5, R5, R6 ;
        /*0090*/              @P2 BRA `(.L_x_3) ;
        /*00a0*/              @P3 BRA `(.L_x_4) ;
.L_x_4:
        /*00b0*/                   EXIT ;
"""


def test_ptxas_reports_and_modules_parse():
    assert hopper_compile.parse_ptxas(PTXAS_REPORT.format(
        stores=0, loads=0, registers=209)) == (209, 0, 1)
    assert hopper_compile.parse_ptxas(PTXAS_REPORT.format(
        stores=8, loads=12, registers=255)) == (255, 20, 1)
    assert hopper_compile.parse_dynamic_smem(MODULE_TEXT.format(smem=111632)) == 111632
    with pytest.raises(ValueError, match="ptxas"):
        hopper_compile.parse_ptxas("ptxas fatal: unresolved symbol")
    with pytest.raises(ValueError, match="dynamic SMEM"):
        hopper_compile.parse_dynamic_smem("gpu.launch blocks(%a) threads(%b) {")


def test_kernel_reports_are_collected_per_kernel(tmp_path):
    with pytest.raises(RuntimeError, match="no ptxas report"):
        hopper_compile.collect_kernel_reports(tmp_path)
    for stem, registers, smem, module in (
            ("m2rnn_forward_mosaic_0", 54, 35864, "after_layout_inference.txt"),
            ("m2rnn_backward_mosaic_1", 209, 111632, "mlir-passes.log")):  # no layout inference
        (tmp_path / f"{stem}.ptxas").write_text(
            PTXAS_REPORT.format(stores=0, loads=4, registers=registers))
        (tmp_path / f"{stem}.{module}").write_text(MODULE_TEXT.format(smem=smem))
    (tmp_path / "m2rnn_forward_mosaic_0.ptx").write_text("// not a report")
    (tmp_path / "m2rnn_forward_mosaic_0.sass_ctrl").write_text(SASS)  # nvdisasm found once
    found = {k.name: k for k in hopper_compile.collect_kernel_reports(tmp_path)}
    resources = hopper_compile.KernelResources
    assert found == {  # dynamic SMEM + ptxas' 1 static byte
        "m2rnn_forward_mosaic": resources("m2rnn_forward_mosaic", 54, 4, 35865, ((3, 1),)),
        "m2rnn_backward_mosaic": resources("m2rnn_backward_mosaic", 209, 4, 111633)}


def test_sass_loops_are_the_innermost_ones_with_a_wgmma():
    # .L_x_2's loop has no wgmma; .L_x_1's holds it, so it is not innermost; .L_x_3's counts
    # (3 instructions, 1 wgmma); the forward branch to .L_x_4 is no loop.
    assert hopper_compile.sass_wgmma_loops(SASS) == ((3, 1),)
    unnested = SASS.replace("@P0 BRA `(.L_x_2)", "@P0 BRA `(.L_x_4)")
    assert hopper_compile.sass_wgmma_loops(unnested) == ((6, 2), (3, 1))


@pytest.mark.parametrize("registers, smem, limits", [
    # 209 registers: 6,688 per warp -> 6,912 allocated, 27,648 per CTA -> 2; 112,657 B -> 2
    (209, 111633, (2, 2)),
    # 155: 4,960 -> 5,120 per warp, 20,480 per CTA -> 3; 74,752 + 1,024 B -> 3
    (155, 74752, (3, 3)),
    # 168 is the most that still gives 3: 5,376 per warp exactly, 21,504 per CTA
    (168, 20000, (3, 11)),
    (169, 20000, (2, 11)),
    (54, 35865, (9, 6)),
])
def test_occupancy_from_registers_and_smem(registers, smem, limits):
    kernel = hopper_compile.KernelResources("k", registers, 0, smem)
    assert kernel.occupancy_limits() == {"registers": limits[0], "SMEM": limits[1],
                                         "threads": 16}
    assert kernel.ctas_per_sm() == min(limits)


def test_occupancy_is_capped_by_threads_and_waves_round_up():
    small = hopper_compile.KernelResources("k", 32, 0, 0)  # 64 by registers, 228 by SMEM
    assert small.ctas_per_sm() == 16  # 2,048 threads of 128
    backward = hopper_compile.KernelResources("k", 209, 0, 111633)  # 2 per SM: 264 slots
    assert [backward.waves(grid) for grid in (264, 265, 336, 528)] == [1, 2, 2, 2]
    assert hopper_compile.KernelResources("k", 209, 0, 240_000).waves(336) is None


def test_kernel_reports_swallows_output_unless_the_block_fails(capfd, monkeypatch):
    monkeypatch.setenv("MOSAIC_GPU_DUMP_TO", "/somewhere/else")
    with hopper_compile.kernel_reports() as folder:
        assert os.environ["MOSAIC_GPU_DUMP_TO"] == folder and os.path.isdir(folder)
        os.write(1, b"noise on stdout\n")
        os.write(2, b"noise on stderr \xff\n")
    assert capfd.readouterr() == ("", "")
    assert not os.path.exists(folder) and os.environ["MOSAIC_GPU_DUMP_TO"] == "/somewhere/else"
    with pytest.raises(ZeroDivisionError):
        with hopper_compile.kernel_reports():
            os.write(2, b"why it failed\n")
            1 / 0
    assert "why it failed" in capfd.readouterr().err


def test_missing_plugin_is_one_line(monkeypatch):
    from jax.experimental import topologies

    def no_cuda(**kwargs):
        raise NotImplementedError("topology not implemented for cuda")

    monkeypatch.setattr(topologies, "get_topology_desc", no_cuda)
    with pytest.raises(SystemExit, match="CUDA plugin is not installed"):
        hopper_compile.hopper_mesh()


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


def test_while_loop_launches_follows_a_call_that_wraps_the_loop():
    # XLA's CPU compiler in JAX >= 0.12 moves the loop into a computation the entry calls
    wrapped = HLO_WITH_A_LOOP.replace(
        "  %loop = (s32[], f32[4]{0}) while(%init), condition=%cond, body=%body",
        "  %loop = (s32[], f32[4]{0}) call(%init), to_apply=%wrapper").replace(
        "ENTRY", "%wrapper (t: (s32[], f32[4])) -> (s32[], f32[4]) {\n"
        "  %t = (s32[], f32[4]{0}) parameter(0)\n"
        "  ROOT %w = (s32[], f32[4]{0}) while(%t), condition=%cond, body=%body\n}\n\nENTRY")
    assert (hopper_compile.while_loop_launches(wrapped)
            == hopper_compile.while_loop_launches(HLO_WITH_A_LOOP))


def test_entry_traffic_counts_operands_and_outputs_of_launches():
    assert hopper_compile.shape_bytes("(bf16[2,3]{1,0}, f32[4]{0}, pred[])") == 12 + 16 + 1
    # the fusion before the loop: reads x.1 (f32[4]) and writes f32[4]; the loop is no launch
    assert hopper_compile.entry_traffic(HLO_WITH_A_LOOP) == [(32, "fusion", "f32[4]", "")]


def test_while_loop_launches_refuses_what_it_would_miscount():
    nested = HLO_WITH_A_LOOP.replace("%c = f32[4]{0} copy(%gemm)",
                                     "%c = f32[4]{0} call(%gemm), to_apply=%fused_a")
    with pytest.raises(ValueError, match="call"):
        hopper_compile.while_loop_launches(nested)
    with pytest.raises(ValueError, match="found 0"):
        hopper_compile.while_loop_launches(HLO_WITH_A_LOOP.replace(" while(", " other("))


def test_while_loop_launches_of_a_real_compiled_loop():
    """The parser on XLA's own text (the CPU compiler's): the loop's work, not what comes
    before and after it."""
    def loop(x, n):
        x = jnp.sin(x)
        return jnp.cos(jax.lax.fori_loop(0, n, lambda i, y: jnp.tanh(y * 2.0 + i), x))

    text = jax.jit(loop).lower(jnp.ones(1000), 5).compile().as_text()
    found = hopper_compile.while_loop_launches(text)
    big = [(opcode, op_name) for opcode, op_name, shape in found if shape == "f32[1000]"]
    assert big == [("fusion", "tanh")]  # not the sin before the loop nor the cos after it
    assert {shape for _, _, shape in found} == {"f32[1000]", "s32[]", "pred[]"}  # the counter


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
