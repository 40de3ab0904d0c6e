"""The state-tracking analyses: ``merge_runs`` (merging per-process results, reading the
command's progress lines from a real headless run, so a change of the log format fails here),
``positions`` (accuracy per position from a run's checkpoint) and ``margins`` (losses and logit
margins of a checkpoint)."""

import contextlib
import csv
import io
import json
import os
import shutil

import matplotlib.pyplot as plt
import numpy as np
import pytest

from m2rnn_experiments.state_tracking import cli, margins, merge_runs, positions
from m2rnn_experiments.state_tracking.groups import group_by_name
from m2rnn_experiments.state_tracking.tasks import eval_word_problems
from m2rnn_jax.typed_config import ConfigError, read_yaml
from test_state_tracking import tiny_experiment


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
    runs = merge_runs.read_progress(log)
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
    evaluations, changes = merge_runs.read_evaluations(log)
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
    progress, evaluations, changes, unplaced = merge_runs.merge_logs([group_log, solo_log])
    assert progress[("m2rnn", 5)] == [(100, 0.5, 2), (200, 0.7, 4), (300, 0.9, 8)]
    assert progress[("m2rnn", 4)] == [(100, 0.4, 2)]
    assert [step for step, _ in evaluations[("m2rnn", 5)]] == [100, 200, 300]
    assert evaluations[("m2rnn", 5)][2][1] == {64: pytest.approx(0.3)}
    assert changes == {("m2rnn", 5): [(200, "learning_rate 0.002 -> 1e-05")]}
    assert unplaced == []
    # Another model's log with the same seed stays apart.
    other_log = tmp_path / "other.txt"
    other_log.write_text(solo_log.read_text().replace("m2rnn seed", "mamba2 seed"))
    _, evaluations, _, _ = merge_runs.merge_logs([group_log, solo_log, other_log])
    assert sorted(evaluations) == [("m2rnn", 5), ("mamba2", 5)]
    assert [step for step, _ in evaluations[("mamba2", 5)]] == [300]

    header = ",".join(merge_runs.report.CSV_COLUMNS) + "\n"
    (tmp_path / "group.csv").write_text(header + "m2rnn,5,64,0.2,0.0,10,200,64,S5\n"
                                        "m2rnn,4,64,0.1,0.0,10,200,64,S5\n")
    (tmp_path / "solo.csv").write_text(header + "m2rnn,5,64,0.3,0.0,10,300,64,S5\n")
    for order in (["group.csv", "solo.csv"], ["solo.csv", "group.csv"]):
        rows = merge_runs.read_rows([str(tmp_path / name) for name in order])
        assert sorted((r["seed"], r["steps"], r["position_accuracy"]) for r in rows) == [
            (4, 200, 0.1), (5, 300, 0.3)]
    # One name with another parameter count (another seed): two models, an error naming both.
    (tmp_path / "other.csv").write_text(header + "m2rnn,7,64,0.3,0.0,12,300,64,S5\n")
    with pytest.raises(merge_runs.ConfigError, match=r"'m2rnn' has 10 parameters in .*group.csv "
                       r"and 12 in .*other.csv: two models under one name"):
        merge_runs.read_rows([str(tmp_path / name) for name in ("group.csv", "other.csv")])


