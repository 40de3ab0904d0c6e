"""The state-tracking analysis scripts: benchmarks/state_tracking_report.py (merging
per-process results, reading the cli's progress lines from a real headless run, so a change of
the log format fails here) and benchmarks/state_tracking_positions.py (accuracy per position
from a run's checkpoint)."""

import csv
import os
import re
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest

from test_state_tracking import tiny_experiment
from m2rnn_experiments.state_tracking import cli

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import state_tracking_report  # noqa: E402


def test_progress_lines_are_parsed_in_step_order_and_resumes_replace_steps():
    log = "\n".join([
        "config ...: word problems over S5",
        "m2rnn seed 1: step 100, loss 3.876, training accuracy 0.505, scored length 2, 54s",
        "m2rnn seed 1: step 200, training accuracy 0.962 at length 2 -> length 4",
        "m2rnn seed 1: step 200, loss 2.100, training accuracy 0.962, scored length 2, 60s",
        "m2rnn seed 1: resumed at step 100 from runs/x.msgpack",
        "m2rnn seed 1: step 200, loss 2.000, training accuracy 0.970, scored length 4, 5s",
        "attention seed 0: step 100, loss nan, training accuracy 0.010, scored length 8, 9s",
    ])
    runs = state_tracking_report.read_progress(log)
    assert runs == {("m2rnn", 1): [(100, 0.505, 2), (200, 0.970, 4)],
                    ("attention", 0): [(100, 0.010, 8)]}


def test_evaluations_and_schedule_changes_are_read_per_seed():
    log = "\n".join([
        "  seed 2: 1000 steps, compile 9.0s, train 30.0s (33 steps/s), eval 1.0s, loss 0.500; "
        "per-position accuracy L=64: 36.2%, L=128: 20.1%",
        "m2rnn seed 2: resumed at step 1000 from runs/x.msgpack",
        "m2rnn seed 2: continues under a new schedule: learning_rate 0.001 -> 3e-05, steps 5 -> 9",
        "  seed 2: 1500 steps, compile 9.0s, train 30.0s (33 steps/s), eval 1.0s, loss 0.100; "
        "per-position accuracy L=64: 99.0%, L=128: 75.5%",
    ])
    evaluations, changes = state_tracking_report.read_evaluations(log)
    assert evaluations == {2: [(1000, {64: pytest.approx(0.362), 128: pytest.approx(0.201)}),
                               (1500, {64: pytest.approx(0.99), 128: pytest.approx(0.755)})]}
    assert changes == {2: [(1000, "learning_rate 0.001 -> 3e-05, steps 5 -> 9")]}


def test_a_seed_that_moved_between_run_folders_keeps_its_whole_history(tmp_path):
    """Seed 5 trained in a group's folder, then alone in its own: the logs' progress and
    evaluations are merged per seed in step order, and of its result rows the latest count."""
    group_log = tmp_path / "group.txt"
    group_log.write_text("\n".join([
        "m2rnn seed 5: step 100, loss 3.0, training accuracy 0.500, scored length 2, 5s",
        "m2rnn seed 4: step 100, loss 3.1, training accuracy 0.400, scored length 2, 5s",
        "  seed 5: 100 steps, compile 9.0s, train 3.0s (33 steps/s), eval 1.0s, loss 3.0; "
        "per-position accuracy L=64: 10.0%",
        "m2rnn seed 5: step 200, loss 2.0, training accuracy 0.700, scored length 4, 9s",
        "  seed 5: 200 steps, compile 9.0s, train 3.0s (33 steps/s), eval 1.0s, loss 2.0; "
        "per-position accuracy L=64: 20.0%"]))
    solo_log = tmp_path / "solo.txt"
    solo_log.write_text("\n".join([
        "m2rnn seed 5: resumed at step 200 from runs/seed5/x.msgpack",
        "m2rnn seed 5: continues under a new schedule: learning_rate 0.002 -> 1e-05",
        "m2rnn seed 5: step 300, loss 1.0, training accuracy 0.900, scored length 8, 4s",
        "  seed 5: 300 steps, compile 9.0s, train 3.0s (33 steps/s), eval 1.0s, loss 1.0; "
        "per-position accuracy L=64: 30.0%"]))
    progress, evaluations, changes = state_tracking_report.merge_logs([group_log, solo_log])
    assert progress[("m2rnn", 5)] == [(100, 0.5, 2), (200, 0.7, 4), (300, 0.9, 8)]
    assert progress[("m2rnn", 4)] == [(100, 0.4, 2)]
    assert [step for step, _ in evaluations[5]] == [100, 200, 300]
    assert evaluations[5][2][1] == {64: pytest.approx(0.3)}
    assert changes == {5: [(200, "learning_rate 0.002 -> 1e-05")]}

    header = ",".join(state_tracking_report.report.CSV_COLUMNS) + "\n"
    (tmp_path / "group.csv").write_text(header + "m2rnn,5,64,0.2,0.0,10,200,64,S5\n"
                                        "m2rnn,4,64,0.1,0.0,10,200,64,S5\n")
    (tmp_path / "solo.csv").write_text(header + "m2rnn,5,64,0.3,0.0,10,300,64,S5\n")
    for order in (["group.csv", "solo.csv"], ["solo.csv", "group.csv"]):
        rows = state_tracking_report.read_rows([str(tmp_path / name) for name in order])
        assert sorted((r["seed"], r["steps"], r["position_accuracy"]) for r in rows) == [
            (4, 200, 0.1), (5, 300, 0.3)]


