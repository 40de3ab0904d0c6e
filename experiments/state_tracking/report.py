"""Results of the state-tracking experiment: CSV, JSON and a plot of accuracy vs length."""

import contextlib
import csv
import dataclasses
import io
import json
import os

try:
    import fcntl
except ImportError:  # not POSIX: processes sharing an output folder are not serialised
    fcntl = None

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from m2rnn_experiments.state_tracking import checkpoint  # noqa: E402
from m2rnn_experiments.state_tracking.config import ExperimentConfig  # noqa: E402
from m2rnn_jax.typed_config import ConfigError, from_dict  # noqa: E402
from train.run_folder import write_atomically  # noqa: E402

CSV_COLUMNS = ("model", "seed", "length", "position_accuracy", "sequence_accuracy", "num_params",
               "steps", "train_length", "group")


def result_rows(results, group_name, train_length):
    """One row per (model, seed, evaluation length)."""
    return [{"model": r.model, "seed": r.seed, "length": e["length"],
             "position_accuracy": e["position_accuracy"],
             "sequence_accuracy": e["sequence_accuracy"], "num_params": r.num_params,
             "steps": r.steps, "train_length": train_length, "group": group_name}
            for r in results for e in r.evals]


def write_csv(path, rows):
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CSV_COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(path, text.getvalue())


def write_json(path, rows, runs, config_dict):
    write_atomically(path, json.dumps({"config": config_dict, "results": rows, "runs": runs},
                                      indent=2))


def recorded_config(saved):
    """The ``ExperimentConfig`` a results.json's ``config`` records (the keys written beside
    it, such as ``group_order``, aside)."""
    fields = {f.name for f in dataclasses.fields(ExperimentConfig)}
    return from_dict(ExperimentConfig, {k: v for k, v in saved.items() if k in fields})


def _compared_settings(config, group_order, model):
    """What decides a run's results (its trajectory and its evaluation), flattened to dotted
    keys: runs of two invocations with equal settings may share one results.json."""
    settings = checkpoint.run_settings(config.model_config(model, group_order), config.train,
                                       config.task)
    settings["task"] = dataclasses.asdict(config.task)  # the evaluation's settings too
    return checkpoint.flat_settings(settings)


def earlier_results(out_dir, config, group_order, ran):
    """``(rows, runs, note)``: of ``out_dir/results.json``, the rows and runs of the (model,
    seed) pairs not in ``ran``, when each was made under the settings ``config`` gives it
    (which runs an invocation makes, when it stops, how it logs and on which backend aside);
    else none of them, and ``note`` says why (``None`` when there was nothing to keep)."""
    path = os.path.join(out_dir, "results.json")
    try:
        with open(path) as fh:
            earlier = json.load(fh)
        runs = [run for run in earlier["runs"] if (run["model"], run["seed"]) not in ran]
        if not runs:
            return [], [], None
        saved = earlier["config"]
        saved_config = recorded_config(saved)
        differing = set()
        for run in runs:
            try:
                before = _compared_settings(saved_config, saved["group_order"], run["model"])
                now = _compared_settings(config, group_order, run["model"])
            except ConfigError:  # a model one of the configs does not define
                differing.add(f"models.{run['model']}")
                continue
            differing |= checkpoint.differing_keys(before, now)
        pairs = {(run["model"], run["seed"]) for run in runs}
        rows = [row for row in earlier["results"] if (row["model"], row["seed"]) in pairs]
    except FileNotFoundError:
        return [], [], None
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError) as error:
        return [], [], f"{path} is unreadable ({type(error).__name__}: {error})"
    if differing:
        named = ", ".join(f"{model} seed {seed}" for model, seed in sorted(pairs))
        return [], [], (f"{path} holds runs made under other settings ({named}; differing: "
                        f"{checkpoint.name_keys(differing)})")
    return rows, runs, None


