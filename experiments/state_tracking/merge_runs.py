"""Combines state-tracking runs that ran as separate processes (one per model or seed) into one
results table and plot, and draws their training progress from the logs.

    python -m m2rnn_experiments.state_tracking.merge_runs --out PREFIX \
        --results a/results.csv b/results.csv ... [--logs a/log.txt b.log ...]

writes ``PREFIX.csv`` (the rows of every ``results.csv``), ``PREFIX.png`` (accuracy against
length, ``report.plot``) and, with ``--logs`` (what ``m2rnn-state-tracking --no-progress``
printed), ``PREFIX_progress.png``: per run, the curriculum's scored length and the training
accuracy against the training step, read from the progress lines (``<model> seed <k>: step
<n>, loss <l>, training accuracy <a>, scored length <s>, ...``; a resumed run continues the
same lines), and ``PREFIX_evals.png``: per seed, the accuracy at each evaluation length printed
at the end of each invocation, against the step, with the schedule changes marked. The summary
table prints last.
"""

import argparse
import csv
import os
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from m2rnn_experiments.state_tracking import report  # noqa: E402
from m2rnn_jax.typed_config import ConfigError  # noqa: E402
from train.errors import add_debug_flag, run_command  # noqa: E402

PROGRESS = re.compile(r"^(?P<model>\S+) seed (?P<seed>\d+): step (?P<step>\d+), loss [-\d.naif]+, "
                      r"training accuracy (?P<acc>[\d.]+), scored length (?P<length>\d+)")
# The summary line a run prints after its evaluation, and the lines of a resumed run.
EVALUATION = re.compile(r"^  seed (?P<seed>\d+): (?P<step>\d+) steps, .*per-position accuracy "
                        r"(?P<accs>.*)$")
RESUMED = re.compile(r"^(?P<model>\S+) seed (?P<seed>\d+): resumed at step (?P<step>\d+)")
SCHEDULE = re.compile(r"^(?P<model>\S+) seed (?P<seed>\d+): continues under a new schedule: "
                      r"(?P<changes>.*)$")
_INT_COLUMNS = ("seed", "length", "num_params", "steps", "train_length")
_FLOAT_COLUMNS = ("position_accuracy", "sequence_accuracy")


def read_rows(paths):
    """The rows of the given results.csv files, typed as ``report.result_rows`` makes them. A
    (group, model, seed, length) in several files (a seed that moved from one run folder to another,
    e.g. out of a group trained together) keeps the row with the most steps; a ``ConfigError``
    if one (group, model) has two parameter counts (two models under one name)."""
    latest, size = {}, {}
    for path in paths:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                try:
                    for key in _INT_COLUMNS:
                        row[key] = int(row[key])
                    for key in _FLOAT_COLUMNS:
                        row[key] = float(row[key])
                except (KeyError, TypeError, ValueError) as err:
                    raise ConfigError(f"{path} is not a results.csv of m2rnn-state-tracking "
                                      f"(column {err})") from err
                model = (row["group"], row["model"])
                first_path, params = size.setdefault(model, (path, row["num_params"]))
                if row["num_params"] != params:
                    raise ConfigError(
                        f"'{row['model']}' has {params:,} parameters in {first_path} and "
                        f"{row['num_params']:,} in {path}: two models under one name; merge "
                        f"them apart")
                key = (*model, row["seed"], row["length"])
                if key not in latest or row["steps"] >= latest[key]["steps"]:
                    latest[key] = row
    if not latest:
        raise ConfigError("no result rows in " + ", ".join(paths))
    return list(latest.values())


def read_progress(text):
    """{(model, seed): [(step, training accuracy, scored length), ...]} from a cli log, in step
    order (a resumed run repeats no step: later lines for a step replace earlier ones)."""
    runs = {}
    for line in text.splitlines():
        m = PROGRESS.match(line)
        if m:
            key = (m["model"], int(m["seed"]))
            runs.setdefault(key, {})[int(m["step"])] = (float(m["acc"]), int(m["length"]))
    return {key: [(step, acc, length) for step, (acc, length) in sorted(points.items())]
            for key, points in runs.items()}


def read_evaluations(text):
    """From one run's cli log (one model, possibly resumed several times): ``(evaluations,
    changes)`` = ``{seed: [(step, {length: per-position accuracy}), ...]}`` and ``{seed:
    [(step, "what changed"), ...]}``, the schedule changes at the step the run resumed from."""
    evaluations, changes, resumed = {}, {}, {}
    for line in text.splitlines():
        if m := EVALUATION.match(line):
            accs = {int(n): float(a) / 100 for n, a in re.findall(r"L=(\d+): ([\d.]+)%",
                                                                   m["accs"])}
            evaluations.setdefault(int(m["seed"]), []).append((int(m["step"]), accs))
        elif m := RESUMED.match(line):
            resumed[int(m["seed"])] = int(m["step"])
        elif (m := SCHEDULE.match(line)) and int(m["seed"]) in resumed:
            seed = int(m["seed"])
            changes.setdefault(seed, []).append((resumed[seed], m["changes"]))
    return evaluations, changes


