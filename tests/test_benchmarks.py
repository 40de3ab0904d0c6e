"""The kernel, training and decoding benchmarks run end to end on CPU (their smoke modes), so
a change in the library that breaks them fails here rather than on a GPU."""

import json
import math
import os
import sys

import jax
import numpy as np
import pytest

from m2rnn_jax import ModelConfig
from m2rnn_jax.typed_config import ConfigError

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import decode_bench  # noqa: E402
import kernel_bench  # noqa: E402
import multi_gpu_bench  # noqa: E402
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
    assert 0 < hybrid["lower_s"] < hybrid["compile_s"]  # tracing + lowering, then XLA


def test_train_bench_shares_time_attention_on_xla_beside_the_configured_path(capsys):
    """With a non-XLA attention path configured, the breakdown also times the attention mixer
    on XLA and prints it beside the step's rows without counting it in the step."""
    from m2rnn_jax.typed_config import load_yaml, override

    model = override(load_yaml(ModelConfig, train_bench.TINY_CONFIG),
                     ["attention.implementation=auto"])
    batch = train_bench.text_batches(32, 2, 1)[0]
    timings = train_bench.layer_shares([model], batch, train_bench.Report(None))
    assert timings["mixer A (auto)"] > 0 and timings["mixer A (xla)"] > 0
    rows = train_bench.print_shares("hybrid", model, {"step_s": 1.0, "remat": False,
                                                      "optimizer_s": 0.0}, timings)
    assert "vs XLA attention x1" in capsys.readouterr().out
    rest = dict(rows)["rest (residual adds, overlap, unmeasured)"]
    counted = sum(seconds for label, seconds in rows if label.startswith(("M²RNN mixers",
                  "attention mixers", "SwiGLU", "embedding", "optimizer")))
    assert rest == pytest.approx(1.0 - counted)  # the XLA row is not in the step's sum


def test_train_bench_rejects_unknown_override(restore_threefry_flag):
    with pytest.raises(ValueError, match="unknown config key: no_such_key"):
        train_bench.main(["--tiny", "--models", "hybrid", "--no-threefry-kernel",
                          "no_such_key=1"])


def test_decode_bench_tiny(tmp_path, restore_threefry_flag):
    rows_file = tmp_path / "decode.jsonl"
    decode_bench.main(["--tiny", "--models", "hybrid", "--batches", "2", "--contexts", "16",
                       "--steps", "2", "--warmup", "1", "--param-dtype", "float32",
                       "--out", str(rows_file), "--profile", str(tmp_path / "trace")])
    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    assert [(r["model"], r["batch"], r["context"]) for r in rows] == [("hybrid", 2, 16)]
    profile = rows[0]["profile"]  # on the CPU: the busiest host timeline of the trace
    assert profile["busy_us_per_token"] > 0 and profile["wall_us_per_token"] > 0
    assert profile["top"] and all(k["us_per_token"] > 0 for k in profile["top"])
    assert rows[0]["tokens_per_s"] > 0 and rows[0]["cache_gib"] > 0
    assert rows[0]["ms_per_step"] == pytest.approx(2 / rows[0]["tokens_per_s"] * 1e3)
    assert rows[0]["dispatch_ms_per_step"] == pytest.approx(
        2 / rows[0]["dispatch_tokens_per_s"] * 1e3)


