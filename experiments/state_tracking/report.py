"""Results of the state-tracking experiment: CSV, JSON and a plot of accuracy vs length."""

import csv
import dataclasses
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

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
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def write_json(path, rows, runs, config_dict):
    with open(path, "w") as fh:
        json.dump({"config": config_dict, "results": rows, "runs": runs}, fh, indent=2)


# Settings that choose which runs an invocation makes or when it stops, not what a run is: runs
# of an earlier invocation that differs only in these stay in the output folder's results.
SELECTION_KEYS = (("run",), ("train", "seeds"), ("train", "first_seed"),
                  ("train", "time_budget_s"))


def _without_selection(config_dict):
    config = json.loads(json.dumps(config_dict))  # a deep copy, as JSON would store it
    for *parents, key in SELECTION_KEYS:
        section = config
        for parent in parents:
            section = section.get(parent, {})
        section.pop(key, None)
    return config


def earlier_results(out_dir, config_dict, ran):
    """The rows and runs of ``out_dir/results.json`` for the (model, seed) pairs not in
    ``ran``, when that file was written under the same settings but for which runs were made
    (``SELECTION_KEYS``); else none, and why (``None`` when there was nothing to keep)."""
    path = os.path.join(out_dir, "results.json")
    try:
        with open(path) as fh:
            earlier = json.load(fh)
        rows, runs, config = earlier["results"], earlier["runs"], earlier["config"]
    except FileNotFoundError:
        return [], [], None
    except (OSError, ValueError, KeyError, TypeError) as error:
        return [], [], f"{path} is unreadable ({error})"
    kept = [run for run in runs if (run["model"], run["seed"]) not in ran]
    if not kept:
        return [], [], None
    if _without_selection(config) != _without_selection(config_dict):
        return [], [], f"{path} was written under other settings"
    pairs = {(run["model"], run["seed"]) for run in kept}
    return [row for row in rows if (row["model"], row["seed"]) in pairs], kept, None


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


def write_all(out_dir, results, group_name, train_length, config_dict):
    """Writes results.csv, results.json and accuracy_vs_length.png of these runs and of the
    earlier runs in the folder that these did not redo (``earlier_results``); returns their
    paths, the rows and, when earlier runs were dropped, why."""
    os.makedirs(out_dir, exist_ok=True)
    ran = {(r.model, r.seed) for r in results}
    kept_rows, kept_runs, dropped = earlier_results(out_dir, config_dict, ran)
    rows = kept_rows + result_rows(results, group_name, train_length)
    runs = kept_runs + [{k: v for k, v in dataclasses.asdict(r).items() if k != "evals"}
                        for r in results]
    paths = {name: os.path.join(out_dir, name)
             for name in ("results.csv", "results.json", "accuracy_vs_length.png")}
    write_csv(paths["results.csv"], rows)
    write_json(paths["results.json"], rows, runs, config_dict)
    plot(paths["accuracy_vs_length.png"], rows, group_name, train_length)
    return paths, rows, dropped


def _short(n):
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"