def merge_logs(paths):
    """``(progress, evaluations, changes, unplaced)`` of ``read_progress`` and
    ``read_evaluations`` over several cli logs, the last two keyed by ``(model, seed)``: an
    evaluation line names its seed only, so its model is the one model of its log's progress
    lines, and a log with none or several (``unplaced``) gives no evaluations. A run in more
    than one log (a seed that moved between run folders) gets the union of its points, in step
    order (a step in two logs: the later log's)."""
    progress, evaluations, changes, unplaced = {}, {}, {}, []
    for path in paths:
        with open(path) as fh:
            text = fh.read()
        run_progress = read_progress(text)
        for key, points in run_progress.items():
            progress.setdefault(key, {}).update({step: rest for step, *rest in points})
        models = {model for model, _ in run_progress}
        run_evaluations, run_changes = read_evaluations(text)
        if len(models) != 1:
            if run_evaluations:
                unplaced.append(path)
            continue
        (model,) = models
        for seed, points in run_evaluations.items():
            evaluations.setdefault((model, seed), {}).update(dict(points))
        for seed, points in run_changes.items():
            changes.setdefault((model, seed), []).extend(points)
    return ({key: [(step, *rest) for step, rest in sorted(points.items())]
             for key, points in progress.items()},
            {key: sorted(points.items()) for key, points in evaluations.items()},
            {key: sorted(points) for key, points in changes.items()}, unplaced)


def plot_evaluations(path, evaluations, changes, title):
    """Per (model, seed), the per-position accuracy at each evaluation length against the step
    of each evaluation, with the steps where the schedule changed marked."""
    runs = sorted(evaluations)  # (model, seed)
    fig, axes = plt.subplots(len(runs), 1, figsize=(10, 3.2 * len(runs)), sharex=True,
                             squeeze=False)
    for ax, (model, seed) in zip(axes[:, 0], runs):
        points = sorted(evaluations[model, seed])
        lengths = sorted({n for _, accs in points for n in accs})
        for i, length in enumerate(lengths):
            xy = [(step, accs[length]) for step, accs in points if length in accs]
            ax.plot(*zip(*xy), marker="o", markersize=3, color=f"C{i}", label=f"L={length}")
        for step, what in changes.get((model, seed), []):
            ax.axvline(step, color="0.6", linestyle=":", linewidth=1)
            lr = re.search(r"learning_rate \S+ -> (\S+?)(,|$)", what)
            ax.annotate(f"lr {lr[1]}" if lr else what, (step, 1.0), fontsize=7,
                        rotation=90, va="top", ha="right", color="0.4")
        ax.set_ylim(0, 1.02)
        ax.set_ylabel(f"{model} seed {seed}: accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right", ncol=len(lengths))
    axes[-1, 0].set_xlabel("training step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_progress(path, runs, title):
    """Scored length (log scale) and training accuracy against the step, one line per run."""
    fig, (ax_len, ax_acc) = plt.subplots(2, 1, figsize=(10, 6.5), sharex=True)
    for i, ((model, seed), points) in enumerate(sorted(runs.items())):
        steps = [p[0] for p in points]
        label = f"{model} seed {seed}"
        ax_len.step(steps, [p[2] for p in points], where="post", color=f"C{i}", label=label)
        ax_acc.plot(steps, [p[1] for p in points], color=f"C{i}", linewidth=0.8, label=label)
    ax_len.set_yscale("log", base=2)
    ax_len.set_ylabel("scored length (curriculum)")
    ax_acc.set_ylabel("training accuracy at that length")
    ax_acc.set_xlabel("training step")
    ax_acc.set_ylim(0, 1.02)
    for ax in (ax_len, ax_acc):
        ax.grid(alpha=0.3)
    ax_len.legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output prefix (PREFIX.csv, PREFIX.png, ...)")
    p.add_argument("--results", nargs="+", required=True, help="results.csv files")
    p.add_argument("--logs", nargs="*", default=[], help="cli logs with progress lines")
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    return run_command("merge_runs", args.debug, lambda: merge(args))


def merge(args):
    """Writes the merged table and plots of ``args`` (``parse_args``); ``ConfigError`` on
    missing files or runs that do not belong together."""
    missing = [path for path in (*args.results, *args.logs) if not os.path.isfile(path)]
    if missing:
        raise ConfigError(f"no such file: {', '.join(missing)}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    rows = read_rows(args.results)
    groups = {r["group"] for r in rows}
    train_lengths = {r["train_length"] for r in rows}
    if len(groups) != 1 or len(train_lengths) != 1:
        raise ConfigError(f"runs of one group and training length only, got {groups} and "
                          f"{train_lengths}")
    group, train_length = groups.pop(), train_lengths.pop()
    report.write_csv(args.out + ".csv", rows)
    report.plot(args.out + ".png", rows, group, train_length)
    written = [args.out + ".csv", args.out + ".png"]
    if args.logs:
        runs, evaluations, changes, unplaced = merge_logs(args.logs)
        if not runs:
            raise ConfigError("no progress lines in " + ", ".join(args.logs))
        if unplaced:
            print("left out of the evaluations plot (an evaluation line names a seed, not a "
                  "model, and these logs' progress lines name no model or several: one log per "
                  f"model's command): {', '.join(map(str, unplaced))}")
        plot_progress(args.out + "_progress.png", runs,
                      f"{group}: length curriculum and training accuracy against the step")
        written.append(args.out + "_progress.png")
        if evaluations:
            plot_evaluations(args.out + "_evals.png", evaluations, changes,
                             f"{group}: accuracy at each length at the end of each invocation "
                             f"(train length {train_length})")
            written.append(args.out + "_evals.png")
    print(report.summary_table(rows))
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    raise SystemExit(main())