def test_kernel_bench_smoke_checks_times_and_writes_rows(tmp_path, monkeypatch, capsys):
    kernel_bench.main(["--smoke", "--reps", "2", "--workers", "1", "--out", str(tmp_path)])
    rows = [json.loads(line)
            for line in (tmp_path / "kernel_bench.jsonl").read_text().splitlines()]
    kinds = {row["kind"]: row for row in rows}
    assert set(kinds) == {"check_f32", "accuracy_bf16", "timing"}
    assert 0 < max(kinds["check_f32"]["errors"].values()) < 1e-5   # float32 vs float64
    assert 0 < kinds["accuracy_bf16"]["errors"]["y"] < 0.05          # bf16 on a short sequence
    assert kinds["timing"]["fwd_ms"] > 0 and kinds["timing"]["fwd_bwd_ms"] > 0
    # Another shape, state and dtype, two backends side by side on the same inputs: what the
    # op is called with is recorded, not just what the rows say.
    calls = set()

    def recorded(q, k, v, *rest, backend):
        calls.add((backend, q.shape[0], q.shape[1], v.shape[2], q.shape[-1], v.shape[-1],
                   q.dtype.name))
        return op(q, k, v, *rest, backend=backend)

    op = kernel_bench.m2rnn
    monkeypatch.setattr(kernel_bench, "m2rnn", recorded)
    kernel_bench.main(["--no-checks", "--shape", "1", "16", "2", "--state", "8", "4", "--dtype",
                       "float32", "--backend", "scan,pallas_gpu", "--reps", "2", "--workers",
                       "1", "--out", str(tmp_path / "side_by_side"), "--smoke"])
    assert calls == {(name, 1, 16, 2, 8, 4, "float32") for name in ("scan", "pallas_gpu")}
    rows = [json.loads(line) for line in
            (tmp_path / "side_by_side" / "kernel_bench.jsonl").read_text().splitlines()]
    assert [(row["backend"], row["kernel"], row["shape"], row["state"], row["dtype"])
            for row in rows] == [("scan", "scan", [1, 16, 2], [8, 4], "float32"),
                                 ("pallas_gpu", "pallas_gpu", [1, 16, 2], [8, 4], "float32")]
    assert all(row["fwd_ms"] > 0 and row["fwd_bwd_ms"] > 0 for row in rows)
    # The same backend twice, or an unknown one: one line, before any work.
    for names in ("scan,scan", "scan,bogus"):
        with pytest.raises(SystemExit):
            kernel_bench.main(["--smoke", "--backend", names])
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert "--backend takes distinct names" in error and names in error


def test_throughput_table_from_step_results_and_the_attention_check(tmp_path, capsys):
    out = tmp_path / "throughput"
    out.mkdir()
    (out / "train4.json").write_text(json.dumps({
        "meta": {"shape": {"batch": 4, "seq_len": 4096}},
        "train": {"hybrid": {"step_s": 0.2, "tokens_per_s": 81920.0, "mfu": 0.2,
                             "compile_s": 30.0, "lower_s": 3.0}}}))
    (out / "cold.json").write_text(json.dumps({
        "train": {"hybrid": {"compile_s": 50.0, "lower_s": 12.5}}}))
    (out / "decode.jsonl").write_text(json.dumps({
        "batch": 1, "context": 1024, "tokens_per_s": 1600.0, "ms_per_step": 0.625,
        "dispatch_tokens_per_s": 300.0,
        "profile": {"busy_us_per_token": 500.0, "wall_us_per_token": 625.0}}) + "\n"
        + json.dumps({"batch": 32, "context": 1024, "tokens_per_s": 16000.0, "ms_per_step": 2.0,
                      "dispatch_tokens_per_s": 9000.0, "profile": None}) + "\n")
    assert throughput.main(["--out", str(out), "--only", "attention", "--tiny"]) == 0
    table = capsys.readouterr().out.split("what")[-1]
    assert "train, batch 4 × 4096" in table and "200.0 ms/step, 81.9k tok/s, MFU 20.0%" in table
    # The cold row is the cold step's (not train4's compile, which follows other compiles).
    assert "50.0 s (tracing + lowering 12.5 s)" in table and "1,600 tok/s" in table
    assert "30.0 s" not in table
    assert "one dispatch per token 300; GPU busy 500 of 625 µs per step" in table
    assert "16,000 tok/s (2.00 ms/step; one dispatch per token 9,000)" in table  # not traced
    check = json.loads((out / "attention.json").read_text())
    # XLA against the written-out float32 softmax: bf16 inputs, so small but not zero.
    assert set(check["xla_vs_float32"]) == {"out", "dq", "dk", "dv"}
    assert 0 < max(check["xla_vs_float32"].values()) < 0.05
    assert "cudnn_error" in check  # no cuDNN on a CPU
    assert "xla vs float32" in table
    assert "train, batch 8" not in table and "train (train8)" in table  # not measured
    with pytest.raises(SystemExit):
        throughput.main(["--out", str(out), "--only", "nonsense"])
    for bad in ("nonsense=10", "train4=soon"):
        with pytest.raises(SystemExit):
            throughput.main(["--out", str(out), "--deadline", bad])


