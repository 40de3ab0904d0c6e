"""Accuracy at each position of long word problems, for trained state-tracking runs: where a
model that is right at its training length starts to fail (a gradual drift, or a collapse past
some length), read from the runs' checkpoints.

    python -m m2rnn_experiments.state_tracking.positions --model m2rnn \
        --run 0:runs/s5_long/seed0 --run 2:runs/s5_long/seed2 --length 1024 --out PREFIX

``--run SEED:OUT`` names a run by its seed and output folder (its checkpoint is
``OUT/checkpoints/<model>_seed<SEED>.msgpack``, read under the config ``OUT/results.json``
records, or ``--config FILE`` for a folder without one). Evaluates the config's fixed
evaluation words of ``--length`` (the first ``--sequences`` of them) and writes
``PREFIX.csv`` (seed, position, accuracy) and ``PREFIX.png`` (accuracy against position, each
run's curriculum length and the training length marked), and prints how words go on after
their first wrong answer (``after_first_error``: a clean slip to another element, or a code
that blurs). Runs on a CPU in minutes.
"""

import argparse
import csv
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from m2rnn_experiments.state_tracking import checkpoint, cli  # noqa: E402
from m2rnn_experiments.state_tracking.config import ExperimentConfig  # noqa: E402
from m2rnn_experiments.state_tracking.report import recorded_config  # noqa: E402
from m2rnn_experiments.state_tracking.tasks import eval_word_problems  # noqa: E402
from m2rnn_experiments.state_tracking.training import ModelRunner  # noqa: E402
from m2rnn_jax.typed_config import ConfigError, load_yaml  # noqa: E402
from train.errors import add_debug_flag, run_command  # noqa: E402


def batched_logits(runner, params, tokens, batch_size):
    """``(rows, logits)`` for consecutive blocks of ``batch_size`` words of ``tokens``."""
    logits_fn = jax.jit(runner.logits)
    for first in range(0, tokens.shape[0], batch_size):
        rows = slice(first, first + batch_size)
        yield rows, logits_fn(params, tokens[rows])


def predictions(runner, params, tokens, batch_size):
    """The model's predicted element at every position, (sequences, length)."""
    return np.concatenate([np.asarray(jnp.argmax(logits, -1))
                           for _, logits in batched_logits(runner, params, tokens, batch_size)])


def after_first_error(group, predicted, targets):
    """How a word goes on after its first wrong answer, or None if none goes wrong.

    A clean slip (the state jumps to another element's code and the recurrence then tracks
    exactly from there) leaves a constant *left* offset: predicted_t = e · target_t for one e
    (prefix products grow on the right, so a wrong state P_s·d gives P_s d P_s⁻¹ · P_t). So
    per word that goes wrong: the first error's position, how often the left offset
    ``predicted_t · target_t⁻¹`` changes after it, and the share of later positions right.
    Returns medians over those words."""
    inverse = np.argmax(group.table == 0, axis=1)  # table[a, inverse[a]] = identity (row 0)
    wrong = predicted != targets
    firsts, changes, right_again = [], [], []
    for word in np.flatnonzero(wrong.any(axis=1)):
        first = int(np.argmax(wrong[word]))
        left = group.table[predicted[word, first:], inverse[targets[word, first:]]]
        firsts.append(first + 1)
        changes.append(int(np.count_nonzero(np.diff(left))))
        right_again.append(float(np.mean(~wrong[word, first:])))
    if not firsts:
        return None
    return {"words_wrong": len(firsts), "first_error": float(np.median(firsts)),
            "earliest_error": min(firsts), "offset_changes": float(np.median(changes)),
            "right_after_first_error": float(np.median(right_again))}


def load_checkpoint(runner, config, seed, path):
    """The ``RunState`` saved at ``path`` by seed ``seed`` of ``runner``'s model under
    ``config``; a ``ConfigError`` naming what to pass when it is missing or is not that."""
    if not os.path.exists(path):
        raise ConfigError(f"no checkpoint {path}")
    try:
        return runner.load_saved(path, config.task, seed)
    except checkpoint.ResumeError as err:
        raise ConfigError(
            f"{path} cannot be read as seed {seed} of '{runner.name}' under the config used "
            f"({err.reason}): give the run's folder with its results.json, or the --config and "
            f"seed it was trained with") from err


def load_run(runner, config, seed, out_dir):
    """(params, step, curriculum length) from the run's checkpoint."""
    path = checkpoint.path_for(os.path.join(out_dir, "checkpoints"), runner.name, seed)
    saved = load_checkpoint(runner, config, seed, path)
    return saved.params, saved.step, saved.scored


def run_config(config_path, run_dir, what):
    """The config a run was trained under: the one its ``results.json`` records (the flags and
    ``--set`` of its command included) when ``run_dir`` has a readable one, else the file
    ``config_path``; says which. ``what`` names the run in messages."""
    path = os.path.join(run_dir, "results.json") if run_dir else None
    problem = f"no results.json beside {what}" if run_dir is None else f"no {path}"
    if path and os.path.exists(path):
        try:
            with open(path) as fh:
                config = recorded_config(json.load(fh)["config"])
            print(f"{what}: the config {path} records")
            return config
        except (OSError, ValueError, KeyError, TypeError, ConfigError) as err:
            problem = f"{path} unusable ({type(err).__name__}: {err})"
    if config_path is None:
        raise ConfigError(f"{problem}: pass --config, the config the run was trained under")
    print(f"{what}: {config_path} ({problem})")
    return load_yaml(ExperimentConfig, config_path)


