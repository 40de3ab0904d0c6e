"""benchmarks/sass_summary.py: loop detection and instruction kinds on small SASS listings."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import sass_summary  # noqa: E402

LABELLED = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*0010*/                   MOV R2, RZ ;
.L_x_1:
        /*0020*/                   HGMMA.64x16x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ;
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0040*/                   FFMA R3, R4, R5, R6 ;
        /*0050*/                   MUFU.TANH R7, R3 ;
        /*0060*/                   SHFL.BFLY PT, R8, R7, 0x1, 0x1f ;
        /*0070*/                   IMAD.MOV.U32 R9, RZ, RZ, R8 ;
        /*0080*/                   ISETP.GE.AND P0, PT, R2, 0x20, PT ;
        /*0090*/              @!P0 BRA `(.L_x_1) ;
        /*00a0*/                   STG.E [R10.64], R7 ;
        /*00b0*/                   EXIT ;
"""

ADDRESSED = """
        /*0000*/                   MOV R2, RZ ;
        /*0010*/                   FADD R3, R3, 1 ;
        /*0020*/                   F2FP.BF16.F32.PACK_AB R4, R3, R3 ;
        /*0030*/               @P0 BRA 0x10 ;
        /*0040*/                   BRA 0x60 ;
        /*0050*/                   NOP ;
        /*0060*/                   EXIT ;
"""


def test_labelled_loop_counts_its_body_by_kind():
    instructions, labels = sass_summary.parse_sass(LABELLED)
    assert len(instructions) == 12
    assert sass_summary.loops(instructions, labels) == [(2, 9)]
    report = sass_summary.loop_report(instructions, 2, 9)
    assert report.startswith("loop [2, 9]: 8 instructions:")
    for part in ("tensor 1", "tensor_sync 1", "fp32 1", "mufu 1", "shuffle 1", "move 1",
                 "integer 1", "control 1"):
        assert part in report, (part, report)


def test_address_targets_and_forward_branches():
    instructions, labels = sass_summary.parse_sass(ADDRESSED)
    # The backward branch to 0x10 is a loop over [1, 3]; the forward one to 0x60 is not.
    assert sass_summary.loops(instructions, labels) == [(1, 3)]
    assert "convert 1" in sass_summary.loop_report(instructions, 1, 3)


def test_summarize_folder_reads_ptxas_and_sass(tmp_path):
    (tmp_path / "kernel.sass").write_text(LABELLED)
    (tmp_path / "kernel.ptxas").write_text(
        "ptxas info    : Compiling entry function 'k'\n"
        "ptxas info    : Used 168 registers, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas warning : Potential Performance Loss: wgmma.mma_async instructions are "
        "serialized\n")
    (tmp_path / "notes.txt").write_text("nothing here\n")
    text = sass_summary.summarize(str(tmp_path))
    assert "== kernel.ptxas" in text and "Used 168 registers" in text
    assert "warning: Potential Performance Loss" in text
    assert "Compiling entry function" not in text
    assert "== kernel.sass" in text and "loop [2, 9]: 8 instructions" in text
    assert "notes.txt" not in text
