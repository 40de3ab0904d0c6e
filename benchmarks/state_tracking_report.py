"""Combines state-tracking runs that ran as separate processes (one per model or seed) into one
results table and plot, and draws their training progress from the logs.

    PYTHONPATH=. python3 benchmarks/state_tracking_report.py --out PREFIX \
        --results a/results.csv b/results.csv ... [--logs a/log.txt b.log ...]

writes ``PREFIX.csv`` (the rows of every ``results.csv``), ``PREFIX.png`` (accuracy against
length, ``train.state_tracking.report.plot``) and, with ``--logs``, ``PREFIX_progress.png``:
per run, the curriculum's scored length and the training accuracy against the training step,
read from the progress lines the cli prints (``<model> seed <k>: step <n>, loss <l>, training
accuracy <a>, scored length <s>, ...``; a resumed run continues the same lines). The summary
table prints last.
"""

import argparse
import csv
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from train.state_tracking import report  # noqa: E402

PROGRESS = re.compile(r"^(?P<model>\S+) seed (?P<seed>\d+): step (?P<step>\d+), loss [-\d.naif]+, "
                      r"training accuracy (?P<acc>[\d.]+), scored length (?P<length>\d+)")
_INT_COLUMNS = ("seed", "length", "num_params", "steps", "train_length")
_FLOAT_COLUMNS = ("position_accuracy", "sequence_accuracy")


def read_rows(paths):
    """The rows of the given results.csv files, typed as ``report.result_rows`` makes them."""
    rows = []
    for path in paths:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                for key in _INT_COLUMNS:
                    row[key] = int(row[key])
                for key in _FLOAT_COLUMNS:
                    row[key] = float(row[key])
                rows.append(row)
    if not rows:
        raise SystemExit("no result rows in " + ", ".join(paths))
    return rows


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


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="output prefix (PREFIX.csv, PREFIX.png, ...)")
    p.add_argument("--results", nargs="+", required=True, help="results.csv files")
    p.add_argument("--logs", nargs="*", default=[], help="cli logs with progress lines")
    args = p.parse_args()
    rows = read_rows(args.results)
    groups = {r["group"] for r in rows}
    train_lengths = {r["train_length"] for r in rows}
    if len(groups) != 1 or len(train_lengths) != 1:
        raise SystemExit(f"runs of one group and training length only, got {groups} and "
                         f"{train_lengths}")
    group, train_length = groups.pop(), train_lengths.pop()
    report.write_csv(args.out + ".csv", rows)
    report.plot(args.out + ".png", rows, group, train_length)
    written = [args.out + ".csv", args.out + ".png"]
    if args.logs:
        runs = {}
        for path in args.logs:
            with open(path) as fh:
                runs.update(read_progress(fh.read()))
        if not runs:
            raise SystemExit("no progress lines in " + ", ".join(args.logs))
        plot_progress(args.out + "_progress.png", runs,
                      f"{group}: length curriculum and training accuracy against the step")
        written.append(args.out + "_progress.png")
    print(report.summary_table(rows))
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