def runner_for(config, model):
    """``(group, runner)``: the group of ``config`` and the ``ModelRunner`` of its model
    ``model``, as the command builds them (an unknown model is ``model_config``'s error)."""
    group = cli.build_group(config.task)
    return group, ModelRunner(model, config.model_config(model, group.order), config.train)


def runner_cache(model):
    """``config -> (group, runner)`` for ``model``, built once per distinct config: the runs
    of one config share a runner and its compiled functions."""
    built = {}

    def runner(config):
        key = json.dumps(dataclasses.asdict(config), sort_keys=True, default=str)
        if key not in built:
            built[key] = runner_for(config, model)
        return built[key]
    return runner


def load_runner(config_path, model):
    """``(config, group, runner)``: the experiment in ``config_path`` and its model ``model``."""
    config = load_yaml(ExperimentConfig, config_path)
    return (config, *runner_for(config, model))


def seed_and_path(argument, what, example):
    """``SEED:PATH`` -> (int seed, path); a ``ConfigError`` naming ``example`` (a right
    argument) for any other form."""
    seed, _, path = argument.partition(":")
    try:
        number = int(seed)
    except ValueError:
        number = -1
    if number < 0 or not path:
        raise ConfigError(f"expected SEED:{what} with a seed >= 0, e.g. {example}, got "
                          f"'{argument}'")
    return number, path


def positive_counts(args, *names):
    for name in names:
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got "
                              f"{getattr(args, name)}")


def summary_spans(train_length, length):
    """The positions (first, last; from 1) summarised: up to the training length, the next as
    many, and the last as many, as far as words of ``length`` reach."""
    spans = [(1, min(train_length, length))]
    if length > train_length:
        spans.append((train_length + 1, min(2 * train_length, length)))
    if length > 2 * train_length:
        spans.append((max(length - train_length + 1, 2 * train_length + 1), length))
    return spans


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="the config of runs whose folder has no results.json "
                                    "(a run's results.json holds the config it ran under)")
    p.add_argument("--model", default="m2rnn", help="the model of the runs (default m2rnn)")
    p.add_argument("--run", action="append", required=True, metavar="SEED:OUT",
                   help="a seed and its run's --out folder (repeatable)")
    p.add_argument("--length", type=int, default=512, help="word length (default 512)")
    p.add_argument("--sequences", type=int, default=128, help="words (default 128)")
    p.add_argument("--batch-size", type=int, default=32, help="words per call (default 32)")
    p.add_argument("--out", required=True, help="output prefix (PREFIX.csv, PREFIX.png)")
    add_debug_flag(p)
    args = p.parse_args(argv)
    return run_command("positions", args.debug, lambda: accuracy_by_position(args))


def accuracy_by_position(args):
    positive_counts(args, "length", "sequences", "batch_size")
    runs = [seed_and_path(argument, "OUT", "0:runs/s5") for argument in args.run]
    configs = [run_config(args.config, out_dir, f"seed {seed} of {out_dir}")
               for seed, out_dir in runs]
    if len({json.dumps([c.task.group, c.task.generators, c.task.eval_seed,
                        c.task.train_length]) for c in configs}) > 1:
        raise ConfigError("the runs differ in group, evaluation words or training length")
    config = configs[0]
    group = cli.build_group(config.task)
    # The config's fixed evaluation words of this length.
    words = eval_word_problems(group, config.task.eval_seed, args.sequences, args.length)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    rows, curves = [], []
    runner_of = runner_cache(args.model)
    for (seed, out_dir), run_cfg in zip(runs, configs):
        _, runner = runner_of(run_cfg)
        params, step, scored = load_run(runner, run_cfg, seed, out_dir)
        predicted = predictions(runner, params, words.tokens, args.batch_size)
        targets = np.asarray(words.targets)
        acc = (predicted == targets).mean(axis=0)
        curves.append((seed, step, scored, acc))
        rows += [{"seed": seed, "step": step, "position": i + 1, "accuracy": float(a)}
                 for i, a in enumerate(acc)]
        print(f"seed {seed} (step {step}, curriculum length {scored}): accuracy at positions "
              + ", ".join(f"{a}-{b} {acc[a - 1:b].mean():.3f}"
                          for a, b in summary_spans(config.task.train_length, args.length)))
        slips = after_first_error(group, predicted, targets)
        if slips:
            print(f"  {slips['words_wrong']} of {len(targets)} words go wrong, first at position "
                  f"{slips['first_error']:.0f} (median; earliest {slips['earliest_error']}); "
                  f"after it, per word (medians): the left offset changes "
                  f"{slips['offset_changes']:.0f} times (a clean slip: 0), "
                  f"{100 * slips['right_after_first_error']:.0f} % of positions right again")
    with open(args.out + ".csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=("seed", "step", "position", "accuracy"))
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(10, 4.2))
    for i, (seed, step, scored, acc) in enumerate(curves):
        ax.plot(np.arange(1, len(acc) + 1), acc, color=f"C{i}", linewidth=0.9,
                label=f"seed {seed}: step {step}, curriculum length {scored}")
        if scored is not None:
            ax.axvline(scored, color=f"C{i}", linestyle=":", linewidth=1)
    ax.axvline(config.task.train_length, color="gray", linestyle="--", linewidth=1,
               label=f"training length {config.task.train_length}")
    ax.axhline(1.0 / group.order, color="black", linewidth=0.6, label="chance")
    ax.set_xscale("log", base=2)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("position")
    ax.set_ylabel(f"accuracy ({args.sequences} sequences)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{config.task.group}, {args.model}: accuracy at each position of length-"
                 f"{args.length} words")
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    plt.close(fig)
    print(f"wrote {args.out}.csv, {args.out}.png")


if __name__ == "__main__":
    raise SystemExit(main())
