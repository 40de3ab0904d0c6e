"""The state-tracking experiment: word-problem generators against brute-force
permutation-matrix products, its config, its training loop (resuming, schedules, seeds trained
together) and its command."""

import csv
import dataclasses
import itertools
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
import pytest
import yaml
from flax import nnx, serialization

from m2rnn_experiments.state_tracking import checkpoint, cli, groups, merge_runs, tasks, training
from m2rnn_experiments.state_tracking.config import (ExperimentConfig,
                                                     StateTrackingTrainConfig, TaskConfig)
from m2rnn_experiments.state_tracking.training import (ModelRunner, label_smoothing_on,
                                                       length_decay_factor, token_losses)
from m2rnn_jax import HybridLM, decay_mask
from m2rnn_jax.typed_config import ConfigError, load_yaml

CONFIG_DIR = (pathlib.Path(__file__).resolve().parents[1] / "experiments" / "state_tracking"
              / "configs")


def permutation_matrix(p):
    """P[i, p[i]] = 1, so that P_a @ P_b is "apply a, then b"."""
    m = np.zeros((len(p), len(p)), np.int64)
    m[np.arange(len(p)), p] = 1
    return m


def brute_force_prefix_products(group, tokens):
    """Running products by multiplying permutation matrices left to right."""
    mats = [permutation_matrix(p) for p in group.elements]
    out = np.empty(tokens.shape, np.int64)
    for b in range(tokens.shape[0]):
        acc = np.eye(group.degree, dtype=np.int64)
        for t in range(tokens.shape[1]):
            acc = acc @ mats[tokens[b, t]]
            matches = [e for e, m in enumerate(mats) if np.array_equal(m, acc)]
            assert len(matches) == 1, "a product must be exactly one element of the group"
            out[b, t] = matches[0]
    return out


CUSTOM_GENERATORS = [[1, 2, 0, 3, 4, 5], [0, 1, 2, 4, 5, 3], [3, 4, 5, 0, 1, 2]]  # (Z3 x Z3) ⋊ Z2


@pytest.mark.parametrize("make, order", [
    (lambda: groups.group_by_name("S3"), 6),
    (lambda: groups.group_by_name("S5"), 120),
    (lambda: groups.from_generators(CUSTOM_GENERATORS, name="custom"), 18),
    (lambda: groups.group_by_name("Z7"), 7),
    (lambda: groups.group_by_name("D5"), 10),
])
def test_word_problem_targets_match_matrix_products(make, order):
    group = make()
    assert group.order == order
    assert np.array_equal(group.elements[0], np.arange(group.degree))
    assert len({tuple(p) for p in group.elements}) == order  # no duplicates
    rng = np.random.default_rng(order)
    batch = tasks.sample_word_problems(group, rng, batch_size=3, length=11)
    assert batch.tokens.shape == batch.targets.shape == batch.mask.shape == (3, 11)
    assert batch.tokens.dtype == batch.targets.dtype == np.int32
    np.testing.assert_array_equal(batch.targets, brute_force_prefix_products(group, batch.tokens))
    np.testing.assert_array_equal(batch.mask, 1.0)


@pytest.mark.parametrize("n", [3, 5])
def test_symmetric_group_holds_every_permutation(n):
    group = groups.symmetric(n)
    assert {tuple(p) for p in group.elements} == set(itertools.permutations(range(n)))
    assert group.order == math.factorial(n)


def test_group_families_have_the_documented_orders_and_structure():
    assert groups.group_by_name("A5").order == 60
    assert groups.group_by_name("D4").order == 8
    z6 = groups.group_by_name("Z6")
    assert np.array_equal(z6.table, z6.table.T)  # cyclic: abelian
    d4 = groups.group_by_name("D4")
    assert not np.array_equal(d4.table, d4.table.T)  # dihedral n >= 3: not abelian
    for group in (groups.group_by_name("S4"), d4, groups.group_by_name("A4")):
        # Latin square: each row and column of a group's Cayley table is a permutation.
        assert all(sorted(row) == list(range(group.order)) for row in group.table)
        assert all(sorted(col) == list(range(group.order)) for col in group.table.T)


def test_uniform_lengths_mask_a_prefix_and_generators_are_seeded():
    group = groups.group_by_name("S3")
    first = tasks.sample_word_problems(group, np.random.default_rng(7), 64, 9, "uniform")
    again = tasks.sample_word_problems(group, np.random.default_rng(7), 64, 9, "uniform")
    other = tasks.sample_word_problems(group, np.random.default_rng(8), 64, 9, "uniform")
    np.testing.assert_array_equal(first.tokens, again.tokens)
    np.testing.assert_array_equal(first.mask, again.mask)
    assert not np.array_equal(first.tokens, other.tokens)
    lengths = first.mask.sum(axis=1)
    assert lengths.min() >= 1 and lengths.max() <= 9 and len(set(lengths)) > 1
    np.testing.assert_array_equal(first.mask, np.arange(9)[None, :] < lengths[:, None])
    evals = tasks.eval_word_problems(group, seed=3, num_sequences=5, length=6)
    np.testing.assert_array_equal(evals.tokens,
                                  tasks.eval_word_problems(group, 3, 5, 6).tokens)


