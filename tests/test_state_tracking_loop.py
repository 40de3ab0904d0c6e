"""The state-tracking experiment's loop on the device (``train.steps_per_dispatch``): words drawn
with ``jax.random`` against NumPy's prefix products, N steps per call against N calls of one
step, independence of N, the gated curriculum, resuming, compilations per curriculum width,
the settings, and the stop when a run is exact on held-out words."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from m2rnn_experiments.state_tracking import checkpoint, cli, groups, tasks
from m2rnn_experiments.state_tracking.config import ExperimentConfig, StateTrackingTrainConfig
from m2rnn_experiments.state_tracking.training import ModelRunner
from m2rnn_jax.typed_config import ConfigError, from_dict

# One tiny M²RNN on S3 at length 4; a step curriculum 2 -> 4 over the first 4 steps with the
# length decay and label smoothing from its end, so that every step-dependent schedule changes
# inside a call.
EXPERIMENT = {
    "task": {"group": "S3", "train_length": 4, "eval_lengths": [4], "eval_sequences": 4,
             "eval_batch_size": 4, "curriculum_steps": 4, "curriculum_start_length": 2},
    "train": {"steps": 8, "batch_size": 4, "warmup_steps": 1, "seeds": 2, "log_every": 1,
              "length_decay_steps": 3, "length_decay_ratio": 0.1, "label_smoothing": 0.1,
              "label_smoothing_from": "train_length", "word_generator": "device"},
    "base_model": {"d_model": 8, "mlp": {"hidden_dim": 8}, "compute_dtype": "float32"},
    "models": {"m2rnn": {"layer_pattern": "M", "m2rnn": {
        "num_heads": 1, "key_dim": 1, "value_dim": 4, "backend": "scan",
        "transition_init": "normal", "value_activation": "identity"}}},
}
GATED = ["task.curriculum_steps=0", "task.curriculum_accuracy=1e-6"]


@pytest.fixture(scope="module")
def experiment():
    """``(config, group, runner)``; ``runner(n)`` is the (cached) ``ModelRunner`` with
    ``steps_per_dispatch=n``, shared by the tests so that each width compiles once."""
    config = from_dict(ExperimentConfig, EXPERIMENT)
    group = cli.build_group(config.task)
    runners = {}

    def runner(n):
        if n not in runners:
            train = dataclasses.replace(config.train, steps_per_dispatch=n)
            runners[n] = ModelRunner("m2rnn", config.model_config("m2rnn", group.order), train)
        return runners[n]

    return config, group, runner


def train_seeds(runner, group, task, folder, **kwargs):
    """Trains seeds 0 and 1 together (checkpoints in ``folder``); their results and saved
    parameter leaves."""
    paths = [str(folder / f"m2rnn_seed{seed}.msgpack") for seed in (0, 1)]
    results = runner.run_seeds([0, 1], group, task, progress=False, checkpoint_paths=paths,
                               **kwargs)
    params = [jax.tree.leaves(runner.load_saved(path, task, seed).params)
              for seed, path in enumerate(paths)]
    return results, params


def assert_close(got, want):
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def differ(got, want):
    return any(not np.allclose(g, w, rtol=1e-3, atol=1e-5) for g, w in zip(got, want))


@pytest.mark.parametrize("group", [groups.group_by_name("S5"),
                                   groups.from_generators([[1, 2, 0, 3], [0, 1, 3, 2]], "Z3xZ2")],
                         ids=lambda g: g.name)
def test_device_words_are_uniform_with_numpys_prefix_products(group):
    """The device generator's targets are ``tasks.prefix_products`` of its tokens; tokens are
    uniform over the group, fixed by (seed, step), and the same in a narrower call; the mask
    scores a prefix of ``scored_length`` (fixed) or of U{1..scored_length} (uniform)."""
    table = jnp.asarray(group.table)
    draw = jax.jit(tasks.device_word_problems,
                   static_argnames=("batch_size", "length", "width", "length_sampling"))
    tokens, targets, mask = map(np.asarray, draw(table, 3, 17, batch_size=64, length=32,
                                                 scored_length=jnp.int32(32)))
    assert tokens.shape == targets.shape == mask.shape == (64, 32)
    assert tokens.dtype == targets.dtype == np.int32 and mask.dtype == np.float32
    np.testing.assert_array_equal(targets, tasks.prefix_products(group, tokens))
    counts = np.bincount(tokens.ravel(), minlength=group.order)
    assert counts.size == group.order and counts.min() > 0  # every element is drawn
    expected = tokens.size / group.order
    assert np.abs(counts - expected).max() < 6 * np.sqrt(expected)
    np.testing.assert_array_equal(mask, 1.0)

    narrow, narrow_targets, narrow_mask = map(np.asarray, draw(
        table, 3, 17, batch_size=64, length=32, width=8, scored_length=jnp.int32(5)))
    np.testing.assert_array_equal(narrow, tokens[:, :8])
    np.testing.assert_array_equal(narrow_targets, targets[:, :8])
    np.testing.assert_array_equal(narrow_mask, np.repeat((np.arange(8) < 5)[None], 64, 0))
    for seed, step in ((3, 18), (4, 17)):
        other = np.asarray(draw(table, seed, step, batch_size=64, length=32)[0])
        assert not np.array_equal(other, tokens)

    _, _, uniform = map(np.asarray, draw(table, 3, 17, batch_size=64, length=32, width=16,
                                         scored_length=jnp.int32(9), length_sampling="uniform"))
    lengths = uniform.sum(axis=1)
    assert lengths.min() >= 1 and lengths.max() <= 9 and len(set(lengths)) > 3
    np.testing.assert_array_equal(uniform, np.arange(16)[None, :] < lengths[:, None])
    with pytest.raises(ValueError, match="width"):
        tasks.device_word_problems(table, 0, 0, 2, 4, width=5)


def test_n_steps_per_call_equal_n_calls_and_do_not_depend_on_n(experiment, tmp_path, capsys):
    """8 steps of two seeds (vmapped) as 8 calls of one step and as 2 calls of 4, all on the
    device words: the same parameters and losses; a step curriculum compiles the call once per
    width, not once per call. A run stopped after its first step and resumed under 3 steps per
    call (calls end at multiples of 3: steps 1-2, 3-5 with the schedules' switch at step 4
    inside it, 6-7 and one step past the run's end) ends there too."""
    config, group, runner = experiment
    one_results, one = train_seeds(runner(1), group, config.task, tmp_path / "n1")
    assert runner(1)._train_dispatch._cache_size() == 2  # widths 2 and 4, over 8 calls
    assert "step 4: scored length at the training length" in capsys.readouterr().out
    assert differ(one[0], one[1])  # the seeds' trajectories differ: the checks can fail
    results, params = train_seeds(runner(4), group, config.task, tmp_path / "n4")
    for seed in (0, 1):
        assert results[seed].steps == 8 and results[seed].final_scored_length == 4
        assert results[seed].final_loss == pytest.approx(one_results[seed].final_loss, rel=1e-5)
        assert_close(params[seed], one[seed])

    resumed_dir = tmp_path / "resumed"
    first, _ = train_seeds(runner(1), group, config.task, resumed_dir, deadline=0.0)
    assert [r.steps for r in first] == [1, 1]
    results, params = train_seeds(runner(3), group, config.task, resumed_dir)
    assert [r.resumed_from_step for r in results] == [1, 1]
    for seed in (0, 1):
        assert_close(params[seed], one[seed])


def test_gated_curriculum_advances_between_calls_and_resumes(experiment, tmp_path, capsys):
    """The accuracy-gated curriculum reads each call's last step: with 4 steps per call the
    length grows 2 -> 4 after step 4 (not before), and a run stopped after its first call
    (curriculum length in the file) and resumed ends where the uninterrupted run ends."""
    config, group, runner = experiment
    task = cli.override(config, GATED).task
    whole, want = train_seeds(runner(4), group, task, tmp_path / "whole")
    printed = capsys.readouterr().out
    assert "step 4, training accuracy" in printed and "at length 2 -> length 4" in printed
    assert printed.count("-> length") == 2  # once per seed
    assert all(r.final_scored_length == 4 and r.steps == 8 for r in whole)

    first, _ = train_seeds(runner(4), group, task, tmp_path / "parts", deadline=0.0)
    assert [r.steps for r in first] == [4, 4]
    assert all(r.final_scored_length == 2 for r in first)  # trained at 2; the file holds 4
    got, params = train_seeds(runner(4), group, task, tmp_path / "parts")
    for seed in (0, 1):
        assert got[seed].resumed_from_step == 4 and got[seed].final_scored_length == 4
        assert got[seed].final_loss == pytest.approx(whole[seed].final_loss, rel=1e-5)
        assert_close(params[seed], want[seed])


def test_steps_per_dispatch_settings(tmp_path):
    """The flag sets the key; bad values are one-line errors naming it; the number of steps
    per call is not part of a run's fingerprint, the word generator is (as resolved: NumPy's
    words hash as they did before the keys existed)."""
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(EXPERIMENT))
    args = cli.parse_args(["--config", str(path), "--steps-per-dispatch", "16"])
    assert cli.load_config(args)[0].train.steps_per_dispatch == 16
    with pytest.raises(ConfigError, match=r"^train\.steps_per_dispatch must be a positive"):
        cli.load_config(cli.parse_args(["--config", str(path), "--steps-per-dispatch", "0"]))
    with pytest.raises(ConfigError, match=r"^train\.word_generator 'numpy' .* needs 'device'"):
        StateTrackingTrainConfig(steps_per_dispatch=4, word_generator="numpy")
    with pytest.raises(ConfigError, match=r"^train\.word_generator must be one of"):
        StateTrackingTrainConfig(word_generator="gpu")
    assert not StateTrackingTrainConfig().device_words
    assert StateTrackingTrainConfig(steps_per_dispatch=2).device_words
    assert StateTrackingTrainConfig(word_generator="device").device_words

    config = from_dict(ExperimentConfig, EXPERIMENT)
    model = config.model_config("m2rnn", 6)

    def fingerprint(**train):
        return checkpoint.fingerprint(model, StateTrackingTrainConfig(**train), config.task, 0)

    numpy_words = fingerprint()
    assert numpy_words == fingerprint(word_generator="numpy")
    device_words = fingerprint(word_generator="device")
    assert device_words != numpy_words
    assert device_words == fingerprint(steps_per_dispatch=32) == fingerprint(
        steps_per_dispatch=4, word_generator="device")
    # The check for exactness changes no step, only when a run ends: not fingerprinted either.
    assert fingerprint(stop_when_exact_every=4096) == numpy_words
    with pytest.raises(ConfigError, match=r"^train\.stop_when_exact_every must be a positive"):
        StateTrackingTrainConfig(stop_when_exact_every=0)