def test_merges_separate_runs_and_plots_their_progress(tmp_path, capsys, monkeypatch):
    m2rnn = {"layer_pattern": "M", "m2rnn": {"num_heads": 2, "key_dim": 4, "value_dim": 4,
                                             "backend": "scan"}}
    attention = {"layer_pattern": "A", "attention": {"num_heads": 2}}
    results, logs = [], []
    for name, model in (("m2rnn", m2rnn), ("attention", attention)):
        out = tmp_path / name
        capsys.readouterr()
        cli.main(["--config", str(tiny_experiment(tmp_path, {name: model}, name)),
                  "--out", str(out), "--seeds", "1", "--no-progress"])
        log = tmp_path / f"{name}.log"
        log.write_text(capsys.readouterr().out)
        results.append(str(out / "results.csv"))
        logs.append(str(log))
    prefix = str(tmp_path / "merged")
    monkeypatch.setattr(sys, "argv", ["state_tracking_report.py", "--out", prefix,
                                      "--results", *results, "--logs", *logs])
    state_tracking_report.main()
    printed = capsys.readouterr().out
    assert "m2rnn" in printed and "attention" in printed and "L=12" in printed

    with open(prefix + ".csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["model"], int(r["length"])) for r in rows} == {
        (m, n) for m in ("m2rnn", "attention") for n in (6, 12)}
    # Every step of the tiny runs (log_every 1, 3 steps) was read from the logs.
    for log in logs:
        with open(log) as fh:
            runs = state_tracking_report.read_progress(fh.read())
        (points,) = runs.values()
        assert [p[0] for p in points] == [1, 2, 3]
        assert all(0.0 <= p[1] <= 1.0 and p[2] == 6 for p in points)
        # The evaluation summary each invocation prints (the real cli's line format).
        evaluations, changes = state_tracking_report.read_evaluations(open(log).read())
        assert list(evaluations) == [0] and changes == {}
        ((step, accs),) = evaluations[0]
        assert step == 3 and sorted(accs) == [6, 12] and all(0 <= a <= 1 for a in accs.values())
    for path in (prefix + ".png", prefix + "_progress.png", prefix + "_evals.png"):
        image = plt.imread(path)
        assert image.ndim == 3 and image[..., :3].std() > 0.01


def test_refuses_runs_of_different_groups(tmp_path, monkeypatch):
    paths = []
    for group in ("S3", "S5"):
        path = tmp_path / f"{group}.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(state_tracking_report.report.CSV_COLUMNS)
            writer.writerow(["m2rnn", 0, 16, 0.5, 0.1, 100, 10, 16, group])
        paths.append(str(path))
    monkeypatch.setattr(sys, "argv", ["x", "--out", str(tmp_path / "m"), "--results", *paths])
    with pytest.raises(SystemExit, match="one group"):
        state_tracking_report.main()