def test_length_curriculum_masks_late_positions_and_grows_to_the_train_length():
    group = groups.group_by_name("S3")
    batch = tasks.sample_word_problems(group, np.random.default_rng(1), 8, 12, "fixed", 5)
    assert batch.tokens.shape == batch.mask.shape == (8, 12)  # shapes never change
    np.testing.assert_array_equal(batch.mask, np.repeat((np.arange(12) < 5)[None], 8, 0))
    uniform = tasks.sample_word_problems(group, np.random.default_rng(1), 64, 12, "uniform", 5)
    assert uniform.mask.sum(axis=1).max() <= 5
    lengths = [tasks.curriculum_length(step, 4, 64, 100) for step in range(120)]
    assert lengths[0] == 4 and lengths[100:] == [64] * 20
    assert all(a <= b for a, b in zip(lengths, lengths[1:])) and 16 in lengths
    assert tasks.curriculum_length(0, 4, 64, 0) == 64  # off
    with pytest.raises(ValueError, match="scored_length"):
        tasks.sample_word_problems(group, np.random.default_rng(1), 8, 12, "fixed", 13)
    with pytest.raises(ConfigError, match="curriculum_start_length"):
        TaskConfig(train_length=8, curriculum_steps=10, curriculum_start_length=16)
    # The accuracy-gated curriculum: doubles at the threshold, never past the train length.
    assert tasks.gated_curriculum_length(2, 0.95, 0.95, 64) == 4
    assert tasks.gated_curriculum_length(2, 0.94, 0.95, 64) == 2
    assert tasks.gated_curriculum_length(48, 0.99, 0.95, 64) == 64
    with pytest.raises(ConfigError, match="two curricula"):
        TaskConfig(curriculum_steps=10, curriculum_accuracy=0.9)
    with pytest.raises(ConfigError, match="curriculum_accuracy"):
        TaskConfig(curriculum_accuracy=1.5)


@pytest.mark.parametrize("raise_error, message", [
    (lambda: groups.group_by_name("Q8"), "group must be"),
    (lambda: groups.from_generators([[0, 0, 1]]), "generators must be permutations"),
    (lambda: groups.dihedral(2), "n >= 3"),
    (lambda: tasks.sample_word_problems(groups.cyclic(3), np.random.default_rng(0), 2, 0),
     "length must be"),
    (lambda: tasks.sample_word_problems(groups.cyclic(3), np.random.default_rng(0), 2, 4, "rand"),
     "length_sampling"),
    (lambda: tasks.prefix_products(groups.cyclic(3), np.array([[0, 3]])), "tokens must be"),
])
def test_bad_task_arguments_raise_clear_errors(raise_error, message):
    with pytest.raises(ValueError, match=message):
        raise_error()


# --- the experiment config and the command ---------------------------------------------------

@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_build_every_model(path):
    config = load_yaml(ExperimentConfig, path)
    group = cli.build_group(config.task)
    assert config.model_names
    for name in config.models:
        model = config.model_config(name, group.order)
        assert model.vocab_size == group.order


def test_s5_long_size_matched_baselines_have_m2rnns_parameter_count():
    config = load_yaml(ExperimentConfig, CONFIG_DIR / "s5_long.yaml")
    order = cli.build_group(config.task).order

    def num_params(name):
        return ModelRunner(name, config.model_config(name, order), config.train).num_params

    m2rnn = num_params("m2rnn")
    matched = [name for name in config.models if name.endswith("_1m")]
    assert sorted(matched) == ["attention_1m", "attention_rope_1m", "gated_deltanet_1m",
                               "mamba2_1m"]
    for name in matched:
        assert abs(num_params(name) / m2rnn - 1) < 0.05, name
        # ... where the default baselines have under a third of it.
        assert num_params(name.removesuffix("_1m")) < m2rnn / 3