def test_throughput_cold_and_warm_compile_share_one_command_from_an_empty_cache(tmp_path,
                                                                                 monkeypatch):
    out = tmp_path / "throughput"

    def without_results_file(step):
        argv, env = throughput.step_commands(step, out, False)
        at = argv.index("--json")
        return argv[:at] + argv[at + 2:], env

    assert without_results_file("cold") == without_results_file("warm")
    assert "--no-shares" in without_results_file("cold")[0]
    assert throughput.step_commands("train4", out, False)[1] == {}  # not the timed cache

    ran = []

    def fake_step(step, out, tiny, deadlines):  # what the cold step finds, and its result
        ran.append((step, (out / "jax-cache").exists()))
        if step == "cold" and cold_finishes:
            (out / "jax-cache").mkdir()
            (out / "cold.json").write_text(json.dumps({"train": {"hybrid": {"compile_s": 1}}}))
        return "exit 0"

    monkeypatch.setattr(throughput, "run_step", fake_step)
    (out / "jax-cache").mkdir(parents=True)  # left by a cold run cut short
    cold_finishes = False
    throughput.main(["--out", str(out), "--only", "cold,warm"])
    assert ran == [("cold", False)]  # emptied first; no warm step without the cold results
    cold_finishes = True
    throughput.main(["--out", str(out), "--only", "cold,warm"])
    assert ran[1:] == [("cold", False), ("warm", True)]


def test_flops_per_token_counts_a_routed_expert_by_its_share():
    from m2rnn_jax.typed_config import override
    from train.step import abstract_model

    base = multi_gpu_bench.load_model("moe7b", tiny=True)  # 3 layers, 8 experts of 64 x 64
    dense = {}
    for top_k in (2, 8):
        model = override(base, [f"moe.top_k={top_k}"])
        dense[top_k] = train_bench.flops_per_token(model, abstract_model(model)[1], 32)["dense"]
    routed = 3 * 3 * 8 * base.d_model * base.moe.expert_hidden_dim  # gate, up, down per layer
    assert dense[8] - dense[2] == pytest.approx(6 * routed * (1 - 2 / 8))


def test_multi_gpu_plans_and_collective_share():
    model = multi_gpu_bench.load_model("scaling", tiny=False)  # 84 M²RNN, 16 attention heads
    assert [multi_gpu_bench.scaling_mesh("tp", n, model) for n in (2, 4, 8)] == [
        {"data": 1, "tensor": 2}, {"data": 1, "tensor": 4}, {"data": 2, "tensor": 4}]
    args = multi_gpu_bench.parse_args(["--study", "context", "--lengths", "64,128",
                                       "--max-len", "512"])
    ok, failed = {"status": "ok"}, {"status": "failed (exit 1)"}
    assert multi_gpu_bench.context_lengths(args, 4, {}) == [64, 128]
    assert multi_gpu_bench.context_lengths(
        args, 4, {"sweep-c4-128": ok, "sweep-c4-256": failed}) == [64, 128, 256]
    assert multi_gpu_bench.context_lengths(
        args, 4, {"sweep-c4-128": ok, "sweep-c4-256": ok, "sweep-c4-512": ok}) == [64, 128,
                                                                                 256, 512]
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7,
             "args": {"name": "Stream #7(Compute)"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 9, "args": {"name": "XLA Ops"}}]
    kernels = [("ncclDevKernel_AllReduce_Sum_f32", 30.0), ("gemm_fusion_1", 50.0),
               ("all_gather_start", 20.0), ("loop_fusion_3", 100.0)]
    events = meta + [{"ph": "X", "pid": 1, "tid": tid, "name": name, "dur": dur}
                     for name, dur in kernels for tid in (7, 9)]
    share = multi_gpu_bench.communication_share(events, steps=2)
    assert share["timelines"] == 1 and share["share"] == pytest.approx(50 / 200)
    assert share["collective_ms_per_step"] == pytest.approx(50 / 2 / 1e3)


