"""The kernel, training and decoding benchmarks run end to end on CPU (their smoke modes), so
a change in the library that breaks them fails here rather than on a GPU."""

import json
import math
import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import decode_bench  # noqa: E402
import kernel_bench  # noqa: E402
import throughput  # noqa: E402
import train_bench  # noqa: E402


@pytest.fixture
def restore_threefry_flag():
    """The benchmarks switch on the ThreeFry GPU kernel (a no-op on CPU); put it back."""
    saved = jax.config.jax_threefry_gpu_kernel_lowering
    yield
    jax.config.update("jax_threefry_gpu_kernel_lowering", saved)


def test_train_bench_tiny_with_overrides_and_profile(tmp_path, capsys, restore_threefry_flag):
    results = tmp_path / "train.json"
    train_bench.main(["--tiny", "--models", "hybrid", "--no-shares", "--steps", "3",
                      "--no-threefry-kernel", "--json", str(results),
                      "--profile", str(tmp_path / "trace"), "--profile-steps", "1",
                      "layer_pattern=MA", "m2rnn.num_heads=2"])
    out = capsys.readouterr().out
    report = json.loads(results.read_text())
    assert report["meta"]["shape"]["overrides"] == ["layer_pattern=MA", "m2rnn.num_heads=2"]
    hybrid = report["train"]["hybrid"]
    assert hybrid["pattern"] == "MA"
    assert len(hybrid["losses"]) == 3 and all(math.isfinite(x) for x in hybrid["losses"])
    assert hybrid["tokens_per_s"] == pytest.approx(4 * 64 / hybrid["step_s"])
    assert set(hybrid["flops"]) == {"dense", "attention", "recurrence"}
    assert all(v > 0 for v in hybrid["flops"].values())
    timelines = hybrid["profile"]
    assert timelines and all(t["busy_ms_per_step"] > 0 and t["top_ms_per_step"]
                             for t in timelines)
    assert (tmp_path / "trace" / "hybrid").is_dir()
    assert "profile of 1 steps" in out and "ms busy in" in out


def test_train_bench_rejects_unknown_override(restore_threefry_flag):
    with pytest.raises(ValueError, match="unknown config key: no_such_key"):
        train_bench.main(["--tiny", "--models", "hybrid", "--no-threefry-kernel",
                          "no_such_key=1"])


def test_decode_bench_tiny(tmp_path, restore_threefry_flag):
    rows_file = tmp_path / "decode.jsonl"
    decode_bench.main(["--tiny", "--models", "hybrid", "--batches", "2", "--contexts", "16",
                       "--steps", "2", "--warmup", "1", "--param-dtype", "float32",
                       "--out", str(rows_file)])
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [(r["model"], r["batch"], r["context"]) for r in rows] == [("hybrid", 2, 16)]
    assert rows[0]["tokens_per_s"] > 0 and rows[0]["cache_gib"] > 0
    assert rows[0]["ms_per_step"] == pytest.approx(2 / rows[0]["tokens_per_s"] * 1e3)
    assert rows[0]["dispatch_ms_per_step"] == pytest.approx(
        2 / rows[0]["dispatch_tokens_per_s"] * 1e3)


def test_kernel_bench_smoke_checks_times_and_writes_rows(tmp_path):
    kernel_bench.main(["--smoke", "--reps", "2", "--workers", "1", "--out", str(tmp_path)])
    rows = [json.loads(line)
            for line in (tmp_path / "kernel_bench.jsonl").read_text().splitlines()]
    kinds = {row["kind"]: row for row in rows}
    assert set(kinds) == {"check_f32", "accuracy_bf16", "timing"}
    assert 0 < max(kinds["check_f32"]["errors"].values()) < 1e-5   # float32 vs float64
    assert 0 < kinds["accuracy_bf16"]["errors"]["y"] < 0.05          # bf16 on a short sequence
    assert kinds["timing"]["fwd_ms"] > 0 and kinds["timing"]["fwd_bwd_ms"] > 0


def test_throughput_table_from_step_results_and_the_attention_check(tmp_path, capsys):
    out = tmp_path / "throughput"
    out.mkdir()
    (out / "train4.json").write_text(json.dumps({
        "meta": {"shape": {"batch": 4, "seq_len": 4096}},
        "train": {"hybrid": {"step_s": 0.2, "tokens_per_s": 81920.0, "mfu": 0.2,
                             "compile_s": 50.0}}}))
    (out / "decode.jsonl").write_text(json.dumps({
        "batch": 1, "context": 1024, "tokens_per_s": 1600.0, "ms_per_step": 0.625,
        "dispatch_tokens_per_s": 300.0}) + "\n")
    assert throughput.main(["--out", str(out), "--only", "attention", "--tiny"]) == 0
    table = capsys.readouterr().out.split("what")[-1]
    assert "train, batch 4 × 4096" in table and "200.0 ms/step, 81.9k tok/s, MFU 20.0%" in table
    assert "50.0 s" in table and "1,600 tok/s" in table and "one dispatch per token 300" in table
    check = json.loads((out / "attention.json").read_text())
    # XLA against the written-out float32 softmax: bf16 inputs, so small but not zero.
    assert set(check["xla_vs_float32"]) == {"out", "dq", "dk", "dv"}
    assert 0 < max(check["xla_vs_float32"].values()) < 0.05
    assert "cudnn_error" in check  # no cuDNN on a CPU
    assert "xla vs float32" in table
    assert "train, batch 8" not in table and "train (train8)" in table  # not measured
    with pytest.raises(SystemExit):
        throughput.main(["--out", str(out), "--only", "nonsense"])