def test_a_run_exact_on_held_out_words_stops_and_stays_stopped(experiment, tmp_path, capsys,
                                                                monkeypatch):
    """With ``train.stop_when_exact_every`` 2 a run at the training length (from step 4) is
    checked on the held-out words (eval seed + 1, every length) after steps 6 (not at the cap,
    8). Found exact at 6, it stops there and its file says so: a rerun takes no step and checks
    nothing, and with the check off it trains on to the cap. Found inexact, it runs to the cap.
    The reported evaluation stays on the usual words. ``evaluate`` is replaced by one that says
    whether the checks pass (training a model to exactness takes a GPU)."""
    config, group, _ = experiment
    train = dataclasses.replace(config.train, steps_per_dispatch=1, stop_when_exact_every=2)
    runner = ModelRunner("m2rnn", config.model_config("m2rnn", group.order), train)
    calls, exact_checks = [], [True]
    held_out, usual = config.task.eval_seed + 1, config.task.eval_seed

    def evaluate(params, group, task, length):
        calls.append((task.eval_seed, length))
        right = 1.0 if task.eval_seed == held_out and exact_checks[0] else 0.5
        return {"length": length, "position_accuracy": right, "sequence_accuracy": right}

    monkeypatch.setattr(runner, "evaluate", evaluate)
    path = str(tmp_path / "m2rnn_seed0.msgpack")

    def run(runner, path=path):
        calls.clear()
        return runner.run_seeds([0], group, config.task, progress=False,
                                checkpoint_paths=[path])[0]

    result = run(runner)
    assert (result.steps, result.stopped_exact_step) == (6, 6)
    assert calls == [(held_out, 4), (usual, 4)]
    saved = runner.load_saved(path, config.task, 0)
    assert (saved.step, saved.exact_step) == (6, 6)
    assert "step 6: exact on held-out words at lengths 4: stopped" in capsys.readouterr().out

    again = run(runner)
    assert (again.steps, again.resumed_from_step, again.stopped_exact_step) == (6, 6, 6)
    assert calls == [(usual, 4)]
    assert "stopped exact at step 6: no step to take" in capsys.readouterr().out

    unchecked = ModelRunner("m2rnn", config.model_config("m2rnn", group.order),
                            dataclasses.replace(train, stop_when_exact_every=None))
    onward = unchecked.run_seeds([0], group, config.task, progress=False,
                                 checkpoint_paths=[path])[0]
    assert (onward.steps, onward.stopped_exact_step) == (8, None)
    assert runner.load_saved(path, config.task, 0).exact_step is None

    exact_checks[0] = False
    inexact = run(runner, str(tmp_path / "inexact.msgpack"))
    assert (inexact.steps, inexact.stopped_exact_step) == (8, None)
    assert calls == [(held_out, 4), (usual, 4)]