def test_multi_gpu_remat_defaults_and_each_setting_has_its_own_results(tmp_path):
    """Remat is on for the context and MoE studies; a command under the other --remat writes
    another results file, so its runs are neither taken as done nor mixed into the table."""
    parse = multi_gpu_bench.parse_args
    assert parse(["--study", "context"]).remat and parse(["--study", "moe7b"]).remat
    assert not parse(["--study", "scaling"]).remat
    paths = {(study, flag): multi_gpu_bench.results_path(parse(["--study", study, flag]),
                                                         tmp_path).name
             for study in ("context", "scaling") for flag in ("--remat", "--no-remat")}
    assert paths == {("context", "--remat"): "context.json",
                     ("context", "--no-remat"): "context-no-remat.json",
                     ("scaling", "--remat"): "scaling-remat.json",
                     ("scaling", "--no-remat"): "scaling.json"}


def test_multi_gpu_runs_take_most_of_the_memory_unless_told(monkeypatch):
    """A run's process gets a 92 % pool unless a memory fraction is set, under either of the
    names jaxlib reads (it refuses both at once); processes side by side preallocate none."""
    for name in multi_gpu_bench.MEMORY_FRACTION_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert multi_gpu_bench.Runner.environment(False)["XLA_CLIENT_MEM_FRACTION"] == "0.92"
    side_by_side = multi_gpu_bench.Runner.environment(True)
    assert side_by_side["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert "XLA_CLIENT_MEM_FRACTION" not in side_by_side
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    env = multi_gpu_bench.Runner.environment(False)
    assert "XLA_CLIENT_MEM_FRACTION" not in env and env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.5"


def test_multi_gpu_scaling_tiny_matches_one_device_and_resumes(tmp_path, capsys):
    argv = ["--study", "scaling", "--tiny", "--out", str(tmp_path), "--gpus", "1,2",
            "--layouts", "dp", "--modes", "strong", "--profile"]
    assert multi_gpu_bench.main(argv) == 0
    out = capsys.readouterr().out
    runs = json.loads((tmp_path / "scaling.json").read_text())["runs"]
    one, two = runs["strong-single-1"], runs["strong-dp-2"]
    assert one["status"] == two["status"] == "ok" and two["mesh"] == {"data": 2}
    assert len(one["losses"]) == 2 and all(math.isfinite(x) for x in one["losses"])
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-4)
    assert two["loss_match"] and two["max_abs_dloss"] == pytest.approx(
        max(abs(a - b) for a, b in zip(two["losses"], one["losses"])), abs=1e-12)
    assert two["tokens_per_s_per_gpu"] == pytest.approx(8 * 64 / two["step_s"] / 2)
    assert 0 <= two["communication"]["share"] <= 1
    assert "== scaling" in out and "1 of 1 strong-scaling layouts equal 1 GPU's" in out
    assert multi_gpu_bench.main(argv) == 0  # a rerun finds everything done
    again = capsys.readouterr().out
    assert "### strong" not in again and "strong dp" in again