def test_position_accuracy_from_a_runs_checkpoint(tmp_path, monkeypatch, capsys):
    """benchmarks/state_tracking_positions.py reads a run's checkpoint (same config) and
    writes one accuracy per position; its first position matches a direct evaluation."""
    import state_tracking_positions
    from m2rnn_jax.typed_config import load_yaml
    from m2rnn_experiments.state_tracking.config import ExperimentConfig
    from m2rnn_experiments.state_tracking.tasks import eval_word_problems
    from m2rnn_experiments.state_tracking.training import ModelRunner

    model = {"layer_pattern": "M", "m2rnn": {"num_heads": 2, "key_dim": 4, "value_dim": 4,
                                             "backend": "scan"}}
    config_path = tiny_experiment(tmp_path, {"m2rnn": model})
    out = tmp_path / "run"
    cli.main(["--config", str(config_path), "--out", str(out), "--seeds", "1",
              "--first-seed", "3", "--no-progress"])
    prefix = str(tmp_path / "positions")
    monkeypatch.setattr(sys, "argv", ["x", "--config", str(config_path), "--run", f"3:{out}",
                                      "--length", "10", "--sequences", "8", "--batch-size", "4",
                                      "--out", prefix])
    state_tracking_positions.main()
    with open(prefix + ".csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["position"]) for r in rows] == list(range(1, 11))
    assert all(r["seed"] == "3" and r["step"] == "3" for r in rows)
    accuracies = [float(r["accuracy"]) for r in rows]
    assert all(0.0 <= a <= 1.0 for a in accuracies)

    config = load_yaml(ExperimentConfig, config_path)
    group = cli.build_group(config.task)
    runner = ModelRunner("m2rnn", config.model_config("m2rnn", group.order), config.train)
    params, step, _ = state_tracking_positions.load_run(runner, config, 3, str(out))
    words = eval_word_problems(group, config.task.eval_seed, 8, 10)
    first = np.mean(np.argmax(np.asarray(runner._logits(params, words.tokens)), -1)[:, 0]
                    == words.targets[:, 0])
    assert step == 3 and accuracies[0] == pytest.approx(first)
    image = plt.imread(prefix + ".png")
    assert image.ndim == 3 and image[..., :3].std() > 0.01
    with pytest.raises(SystemExit, match="no checkpoint"):
        state_tracking_positions.load_run(runner, config, 4, str(out))


def test_margins_of_a_runs_checkpoint(tmp_path, capsys):
    """benchmarks/state_tracking_margins.py: a run's checkpoint file gives per-position losses
    equal to the direct cross-entropy (plain and label-smoothed, in float64 NumPy) and margins
    whose sign says right or wrong."""
    import state_tracking_margins
    from m2rnn_jax.typed_config import load_yaml
    from m2rnn_experiments.state_tracking.config import ExperimentConfig
    from m2rnn_experiments.state_tracking.tasks import eval_word_problems
    from m2rnn_experiments.state_tracking.training import ModelRunner

    model = {"layer_pattern": "M", "m2rnn": {"num_heads": 2, "key_dim": 4, "value_dim": 4,
                                             "backend": "scan"}}
    config_path = tiny_experiment(tmp_path, {"m2rnn": model})
    out = tmp_path / "run"
    cli.main(["--config", str(config_path), "--out", str(out), "--seeds", "1", "--no-progress"])
    ckpt = str(out / "checkpoints" / "m2rnn_seed0.msgpack")
    capsys.readouterr()
    state_tracking_margins.main(["--config", str(config_path), f"0:{ckpt}", "--sequences", "8",
                                 "--batch-size", "4"])
    printed = capsys.readouterr().out
    assert "seed 0 step 3: loss mean" in printed and "margin median" in printed

    config = load_yaml(ExperimentConfig, config_path)
    group = cli.build_group(config.task)
    runner = ModelRunner("m2rnn", config.model_config("m2rnn", group.order), config.train)
    params = runner.init_params(0)
    words = eval_word_problems(group, 1, 6, config.task.train_length)
    tokens, targets = np.asarray(words.tokens), np.asarray(words.targets)
    loss, margin = state_tracking_margins.losses_and_margins(runner, params, tokens, targets,
                                                             0.0, 4)
    logits = np.asarray(runner._logits(params, tokens), np.float64)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, want, rtol=1e-4, atol=1e-6)
    assert np.array_equal(margin > 0, logits.argmax(-1) == targets)
    smoothed, _ = state_tracking_margins.losses_and_margins(runner, params, tokens, targets,
                                                            0.3, 4)
    order = logits.shape[-1]
    labels = np.full(logits.shape, 0.3 / order)
    np.put_along_axis(labels, targets[..., None], 0.7 + 0.3 / order, -1)
    np.testing.assert_allclose(smoothed, -(labels * log_p).sum(-1), rtol=1e-4, atol=1e-6)