@pytest.mark.parametrize("n, every, steps, stop_at", [(1, 2, 8, 6), (4, 6, 16, 12)],
                         ids=["numpy-words", "device-words"])
def test_a_seed_stopping_exact_leaves_its_group_saved_and_the_other_goes_on_alone(
        experiment, tmp_path, monkeypatch, n, every, steps, stop_at):
    """Seeds 0 and 1 in one vmapped step, seed 1 found exact at ``stop_at`` (the first check at
    or after it: with 4 steps a call and checks every 6, the calls ending at 8 and 12): seed 1's
    file holds the very parameters checked; seed 0 runs to the cap as it does alone."""
    config, group, _ = experiment
    train = dataclasses.replace(config.train, steps_per_dispatch=n, stop_when_exact_every=every,
                                steps=steps, word_generator="auto")
    runner = ModelRunner("m2rnn", config.model_config("m2rnn", group.order), train)
    checked = {}

    def check_exact(run, params, group, task):
        checked[run.seed, run.steps] = jax.tree.leaves(params)
        if run.seed == 1 and run.reached_step is not None and run.steps >= stop_at:
            run.exact_step = run.steps
            return True
        return False

    monkeypatch.setattr(runner, "_check_exact", check_exact)
    results, params = train_seeds(runner, group, config.task, tmp_path / "both")
    assert [(r.steps, r.stopped_exact_step) for r in results] == [(steps, None), (stop_at, stop_at)]
    assert (1, stop_at) in checked and differ(checked[1, stop_at], checked[0, stop_at])
    for got, want in zip(params[1], checked[1, stop_at], strict=True):
        np.testing.assert_array_equal(got, want)
    alone = runner.run_seeds([0], group, config.task, progress=False,
                             checkpoint_paths=[str(tmp_path / "alone.msgpack")])[0]
    assert alone.steps == steps
    assert_close(params[0], jax.tree.leaves(
        runner.load_saved(str(tmp_path / "alone.msgpack"), config.task, 0).params))