def tiny_experiment(tmp_path, models, name="tiny"):
    data = {
        "task": {"group": "S3", "train_length": 6, "eval_lengths": [6, 12],
                 "eval_sequences": 8, "eval_batch_size": 8},
        "train": {"steps": 3, "batch_size": 4, "warmup_steps": 1, "seeds": 2, "log_every": 1},
        "base_model": {"d_model": 16, "mlp": {"hidden_dim": 16}, "compute_dtype": "float32"},
        "models": models,
        "out_dir": str(tmp_path / "unused"),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_command_writes_well_formed_results_and_exits_zero(tmp_path, capsys):
    """The command, as its console script runs it (``sys.exit(main(argv))``), exits with 0
    and writes results.csv, results.json and the plot for every (model, seed, length); a
    headless run says what its first call took, as soon as it returns."""
    models = {
        # The configs' departures from the layer's defaults (random W, linear v) go through.
        "m2rnn": {"layer_pattern": "M", "m2rnn": {"num_heads": 2, "key_dim": 4, "value_dim": 4,
                                                 "backend": "scan", "transition_init": "normal",
                                                 "value_activation": "identity"}},
        "attention_rope": {"layer_pattern": "A", "attention": {"num_heads": 2, "rope": True}},
    }
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exited:
        sys.exit(cli.main([
            "--config", str(tiny_experiment(tmp_path, models)), "--out", str(out),
            "--models", "m2rnn,attention_rope", "--seeds", "1", "--first-seed", "2",
            "--no-progress", "--set", "train.log_every=3"]))
    assert exited.value.code in (0, None)
    printed = capsys.readouterr().out
    for model in models:
        assert re.search(rf"^{model} seed 2: first call [0-9.]+ s \(compilation and 1 step\)$",
                         printed, re.MULTILINE), model

    with open(out / "results.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 2 * 2  # models x seeds x lengths
    assert {(r["model"], int(r["seed"]), int(r["length"])) for r in rows} == {
        (m, 2, n) for m in models for n in (6, 12)}  # --first-seed 2
    for r in rows:
        assert 0.0 <= float(r["position_accuracy"]) <= 1.0
        assert 0.0 <= float(r["sequence_accuracy"]) <= float(r["position_accuracy"]) + 1e-9
        assert int(r["num_params"]) > 0 and r["group"] == "S3" and int(r["train_length"]) == 6

    report = json.loads((out / "results.json").read_text())
    assert len(report["results"]) == len(rows)
    assert report["config"]["task"]["group"] == "S3" and report["config"]["group_order"] == 6
    for row, csv_row in zip(report["results"], rows):
        assert row["position_accuracy"] == pytest.approx(float(csv_row["position_accuracy"]))
    # In the config's order of models (yaml.safe_dump sorted them), whatever --models says.
    assert [r["model"] for r in report["runs"]] == sorted(models)
    assert all(r["steps"] == 3 and np.isfinite(r["final_loss"]) for r in report["runs"])
    assert all(r["final_scored_length"] == 6 for r in report["runs"])
    assert report["config"]["train"]["log_every"] == 3  # --set

    image = plt.imread(out / "accuracy_vs_length.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    assert image[..., :3].std() > 0.01  # not a blank canvas


def test_a_run_stopped_by_the_time_budget_says_so(tmp_path, capsys):
    """The summary line of a run the time budget stopped names it and the steps asked, and
    merge_runs still reads the line's steps and accuracies; a finished run's line does not."""
    models = {"m2rnn": {"layer_pattern": "M", "m2rnn": {"num_heads": 2, "key_dim": 4,
                                                        "value_dim": 4, "backend": "scan"}}}
    config = tiny_experiment(tmp_path, models)
    base = ["--config", str(config), "--seeds", "1", "--no-progress"]
    assert cli.main(base + ["--out", str(tmp_path / "cut"), "--time-budget-s", "1e-9"]) == 0
    stopped = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  seed")]
    assert len(stopped) == 1 and stopped[0].endswith("; stopped by the time budget, 3 steps asked")
    (step, accuracies), = merge_runs.read_evaluations(stopped[0])[0][0]
    assert step < 3 and sorted(accuracies) == [6, 12], stopped[0]
    for length, accuracy in accuracies.items():
        assert f"L={length}: {100 * accuracy:.1f}%" in stopped[0]
    assert cli.main(base + ["--out", str(tmp_path / "whole")]) == 0
    finished = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  seed")]
    assert finished[0].startswith("  seed 0: 3 steps") and "time budget" not in finished[0]


def test_results_keep_other_runs_of_the_same_settings(tmp_path, capsys):
    """Models and seeds run one invocation at a time into one folder add up in its results (in
    the config's order; a run made again replaces its rows; the backend and logging are not
    settings of a run); an invocation under other settings writes its own runs only, says why
    and moves the earlier file aside, as it does an unreadable one."""
    models = {name: {"layer_pattern": "M", "m2rnn": {"num_heads": 2, "key_dim": 4,
                                                     "value_dim": 4, "backend": "scan"}}
              for name in ("first", "second")}
    out = tmp_path / "out"
    base = ["--config", str(tiny_experiment(tmp_path, models)), "--out", str(out), "--seeds",
            "1", "--no-progress"]

    def runs_in_results():
        with open(out / "results.csv") as fh:
            rows = [(row["model"], int(row["seed"])) for row in csv.DictReader(fh)]
        report = json.loads((out / "results.json").read_text())
        runs = [(run["model"], run["seed"]) for run in report["runs"]]
        assert rows == [run for run in runs for _ in (6, 12)]  # two evaluation lengths each
        assert [(row["model"], row["seed"]) for row in report["results"]] == rows
        return runs

    def printed():
        return capsys.readouterr().out

    assert cli.main(base + ["--models", "second"]) == 0
    assert cli.main(base + ["--models", "first", "--set", "train.log_every=2"]) == 0
    assert cli.main(base + ["--models", "second", "--first-seed", "1", "--set",
                            "models.second.m2rnn.backend=auto"]) == 0
    assert cli.main(base + ["--models", "second"]) == 0  # done: evaluated again, rows replaced
    assert runs_in_results() == [("first", 0), ("second", 0), ("second", 1)]
    assert "leave out earlier runs" not in printed()

    assert cli.main(base + ["--models", "first", "--first-seed", "2", "--set",
                            "train.warmup_steps=2"]) == 0
    assert runs_in_results() == [("first", 2)]
    note = [line for line in printed().splitlines() if "leave out earlier runs" in line]
    assert len(note) == 1 and "first seed 0, second seed 0, second seed 1" in note[0]
    assert "differing: train.warmup_steps" in note[0]
    aside = json.loads((out / "results.earlier-1.json").read_text())
    assert len(aside["runs"]) == 3

    (out / "results.json").write_text("{")
    assert cli.main(base + ["--models", "first"]) == 0
    assert runs_in_results() == [("first", 0)] and "is unreadable" in printed()
    assert (out / "results.earlier-2.json").read_text() == "{"


def test_installed_console_script_exits_zero(tmp_path):
    """The installed ``m2rnn-state-tracking`` runs a one-step experiment and exits with 0."""
    script = shutil.which("m2rnn-state-tracking", path=sysconfig.get_path("scripts"))
    assert script, f"m2rnn-state-tracking is not installed in {sysconfig.get_path('scripts')}"
    out = tmp_path / "out"
    models = {"attention": {"layer_pattern": "A", "attention": {"num_heads": 2}}}
    done = subprocess.run(
        [script, "--config", str(tiny_experiment(tmp_path, models)), "--out", str(out),
         "--seeds", "1", "--steps", "1", "--eval-lens", "6", "--no-progress"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (out / "results.csv").exists() and "attention" in done.stdout


def test_config_errors_name_the_key(tmp_path):
    models = {"m2rnn": {"layer_pattern": "M", "m2rnn": {"key_dim": 4}}}
    path = tiny_experiment(tmp_path, models)
    with pytest.raises(ConfigError, match="run lists model 'nope'"):
        cli.load_config(cli.parse_args(["--config", str(path), "--models", "nope"]))
    for models in ("m2rnn,m2rnn", " , "):
        with pytest.raises(ConfigError, match="--models takes distinct"):
            cli.load_config(cli.parse_args(["--config", str(path), "--models", models]))
    with pytest.raises(ConfigError, match="train.stepz"):
        cli.load_config(cli.parse_args(["--config", str(path), "--set", "train.stepz=3"]))
    with pytest.raises(ConfigError, match="models.m2rnn.vocab_size is set by the group"):
        load_yaml(ExperimentConfig, tiny_experiment(
            tmp_path, {"m2rnn": {"layer_pattern": "M", "vocab_size": 7}}, name="bad"))
    with pytest.raises(ConfigError, match=r"m2rnn\.value_activation"):
        cli.load_config(cli.parse_args(["--config", str(path), "--set",
                                        "models.m2rnn.m2rnn.value_activation=gelu"]))
    with pytest.raises(ValueError, match=r"models\.m2rnn.*m2rnn\.key_dim"):
        cli.load_config(cli.parse_args(["--config", str(path), "--set",
                                        "models.m2rnn.m2rnn.key_dim=0"]))
    config, _ = cli.load_config(cli.parse_args(["--config", str(path), "--group", "D4",
                                                "--eval-lens", "5,9", "--train-len", "3"]))
    assert config.task.group == "D4" and config.task.eval_lengths == [5, 9]
    assert cli.build_group(config.task).order == 8


def test_model_overrides_may_add_keys_below_the_model_sections(tmp_path):
    models = {"m2rnn": {"layer_pattern": "M", "m2rnn": {"key_dim": 4}}}
    path = tiny_experiment(tmp_path, models)
    config, _ = cli.load_config(cli.parse_args([
        "--config", str(path), "--set", "base_model.norm_eps=0.001",
        "--set", "base_model.mlp.hidden_dim=24", "--set", "models.m2rnn.m2rnn.value_dim=8"]))
    built = config.model_config("m2rnn", vocab_size=6)
    assert (built.norm_eps, built.mlp.hidden_dim, built.m2rnn.value_dim) == (0.001, 24, 8)
    with pytest.raises(ConfigError, match=r"unknown config key: models\.other"):
        cli.load_config(cli.parse_args(["--config", str(path), "--set",
                                        "models.other.d_model=8"]))


def test_default_config_is_the_groups_else_s5():
    for group, name in (("S3", "s3.yaml"), ("D4", "s5.yaml"), (None, "s5.yaml")):
        argv = [] if group is None else ["--group", group]
        config, path = cli.load_config(cli.parse_args(argv))
        assert pathlib.Path(path) == CONFIG_DIR / name
        assert config.task.group == (group or "S5")


def test_command_does_not_import_grain():
    """The GPU image has no grain: the experiment must not pull in train/'s data pipeline."""
    code = ("import sys, m2rnn_experiments.state_tracking.cli; "
            "assert 'grain' not in sys.modules, sorted(m for m in sys.modules if 'grain' in m)")
    subprocess.run([sys.executable, "-c", code], check=True,
                   cwd=pathlib.Path(__file__).resolve().parents[1])


def test_models_are_causal_so_curriculum_prefixes_are_exact(tmp_path):
    """A curriculum step trains on a prefix of the words (training.py): exact only if no model
    looks ahead. Logits of a prefix must equal the prefix of the full logits, for every model
    kind of the experiments, with chunked layers at a length that is not a multiple of their
    chunk."""
    models = {
        "m2rnn": {"layer_pattern": "M", "m2rnn": {"num_heads": 2, "key_dim": 4, "value_dim": 4,
                                                 "backend": "scan"}},
        "attention": {"layer_pattern": "A", "attention": {"num_heads": 2}},
        "mamba2": {"layer_pattern": "S", "mamba2": {"num_heads": 2, "head_dim": 4,
                                                    "state_dim": 4, "chunk_size": 4}},
        "gated_deltanet": {"layer_pattern": "D", "gated_deltanet": {
            "num_heads": 2, "key_dim": 4, "value_dim": 4, "chunk_size": 4}},
    }
    config = load_yaml(ExperimentConfig, tiny_experiment(tmp_path, models))
    tokens = np.random.default_rng(0).integers(0, 6, size=(3, 11)).astype(np.int32)
    for name in models:
        runner = ModelRunner(name, config.model_config(name, 6), config.train)
        params = runner.init_params(0)
        full = np.asarray(runner.logits(params, tokens))
        for width in (2, 5):
            prefix = np.asarray(runner.logits(params, tokens[:, :width]))
            np.testing.assert_allclose(prefix, full[:, :width], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{name} at width {width}")


def test_runs_resume_from_checkpoints_exactly(tmp_path):
    """A run stopped part-way and continued from its checkpoint ends where an uninterrupted
    run ends (same parameters, curriculum length and data), and bad checkpoints are named."""


    config = load_yaml(ExperimentConfig, tiny_experiment(tmp_path, TINY_M2RNN))
    config = cli.override(config, ["train.steps=6", "train.log_every=2",
                                   "task.curriculum_accuracy=1e-6",
                                   "task.curriculum_start_length=2"])
    group = cli.build_group(config.task)

    def runner(steps):
        train = dataclasses.replace(config.train, steps=steps)
        return ModelRunner("m2rnn", config.model_config("m2rnn", group.order), train)

    whole = runner(6)
    want = whole.run(0, group, config.task, progress=False)
    path = str(tmp_path / "ckpt" / "m2rnn_seed0.msgpack")
    # Stop after the first logged step (deadline already passed), then resume to the end.
    first = whole.run(0, group, config.task, deadline=0.0, progress=False,
                      checkpoint_path=path)
    assert first.steps == 2 and os.path.exists(path)
    got = whole.run(0, group, config.task, progress=False, checkpoint_path=path)
    assert got.resumed_from_step == 2 and got.steps == 6
    assert got.final_scored_length == want.final_scored_length == 6  # grew 2 -> 4 -> 6
    assert got.final_loss == pytest.approx(want.final_loss, rel=1e-5)
    assert got.evals == want.evals

    # Other settings (here: the batch size) or a damaged file: a clear error naming the file
    # and what differs (a file from before the settings were saved: its fingerprint).
    other = ModelRunner("m2rnn", config.model_config("m2rnn", group.order),
                        dataclasses.replace(config.train, batch_size=8))
    with pytest.raises(checkpoint.ResumeError,
                       match=r"m2rnn_seed0.msgpack was written under other settings \(differing: "
                             r"train\.batch_size;.*--restart"):
        other.run(0, group, config.task, progress=False, checkpoint_path=path)
    with pytest.raises(checkpoint.ResumeError, match=r"\(differing: seed;"):
        whole.run(1, group, config.task, progress=False, checkpoint_path=path)
    old_format = str(tmp_path / "old" / "m2rnn_seed0.msgpack")
    payload = serialization.msgpack_restore(open(path, "rb").read())
    meta = json.loads(payload["meta"])
    del meta["settings"]
    os.makedirs(os.path.dirname(old_format))
    with open(old_format, "wb") as fh:
        fh.write(serialization.msgpack_serialize({**payload, "meta": json.dumps(meta)}))
    with pytest.raises(checkpoint.ResumeError, match=r"\(fingerprint [0-9a-f]{16}, this run"):
        other.run(0, group, config.task, progress=False, checkpoint_path=old_format)
    assert whole.run(0, group, config.task, progress=False,
                     checkpoint_path=old_format).resumed_from_step == 6  # and resumes when equal
    # The recurrence's backend is not a setting of the run: the file resumes under another.
    model = config.model_config("m2rnn", group.order)
    moved = ModelRunner("m2rnn", dataclasses.replace(
        model, m2rnn=dataclasses.replace(model.m2rnn, backend="auto")), config.train)
    assert moved.run(0, group, config.task, progress=False,
                     checkpoint_path=path).resumed_from_step == 6
    with open(path, "r+b") as fh:
        fh.truncate(100)
    with pytest.raises(checkpoint.ResumeError, match="m2rnn_seed0.msgpack is unreadable"):
        whole.run(0, group, config.task, progress=False, checkpoint_path=path)


TINY_M2RNN = {"m2rnn": {"layer_pattern": "M", "m2rnn": {"num_heads": 2, "key_dim": 2,
                                                       "value_dim": 4, "backend": "scan"}}}


def tiny_m2rnn_runs(tmp_path, overrides):
    """``(config, group, runner)`` of the tiny one-layer M²RNN experiment with ``overrides``;
    ``runner(**train)`` is a ``ModelRunner`` with those ``StateTrackingTrainConfig`` fields
    replaced."""


    config = cli.override(load_yaml(ExperimentConfig, tiny_experiment(tmp_path, TINY_M2RNN)),
                          overrides)
    group = cli.build_group(config.task)

    def runner(**train):
        return ModelRunner("m2rnn", config.model_config("m2rnn", group.order),
                           dataclasses.replace(config.train, **train))

    return config, group, runner


def trained_params(run, group, task_config, path):
    """The parameter leaves ``run`` (a ``ModelRunner``) saves to ``path`` after training
    seed 0."""
    run.run(0, group, task_config, progress=False, checkpoint_path=path)
    return jax.tree.leaves(run.load_saved(path, task_config, 0).params)


def test_runs_continue_under_a_new_schedule(tmp_path, capsys, monkeypatch):
    """More steps, another learning rate, Adam's ε, the batch's scale and label smoothing
    continue a finished run from its checkpoint (and the runner says what changed; the scale
    multiplies the words drawn per step); the same run restarted under the new schedule ends
    elsewhere."""
    config, group, runner = tiny_m2rnn_runs(tmp_path, ["train.steps=4", "train.log_every=2"])
    path = str(tmp_path / "ckpt" / "m2rnn_seed0.msgpack")
    assert runner().run(0, group, config.task, progress=False, checkpoint_path=path).steps == 4
    capsys.readouterr()
    drawn = []
    original = training.sample_word_problems

    def counting(group, rng, batch_size, *args):
        drawn.append(batch_size)
        return original(group, rng, batch_size, *args)

    monkeypatch.setattr(training, "sample_word_problems", counting)
    longer = runner(steps=8, learning_rate=1e-4, adam_eps=1e-3, batch_scale=3,
                    label_smoothing=0.05)
    got = longer.run(0, group, config.task, progress=False, checkpoint_path=path)
    assert got.resumed_from_step == 4 and got.steps == 8
    printed = capsys.readouterr().out
    assert "new schedule" in printed and "learning_rate 0.003 -> 0.0001" in printed
    for change in ("steps 4 -> 8", "adam_eps 1e-08 -> 0.001", "batch_scale 1 -> 3",
                   "label_smoothing 0.0 -> 0.05"):
        assert change in printed, (change, printed)
    assert drawn and set(drawn) == {3 * config.train.batch_size}, drawn
    fresh = longer.run(0, group, config.task, progress=False)
    assert fresh.resumed_from_step == 0 and fresh.final_loss != pytest.approx(got.final_loss)


def test_runner_optimizer_is_adamw_with_the_experiments_schedule(tmp_path):
    """The runner's optimizer (``train.optimizer``'s builder) against optax's AdamW written out
    with this experiment's schedule: linear warmup over ``min(warmup_steps, steps - 1)``, cosine
    to ``learning_rate · min_lr_ratio`` at ``steps``, global-norm clipping, no weight decay
    where the layers say so, ``adam_eps`` as ε. A large ε makes the steps proportional to the
    gradient, so the parameters move far less at the same rate."""


    config, group, runner = tiny_m2rnn_runs(tmp_path, [])
    settings = dict(steps=5, warmup_steps=2, learning_rate=1e-2, min_lr_ratio=0.1,
                    weight_decay=0.1, clip_grad_norm=1.0, adam_eps=1e-6)
    run = runner(**settings)
    params = run.init_params(0)
    _, abstract = nnx.split(nnx.eval_shape(lambda: HybridLM(run.model_config,
                                                            rngs=nnx.Rngs(0))), nnx.Param)
    mask = nnx.to_pure_dict(decay_mask(abstract))
    assert set(jax.tree.leaves(mask)) == {True, False}
    want = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(
        optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, 5, 1e-3), b1=0.9, b2=0.99, eps=1e-6,
        weight_decay=0.1, mask=mask))
    rng = np.random.default_rng(0)
    got_state, want_state = run.optimizer.init(params), want.init(params)
    for _ in range(5):
        grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(np.float32) * 0.1,
                             params)
        got, got_state = run.optimizer.update(grads, got_state, params)
        expected, want_state = want.update(grads, want_state, params)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-9)

    def moved(**train):
        optimizer = runner(warmup_steps=0, min_lr_ratio=1.0, **train).optimizer
        grads = jax.tree.map(lambda p: np.full(p.shape, 1e-3, np.float32), params)
        updates, _ = optimizer.update(grads, optimizer.init(params), params)
        return float(sum(np.sum(np.square(u)) for u in jax.tree.leaves(updates)))

    assert 0 < moved(adam_eps=10.0) < 1e-3 * moved()


@pytest.mark.parametrize("settings, key", [
    ({"adam_eps": 0.0}, "adam_eps"), ({"batch_scale": 0}, "batch_scale"),
    ({"label_smoothing": 1.0}, "label_smoothing"),
    ({"label_smoothing_from": "end"}, "label_smoothing_from"),
    ({"learning_rate": 0.0}, "learning_rate"), ({"b2": 1.0}, "b2"),
    ({"min_lr_ratio": 1.5}, "min_lr_ratio"), ({"clip_grad_norm": 0.0}, "clip_grad_norm"),
    ({"length_decay_ratio": 0.0}, "length_decay_ratio"), ({"seeds_per_step": 0}, "seeds_per_step"),
])
def test_bad_training_settings_are_config_errors_naming_the_key(settings, key):
    with pytest.raises(ConfigError, match=rf"^train\.{key} "):
        StateTrackingTrainConfig(**settings)


def test_label_smoothing_loss_against_numpy():
    """``token_losses`` with α: cross-entropy against (1 − α)·onehot + α/K, checked in float64
    NumPy; its minimum over the logits is at a finite margin, where plain cross-entropy keeps
    falling."""


    rng = np.random.default_rng(5)
    logits = rng.normal(size=(3, 7, 11)) * 3
    targets = rng.integers(0, 11, size=(3, 7))
    alpha = 0.1
    labels = np.full((3, 7, 11), alpha / 11)
    np.put_along_axis(labels, targets[..., None], 1 - alpha + alpha / 11, -1)
    shifted = logits - logits.max(-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    want = -(labels * log_p).sum(-1)
    got = np.asarray(token_losses(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                                  alpha))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    plain = np.asarray(token_losses(jnp.asarray(logits, jnp.float32), jnp.asarray(targets)))
    np.testing.assert_allclose(plain, -np.take_along_axis(log_p, targets[..., None], -1)[..., 0],
                               rtol=1e-5)

    def loss_at_margin(margin, smoothing):
        one = jnp.zeros((1, 11)).at[0, 0].set(margin)
        return float(token_losses(one, jnp.zeros((1,), jnp.int32), smoothing)[0])

    best = np.log(1 + (1 - alpha) * 11 / alpha)
    assert loss_at_margin(best, alpha) < min(loss_at_margin(best - 1, alpha),
                                             loss_at_margin(best + 1, alpha))
    assert loss_at_margin(best + 1, 0.0) < loss_at_margin(best, 0.0)


def test_label_smoothing_switches_on_at_the_training_length():
    cfg = StateTrackingTrainConfig(label_smoothing=0.1, label_smoothing_from="train_length")
    assert [label_smoothing_on(cfg, step, 5) for step in (4, 5, 6)] == [False, True, True]
    assert not label_smoothing_on(cfg, 100, None)
    assert label_smoothing_on(StateTrackingTrainConfig(label_smoothing=0.1), 0, None)


def test_label_smoothing_from_the_training_length(tmp_path):
    """``train.label_smoothing_from="train_length"``: a run whose curriculum has not reached
    the training length trains as with plain cross-entropy; one without a curriculum (the
    training length from step 0) as with label smoothing from the start; and label smoothing
    does change the trajectory. Compared on the parameters each run saves."""
    def final_params(overrides, name, **train):
        config, group, runner = tiny_m2rnn_runs(tmp_path, ["train.steps=4", "train.log_every=2"]
                                                + overrides)
        return trained_params(runner(**train), group, config.task,
                              str(tmp_path / name / "m2rnn_seed0.msgpack"))

    def close(a, b):
        return all(np.allclose(x, y, rtol=1e-6, atol=1e-7) for x, y in zip(a, b))

    gated = ["task.curriculum_accuracy=0.99", "task.curriculum_start_length=2"]
    late = {"label_smoothing": 0.1, "label_smoothing_from": "train_length"}
    assert close(final_params(gated, "gated_late", **late), final_params(gated, "gated_plain"))
    from_start = final_params([], "start", label_smoothing=0.1)
    assert close(final_params([], "late", **late), from_start)
    assert not close(final_params([], "plain"), from_start)


def test_length_decay_factor_falls_geometrically_from_the_curriculum_end():
    cfg = StateTrackingTrainConfig(length_decay_steps=100, length_decay_ratio=0.02)
    assert length_decay_factor(cfg, 50, None) == 1.0  # not at the training length yet
    assert length_decay_factor(cfg, 10, 10) == pytest.approx(1.0)
    assert length_decay_factor(cfg, 60, 10) == pytest.approx(math.sqrt(0.02))  # halfway
    assert length_decay_factor(cfg, 85, 10) == pytest.approx(0.02 ** 0.75)
    assert length_decay_factor(cfg, 110, 10) == length_decay_factor(cfg, 10 ** 6, 10) == 0.02
    assert length_decay_factor(StateTrackingTrainConfig(), 60, 10) == 1.0  # off by default


def test_length_decay_starts_at_the_curriculum_end_and_survives_a_resume(tmp_path, capsys):
    """The decay starts when the gated curriculum reaches the training length (and says so);
    a run continued from a checkpoint taken after that step ends exactly where an
    uninterrupted run ends (the step is saved); the decay changes the trajectory."""
    # A constant base rate, so that only the decay depends on when the run stops.
    config, group, make = tiny_m2rnn_runs(tmp_path, [
        "train.log_every=2", "train.warmup_steps=0", "train.min_lr_ratio=1.0",
        "train.learning_rate=3e-2", "task.curriculum_accuracy=1e-6",
        "task.curriculum_start_length=2"])

    def runner(steps, decay=4):
        return make(steps=steps, length_decay_steps=decay, length_decay_ratio=0.1)

    capsys.readouterr()
    whole = runner(10).run(0, group, config.task, progress=False)
    assert "step 4: scored length at the training length" in capsys.readouterr().out
    path = str(tmp_path / "ckpt" / "m2rnn_seed0.msgpack")
    runner(6).run(0, group, config.task, progress=False, checkpoint_path=path)  # reached at 4
    resumed = runner(10).run(0, group, config.task, progress=False, checkpoint_path=path)
    assert resumed.resumed_from_step == 6
    assert resumed.final_loss == pytest.approx(whole.final_loss, rel=1e-5)
    assert resumed.evals == whole.evals
    no_decay = runner(10, decay=0).run(0, group, config.task, progress=False)
    assert no_decay.final_loss != pytest.approx(whole.final_loss, rel=1e-4)


def test_seeds_trained_together_match_seeds_trained_alone(tmp_path, capsys):
    """``run_seeds``: two seeds in one vmapped step — one fresh, one resumed further along its
    curriculum (so the step runs at the wider width and the other seed's extra positions are
    unscored), leaving the group when it reaches ``train.steps`` — end as each ends alone.
    The command line groups seeds with ``--seeds-per-step``."""
    config, group, make = tiny_m2rnn_runs(tmp_path, [
        "train.log_every=2", "task.curriculum_accuracy=1e-6", "task.curriculum_start_length=2"])

    runner = make(steps=8)
    alone_paths = [str(tmp_path / "alone" / f"m2rnn_seed{seed}.msgpack") for seed in (0, 1)]
    alone = [runner.run(seed, group, config.task, progress=False, checkpoint_path=path)
             for seed, path in zip((0, 1), alone_paths)]
    paths = [str(tmp_path / "ckpt" / f"m2rnn_seed{seed}.msgpack") for seed in (0, 1)]
    runner.run(1, group, config.task, progress=False, checkpoint_path=paths[1],
               deadline=0.0)  # seed 1 stops after 2 steps, at length 4
    capsys.readouterr()
    together = runner.run_seeds([0, 1], group, config.task, progress=False,
                                checkpoint_paths=paths)
    out = capsys.readouterr().out
    assert "seed 1: resumed at step 2" in out
    assert [r.resumed_from_step for r in together] == [0, 2]
    for got, want in zip(together, alone):
        assert got.steps == want.steps == 8
        assert got.final_scored_length == want.final_scored_length
        assert got.final_loss == pytest.approx(want.final_loss, rel=1e-4)
        assert got.evals == want.evals
    for got_path, want_path in zip(paths, alone_paths):  # each seed's own final parameters
        trees = [jax.tree.leaves(serialization.msgpack_restore(open(p, "rb").read())["tree"])
                 for p in (got_path, want_path)]
        for got_leaf, want_leaf in zip(*trees):
            np.testing.assert_allclose(got_leaf, want_leaf, rtol=1e-4, atol=1e-6)
    # Another seed's data and init: the two trajectories differ (the test can tell them apart).
    assert alone[0].final_loss != pytest.approx(alone[1].final_loss, rel=1e-3)

    args = cli.parse_args(["--config", str(tmp_path / "tiny.yaml"), "--seeds-per-step",
                           "2"])
    assert cli.load_config(args)[0].train.seeds_per_step == 2