SEED = 3
MODELS = {"m2rnn": {"layer_pattern": "M", "m2rnn": {"num_heads": 2, "key_dim": 4,
                                                    "value_dim": 4, "backend": "scan"}},
          "attention": {"layer_pattern": "A", "attention": {"num_heads": 2}}}


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """One headless run of the command per model of ``MODELS`` (seed ``SEED``, 3 steps, a
    progress line at every step), each in its own folder: ``{model: (config path, output
    folder, log path)}``."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for name, model in MODELS.items():
        config_path = tiny_experiment(root, {name: model}, name)
        out, log = root / name, root / f"{name}.log"
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            cli.run_experiment(["--config", str(config_path), "--out", str(out), "--seeds", "1",
                                "--first-seed", str(SEED), "--no-progress"])
        log.write_text(printed.getvalue())
        runs[name] = config_path, out, log
    return runs


def test_merges_separate_runs_and_plots_their_progress(tiny_runs, tmp_path, capsys):
    results = [str(out / "results.csv") for _, out, _ in tiny_runs.values()]
    logs = [str(log) for _, _, log in tiny_runs.values()]
    prefix = str(tmp_path / "merged")
    merge_runs.main(["--out", prefix, "--results", *results, "--logs", *logs])
    printed = capsys.readouterr().out
    assert "m2rnn" in printed and "attention" in printed and "L=12" in printed

    with open(prefix + ".csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {(r["model"], int(r["length"])) for r in rows} == {
        (m, n) for m in ("m2rnn", "attention") for n in (6, 12)}
    # Every step of the tiny runs (log_every 1, 3 steps) was read from the logs.
    for log in logs:
        with open(log) as fh:
            runs = merge_runs.read_progress(fh.read())
        (points,) = runs.values()
        assert [p[0] for p in points] == [1, 2, 3]
        assert all(0.0 <= p[1] <= 1.0 and p[2] == 6 for p in points)
        # The evaluation summary each invocation prints (the real cli's line format).
        evaluations, changes = merge_runs.read_evaluations(open(log).read())
        assert list(evaluations) == [SEED] and changes == {}
        ((step, accs),) = evaluations[SEED]
        assert step == 3 and sorted(accs) == [6, 12] and all(0 <= a <= 1 for a in accs.values())
    for path in (prefix + ".png", prefix + "_progress.png", prefix + "_evals.png"):
        image = plt.imread(path)
        assert image.ndim == 3 and image[..., :3].std() > 0.01

    # One log of two models: its evaluation lines cannot say whose they are, so they are left
    # out (no _evals plot) while its progress is still drawn.
    both = tmp_path / "both.log"
    both.write_text("".join(open(log).read() for log in logs))
    mixed = str(tmp_path / "mixed")
    assert merge_runs.main(["--out", mixed, "--results", *results, "--logs", str(both)]) == 0
    assert f"no model or several: one log per model's command): {both}" in capsys.readouterr().out
    assert os.path.exists(mixed + "_progress.png") and not os.path.exists(mixed + "_evals.png")


def test_refuses_runs_of_different_groups(tmp_path, capsys):
    paths = []
    for group in ("S3", "S5"):
        path = tmp_path / f"{group}.csv"
        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(merge_runs.report.CSV_COLUMNS)
            writer.writerow(["m2rnn", 0, 16, 0.5, 0.1, 100, 10, 16, group])
        paths.append(str(path))
    assert merge_runs.main(["--out", str(tmp_path / "m"), "--results", *paths]) == 2
    assert "runs of one group" in capsys.readouterr().err


def test_position_accuracy_from_a_runs_checkpoint(tiny_runs, tmp_path, capsys):
    """``positions`` reads a run's checkpoint (same config) and writes one accuracy per
    position; its first position matches a direct evaluation, and its summary gives the
    mean over the spans the words reach (here past the training length, 6, but short of
    twice it)."""
    config_path, out, _ = tiny_runs["m2rnn"]
    prefix = str(tmp_path / "positions")
    positions.main(["--config", str(config_path), "--run", f"{SEED}:{out}", "--length", "10",
                    "--sequences", "8", "--batch-size", "4", "--out", prefix])
    with open(prefix + ".csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["position"]) for r in rows] == list(range(1, 11))
    assert all(r["seed"] == str(SEED) and r["step"] == "3" for r in rows)
    accuracies = [float(r["accuracy"]) for r in rows]
    assert all(0.0 <= a <= 1.0 for a in accuracies)
    summary = capsys.readouterr().out.split("accuracy at positions ")[1].splitlines()[0]
    assert summary == (f"1-6 {np.mean(accuracies[:6]):.3f}, "
                       f"7-10 {np.mean(accuracies[6:]):.3f}")

    config, group, runner = positions.load_runner(config_path, "m2rnn")
    params, step, _ = positions.load_run(runner, config, SEED, str(out))
    words = eval_word_problems(group, config.task.eval_seed, 8, 10)
    first = np.mean(np.argmax(np.asarray(runner.logits(params, words.tokens)), -1)[:, 0]
                    == words.targets[:, 0])
    assert step == 3 and accuracies[0] == pytest.approx(first)
    image = plt.imread(prefix + ".png")
    assert image.ndim == 3 and image[..., :3].std() > 0.01
    with pytest.raises(ConfigError, match="no checkpoint"):
        positions.load_run(runner, config, SEED + 1, str(out))


def test_analyses_read_a_runs_own_config_and_report_mistakes_in_one_line(tiny_runs, tmp_path,
                                                                          capsys):
    """``positions`` and ``margins`` take the config a run's results.json records (its
    command's flags included), so a --config of other settings does not stop them; without
    one they need the right --config. Mistakes, in them and in ``merge_runs``, are one line
    ``prog: error: ...`` and exit status 2."""
    config_path, out, _ = tiny_runs["m2rnn"]
    other = read_yaml(config_path)
    other["train"]["batch_size"] = 8  # another batch: another run
    other_path = tmp_path / "other.yaml"
    other_path.write_text(json.dumps(other))
    bare = tmp_path / "bare"  # the run's checkpoints without its results.json
    shutil.copytree(out / "checkpoints", bare / "checkpoints")
    ckpt = f"checkpoints/m2rnn_seed{SEED}.msgpack"
    small = ["--length", "6", "--sequences", "4", "--batch-size", "4",
             "--out", str(tmp_path / "p")]

    def error_of(status):
        errors = [line for line in capsys.readouterr().err.splitlines() if ": error: " in line]
        assert status == 2 and len(errors) == 1, (status, errors)
        return errors[0]

    assert positions.main(["--config", str(other_path), "--run", f"{SEED}:{out}", *small]) == 0
    assert margins.main([f"{SEED}:{out / ckpt}", "--sequences", "4", "--batch-size", "4"]) == 0
    assert f"seed {SEED} step 3" in capsys.readouterr().out
    refused = error_of(
        positions.main(["--config", str(other_path), "--run", f"{SEED}:{bare}", *small]))
    # what differs is named; the training command's advice (--restart) is not
    assert "cannot be read as seed" in refused and "under other settings (differing: " in refused
    assert "--restart" not in refused
    assert "cannot be read as seed" in error_of(
        margins.main(["--config", str(other_path), f"{SEED}:{bare / ckpt}"]))
    assert positions.main(["--config", str(config_path), "--run", f"{SEED}:{bare}",
                           *small]) == 0
    capsys.readouterr()
    assert "results.json: pass --config" in error_of(
        positions.main(["--run", f"{SEED}:{bare}", *small]))
    loose = tmp_path / "loose.msgpack"  # a checkpoint outside a run folder
    shutil.copy(out / ckpt, loose)
    assert f"no results.json beside {loose}" in error_of(margins.main([f"{SEED}:{loose}"]))
    # An unreadable results.json: --config serves, and the tool says which config it took.
    (bare / "results.json").write_text("{")
    assert positions.main(["--config", str(config_path), "--run", f"{SEED}:{bare}",
                           *small]) == 0
    assert f"{config_path} ({bare / 'results.json'} unusable" in capsys.readouterr().out
    for seed in ("x", "-1", "²"):
        assert "expected SEED:OUT" in error_of(positions.main([f"--run={seed}:{out}", *small]))
    assert "expected SEED:FILE with a seed >= 0, e.g. 0:runs/s5/checkpoints/" in error_of(
        margins.main([str(out / ckpt)]))
    assert "--label-smoothing" in error_of(
        margins.main([f"{SEED}:{out / ckpt}", "--label-smoothing", "2"]))
    assert "--sequences must be" in error_of(
        positions.main(["--run", f"{SEED}:{out}", *small, "--sequences", "0"]))
    assert "no such file" in error_of(
        merge_runs.main(["--out", str(tmp_path / "m"), "--results", str(tmp_path / "x.csv")]))
    assert "is not a results.csv" in error_of(
        merge_runs.main(["--out", str(tmp_path / "m"), "--results", str(out / "results.json")]))


def test_position_summary_covers_the_spans_the_words_reach():
    assert positions.summary_spans(64, 16) == [(1, 16)]
    assert positions.summary_spans(64, 64) == [(1, 64)]
    assert positions.summary_spans(64, 100) == [(1, 64), (65, 100)]
    assert positions.summary_spans(64, 150) == [(1, 64), (65, 128), (129, 150)]
    assert positions.summary_spans(64, 1024) == [(1, 64), (65, 128), (961, 1024)]


def test_margins_of_a_runs_checkpoint(tiny_runs, capsys):
    """``margins``: a run's checkpoint file gives per-position losses equal to the direct
    cross-entropy (plain and label-smoothed, in float64 NumPy) and margins whose sign says
    right or wrong."""
    config_path, out, _ = tiny_runs["m2rnn"]
    ckpt = str(out / "checkpoints" / f"m2rnn_seed{SEED}.msgpack")
    margins.main(["--config", str(config_path), f"{SEED}:{ckpt}", "--sequences", "8",
                  "--batch-size", "4"])
    printed = capsys.readouterr().out
    assert f"seed {SEED} step 3: loss mean" in printed and "margin median" in printed

    config, group, runner = positions.load_runner(config_path, "m2rnn")
    params = runner.init_params(0)
    words = eval_word_problems(group, 1, 6, config.task.train_length)
    tokens, targets = np.asarray(words.tokens), np.asarray(words.targets)
    loss, margin = margins.losses_and_margins(runner, params, tokens, targets, 0.0, 4)
    logits = np.asarray(runner.logits(params, tokens), np.float64)
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    want = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, want, rtol=1e-4, atol=1e-6)
    assert np.array_equal(margin > 0, logits.argmax(-1) == targets)
    smoothed, _ = margins.losses_and_margins(runner, params, tokens, targets, 0.3, 4)
    order = logits.shape[-1]
    labels = np.full(logits.shape, 0.3 / order)
    np.put_along_axis(labels, targets[..., None], 0.7 + 0.3 / order, -1)
    np.testing.assert_allclose(smoothed, -(labels * log_p).sum(-1), rtol=1e-4, atol=1e-6)


def test_after_first_error_tells_a_clean_slip_from_a_blur():
    """``positions.after_first_error`` on S4 words: a state that jumps to a wrong
    element at step 6 and is then tracked exactly (predictions = the true prefix products
    from a wrong state) keeps one left offset; predictions that alternate between right and
    wrong change it at every position."""
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
    got = positions.after_first_error(group, slipped, targets)
    assert got == {"words_wrong": 3, "first_error": 6.0, "earliest_error": 6,
                   "offset_changes": 0.0, "right_after_first_error": 0.0}

    blurred = targets.copy()
    blurred[:, 9::2] = group.table[targets[:, 9::2], 1]  # wrong at positions 10, 12, ...
    got = positions.after_first_error(group, blurred, targets)
    assert got["first_error"] == 10 and got["offset_changes"] == 10
    assert got["right_after_first_error"] == pytest.approx(5 / 11)
    assert positions.after_first_error(group, targets, targets) is None