# The context and MoE studies run layers the suite checks on their own (test_context_parallel.py,
# test_moe.py, test_parallel_layouts.py) through the process, deadline and resume machinery the
# scaling study's test above checks; these check the studies' own code (context_runs and its
# micro-batch choice, moe_runs, expert_load, the idle fraction, their printing).
def test_multi_gpu_context_tiny_check_and_idle_fraction(tmp_path, capsys):
    assert multi_gpu_bench.main(["--study", "context", "--tiny", "--out", str(tmp_path),
                                 "--contexts", "4", "--lengths", "128", "--max-len", "128",
                                 "layer_pattern=MA"]) == 0
    out = capsys.readouterr().out
    runs = json.loads((tmp_path / "context.json").read_text())["runs"]
    assert set(runs) == {"check-1", "check-c4", "sweep-c4-128", "pipe-c4-128"}
    assert all(run["status"] == "ok" for run in runs.values())
    np.testing.assert_allclose(runs["check-c4"]["losses"], runs["check-1"]["losses"],
                               rtol=1e-4)
    assert runs["check-c4"]["loss_match"]
    # One row cannot be cut into micro-batches; the pipe run has 4 rows of a quarter length.
    for key, rows, seq_len, micro in (("sweep-c4-128", 1, 128, 1), ("pipe-c4-128", 4, 32, 4)):
        run = runs[key]
        assert (run["rows"], run["seq_len"], run["microbatches"]) == (rows, seq_len, micro)
        assert run["idle_fraction"] == pytest.approx(3 / (micro + 3))
        assert all(math.isfinite(x) for x in run["losses"])
    assert "longest context trained on 4 GPUs: 128 tokens" in out


def test_multi_gpu_moe7b_tiny_router_metrics(tmp_path, capsys):
    assert multi_gpu_bench.main(["--study", "moe7b", "--tiny", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    run = json.loads((tmp_path / "moe7b.json").read_text())["runs"]["moe7b-expert8"]
    assert run["status"] == "ok" and run["mesh"] == {"data": 1, "expert": 8} and run["remat"]
    metrics = run["metrics"]
    assert set(metrics) == {"moe_aux_loss", "expert_load_max", "expert_load_min"}
    assert all(len(values) == 2 and all(math.isfinite(v) for v in values)
               for values in metrics.values())
    assert all(hi >= 1 >= lo >= 0 for hi, lo in zip(metrics["expert_load_max"],
                                                    metrics["expert_load_min"]))
    load = np.array(run["expert_load"])  # layers x experts, each layer's loads sum to 1
    assert load.shape == (3, 8)
    np.testing.assert_allclose(load.sum(axis=1), 1, atol=1e-4)
    ratio = load * 8
    assert run["expert_load_spread"]["max_over_mean"] == pytest.approx(
        ratio.max(axis=1).mean(), rel=1e-4)
    assert run["flops"]["dense"] > 0 and run["tokens_per_s"] > 0
    assert "router (load / mean load" in out and "plan (RESULTS.md)" in out


def test_state_tracking_bench_times_the_experiment_loop(capsys):
    import state_tracking_bench

    s3 = str(state_tracking_bench.cli.CONFIG_DIR / "s3.yaml")
    flags = ["--config", s3, "--group", "S3", "--batch-size", "8", "--lengths", "4",
             "--seconds", "0.01"]
    rows = state_tracking_bench.main(flags + ["--dispatch", "1", "4", "--seeds", "1",
                                              "--set", "models.m2rnn.m2rnn.backend=scan"])
    assert [(length, n, k) for length, n, k, _, _ in rows] == [(4, 1, 1), (4, 4, 1)]
    assert all(rate > 0 and first_s > 0 for *_, rate, first_s in rows)
    out = capsys.readouterr().out
    assert "| 4 | 1 | 1 |" in out and "| 1.00x |" in out
    # --set reaches the model's config: a backend that does not exist is refused by name.
    with pytest.raises(ConfigError, match="m2rnn.backend"):
        state_tracking_bench.main(flags + ["--set", "models.m2rnn.m2rnn.backend=nowhere"])