def test_after_first_error_tells_a_clean_slip_from_a_blur():
    """state_tracking_positions.after_first_error on S4 words: a state that jumps to a wrong
    element at step 6 and is then tracked exactly (predictions = the true prefix products
    from a wrong state) keeps one left offset; predictions that alternate between right and
    wrong change it at every position."""
    import state_tracking_positions
    from m2rnn_experiments.state_tracking.groups import group_by_name
    from m2rnn_experiments.state_tracking.tasks import eval_word_problems

    group = group_by_name("S4")
    words = eval_word_problems(group, 7, 3, 20)
    targets = np.asarray(words.targets)
    tokens = np.asarray(words.tokens)
    slipped = targets.copy()
    state = targets[:, 4]  # right up to position 5
    wrong_state = group.table[state, 1]  # the state times a non-identity element
    for t in range(5, 20):  # from position 6 on: the wrong state, tracked exactly
        wrong_state = group.table[wrong_state, tokens[:, t]]
        slipped[:, t] = wrong_state
    assert np.all(slipped[:, 5:] != targets[:, 5:])
    got = state_tracking_positions.after_first_error(group, slipped, targets)
    assert got == {"words_wrong": 3, "first_error": 6.0, "earliest_error": 6,
                   "offset_changes": 0.0, "right_after_first_error": 0.0}

    blurred = targets.copy()
    blurred[:, 9::2] = group.table[targets[:, 9::2], 1]  # wrong at positions 10, 12, ...
    got = state_tracking_positions.after_first_error(group, blurred, targets)
    assert got["first_error"] == 10 and got["offset_changes"] == 10
    assert got["right_after_first_error"] == pytest.approx(5 / 11)
    assert state_tracking_positions.after_first_error(group, targets, targets) is None


def test_drift_helpers_against_brute_force():
    """benchmarks/state_tracking_drift.py: permutation parity against the determinant of the
    permutation matrix; the centroid distance and the linear probe on synthetic states whose
    answers are known."""
    import state_tracking_drift as drift
    from m2rnn_experiments.state_tracking.groups import group_by_name

    group = group_by_name("S4")
    parity = drift.permutation_parity(group)
    dets = [np.linalg.det(np.eye(group.degree)[perm]) for perm in group.elements]
    np.testing.assert_array_equal(parity, (np.round(dets) < 0).astype(int))
    assert parity.sum() == group.order // 2

    rng = np.random.default_rng(0)
    length, batch, dim, num_elements = 12, 40, 24, 6
    codes = rng.normal(size=(num_elements, dim)).astype(np.float32)
    elements = rng.integers(0, num_elements, size=(length, batch))
    correct = np.ones((length, batch), bool)
    # Exact codes up to position 6, then a noise that grows with the position.
    noise = np.arange(length)[:, None, None] >= 6
    scale = np.maximum(np.arange(length) - 5, 0)[:, None, None] * 0.5
    states = codes[elements] + noise * scale * rng.normal(size=(length, batch, dim))
    states = states.astype(np.float32)
    distance = drift.centroid_distance(states, elements, correct, 1, 6)
    np.testing.assert_allclose(distance[:6], 0.0, atol=1e-3)
    assert np.all(np.diff(distance[6:]) > 0)
    probe = drift.probe_accuracy(states, elements, correct, 1, 6)
    np.testing.assert_array_equal(probe[:6], 1.0)
    assert probe[-1] < 0.9
    # A label the states do not hold is not read: the probe is fitted and scored on other words.
    random_labels = rng.integers(0, 2, size=(length, batch))
    assert drift.probe_accuracy(states, random_labels, correct, 1, 6)[:6].mean() < 0.8