def summary_table(rows):
    """Text table: per model and length, mean (min) over seeds of both accuracies."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    lengths = sorted({r["length"] for r in rows})
    name_width = max(len("model"), *(len(m) for m in models))
    lines = [f"{'model':<{name_width}}  params  " + "  ".join(f"{'L=' + str(n):>15}"
                                                             for n in lengths),
             f"{'':<{name_width}}          " + "  ".join(f"{'pos% (seq%)':>15}" for _ in lengths)]
    for model in models:
        mine = [r for r in rows if r["model"] == model]
        cells = []
        for n in lengths:
            at = [r for r in mine if r["length"] == n]
            pos = 100 * np.mean([r["position_accuracy"] for r in at])
            seq = 100 * np.mean([r["sequence_accuracy"] for r in at])
            cells.append(f"{pos:7.2f} ({seq:5.1f})")
        lines.append(f"{model:<{name_width}}  {_short(mine[0]['num_params']):>6}  "
                     + "  ".join(f"{c:>15}" for c in cells))
    return "\n".join(lines)


def plot(path, rows, group_name, train_length):
    """Two panels (per-position / whole-sequence accuracy vs length): mean over seeds as a line,
    each seed as a dot, the training length as a dashed vertical line."""
    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharex=True)
    for ax, key, title in ((axes[0], "position_accuracy", "per-position accuracy"),
                           (axes[1], "sequence_accuracy", "whole-sequence accuracy")):
        for i, model in enumerate(models):
            mine = [r for r in rows if r["model"] == model]
            lengths = sorted({r["length"] for r in mine})
            mean = [np.mean([r[key] for r in mine if r["length"] == n]) for n in lengths]
            color = f"C{i}"
            ax.plot(lengths, mean, "-o", color=color, markersize=4,
                    label=f"{model} ({_short(mine[0]['num_params'])} params)")
            ax.scatter([r["length"] for r in mine], [r[key] for r in mine], color=color, s=10,
                       alpha=0.35)
        ax.axvline(train_length, color="gray", linestyle="--", linewidth=1)
        ax.annotate(f"train length {train_length}", (train_length, 1.0), xytext=(4, -4),
                    textcoords="offset points", fontsize=8, color="gray", va="top")
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("sequence length")
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    fig.suptitle(f"Word problems over {group_name}: accuracy vs length (mean over seeds, dots = "
                 f"seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(out_dir, results, config, group):
    """Writes results.csv, results.json and accuracy_vs_length.png of these runs and of the
    earlier runs in the folder that these did not redo (``earlier_results``; an earlier
    results.json whose runs cannot be kept is moved aside, not overwritten); returns their
    paths, the rows and a note when earlier runs were left out."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name)
             for name in ("results.csv", "results.json", "accuracy_vs_length.png")}
    config_dict = dataclasses.asdict(config)
    config_dict["group_order"] = group.order
    train_length = config.task.train_length
    with _results_lock(out_dir):  # processes that share the folder (--first-seed) add up
        ran = {(r.model, r.seed) for r in results}
        kept_rows, kept_runs, note = earlier_results(out_dir, config, group.order, ran)
        if note is not None and os.path.exists(paths["results.json"]):
            aside = _free_name(out_dir, "results.earlier-{}.json")
            os.replace(paths["results.json"], aside)
            note += f"; moved to {aside}"
        order = {name: i for i, name in enumerate(config.models)}  # whichever --models ran
        rows = sorted(kept_rows + result_rows(results, group.name, train_length),
                      key=lambda row: (order[row["model"]], row["seed"], row["length"]))
        runs = sorted(kept_runs + [{k: v for k, v in dataclasses.asdict(r).items()
                                    if k != "evals"} for r in results],
                      key=lambda run: (order[run["model"]], run["seed"]))
        write_csv(paths["results.csv"], rows)
        write_json(paths["results.json"], rows, runs, config_dict)
    plot(paths["accuracy_vs_length.png"], rows, group.name, train_length)
    return paths, rows, note


@contextlib.contextmanager
def _results_lock(out_dir):
    """Holds ``out_dir/results.lock`` while a process reads, merges and writes the results."""
    with open(os.path.join(out_dir, "results.lock"), "w") as fh:
        if fcntl is not None:
            fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def _free_name(out_dir, pattern):
    n = 1
    while os.path.exists(os.path.join(out_dir, pattern.format(n))):
        n += 1
    return os.path.join(out_dir, pattern.format(n))


def _short(n):
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"