def test_drift_from_a_runs_checkpoint(tmp_path, monkeypatch, capsys):
    """The drift script follows the states token by token: its accuracy is the full-sequence
    model's; a head whose state is zeroed after every step forgets the past (its state at t
    depends on token t alone: no conv window here), the other heads do not."""
    import state_tracking_drift as drift
    from m2rnn_jax.typed_config import load_yaml
    from m2rnn_experiments.state_tracking.config import ExperimentConfig
    from m2rnn_experiments.state_tracking.tasks import eval_word_problems
    from m2rnn_experiments.state_tracking.training import ModelRunner

    model = {"layer_pattern": "MM", "m2rnn": {"num_heads": 2, "key_dim": 1, "value_dim": 4,
                                              "backend": "scan", "transition_init": "normal",
                                              "conv_kernel": 1}}
    config_path = tiny_experiment(tmp_path, {"m2rnn": model})
    out = tmp_path / "run"
    cli.main(["--config", str(config_path), "--out", str(out), "--seeds", "1",
              "--first-seed", "1", "--no-progress"])
    config = load_yaml(ExperimentConfig, config_path)
    group = cli.build_group(config.task)
    runner = ModelRunner("m2rnn", config.model_config("m2rnn", group.order), config.train)
    params, _, _ = drift.load_run(runner, config, 1, str(out))
    words = eval_word_problems(group, config.task.eval_seed, 8, 12)
    logits, states = drift.states_along(runner, params, words.tokens)
    full = np.asarray(runner._logits(params, words.tokens))
    np.testing.assert_allclose(logits.transpose(1, 0, 2), full, rtol=1e-4, atol=1e-4)
    assert len(states) == 2 and states[0].shape == (12, 8, 2 * 1 * 4)
    tokens = np.array(words.tokens)
    tokens[:, 5] = 2  # every word has the same token at position 6, after different pasts
    _, kept = drift.states_along(runner, params, tokens)
    _, zeroed = drift.states_along(runner, params, tokens, zeroed=((0, 1),))
    head1, head0 = slice(4, 8), slice(0, 4)
    assert np.ptp(kept[0][5, :, head1], axis=0).max() > 1e-4  # the past shows in the state
    np.testing.assert_allclose(np.ptp(zeroed[0][5, :, head1], axis=0), 0.0, atol=1e-6)
    np.testing.assert_allclose(zeroed[0][:, :, head0], kept[0][:, :, head0], rtol=1e-6)

    prefix = str(tmp_path / "drift")
    monkeypatch.setattr(sys, "argv", ["x", "--config", str(config_path), "--run", f"1:{out}",
                                      "--zero-state", "1:2:1", "--length", "12", "--sequences",
                                      "8", "--centroid-from", "2", "--out", prefix])
    drift.main()
    with open(prefix + ".csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["run"] for r in rows} == {"seed 1", "seed 1, state 0 in 2:1"}
    plain = [float(r["accuracy"]) for r in rows if r["run"] == "seed 1"]
    want = (full.argmax(-1) == words.targets).mean(0)
    np.testing.assert_allclose(plain, want)
    assert "have the right parity" in capsys.readouterr().out
    image = plt.imread(prefix + ".png")
    assert image.ndim == 3 and image[..., :3].std() > 0.01


def test_interpolation_between_two_checkpoints_of_a_run(tmp_path, capsys):
    """benchmarks/state_tracking_interpolate.py: w = 0 and w = 1 evaluate the two checkpoints
    themselves (as the cli's own evaluation of each), and their distance is reported."""
    import shutil
    import state_tracking_interpolate

    model = {"layer_pattern": "M", "m2rnn": {"num_heads": 2, "key_dim": 4, "value_dim": 4,
                                             "backend": "scan"}}
    config_path = tiny_experiment(tmp_path, {"m2rnn": model})
    out = tmp_path / "run"
    ckpt = out / "checkpoints" / "m2rnn_seed1.msgpack"
    evals = []
    for steps in (3, 9):  # the second call resumes from the first's checkpoint
        results = cli.main(["--config", str(config_path), "--out", str(out), "--seeds", "1",
                            "--first-seed", "1", "--no-progress", "--steps", str(steps),
                            "--set", "train.learning_rate=0.05"])
        evals.append({e["length"]: e["position_accuracy"] for e in results[0].evals})
        if steps == 3:
            shutil.copy(ckpt, tmp_path / "first.msgpack")
    capsys.readouterr()
    state_tracking_interpolate.main([
        "--config", str(config_path), "--seed", "1", str(tmp_path / "first.msgpack"),
        str(ckpt), "--weights", "0,1,0.5", "--lengths", "6,12"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("steps 3 -> 9;")
    assert float(lines[0].rsplit("=", 1)[1]) > 0
    rows = {float(line.split()[0]): [float(x) for x in re.findall(r"([\d.]+) \(", line)]
            for line in lines[2:]}
    assert set(rows) == {0.0, 1.0, 0.5}
    for w, cli_evals in ((0.0, evals[0]), (1.0, evals[1])):
        assert rows[w] == pytest.approx([100 * cli_evals[6], 100 * cli_evals[12]], abs=0.006)
