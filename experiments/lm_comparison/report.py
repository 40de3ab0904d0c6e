"""Results of the comparison: ``results.csv``, ``results.json``, two plots and a summary table.

Every number comes from the runs' summaries (``cli.summarize_run``: one dict per family and
seed). Over the seeds of a family the table shows the mean and the spread, half the range
(max − min) / 2; a difference between two families is shown with the spreads of both and,
paired by seed (the same data order), as the mean and spread of the per-seed differences.
"""

import csv
import json
import os

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

LETTERS = ("M", "D", "S", "A")
CSV_COLUMNS = ("model", "label", "seed", "layer_pattern", "parameters",
               *(f"state_bytes_{letter}" for letter in LETTERS), "recurrent_state_bytes",
               "steps", "tokens_trained", "val_bits_per_byte", "tokens_per_s",
               "bits_within_train_length", "bits_beyond_train_length")
FILES = ("results.csv", "results.json", "loss_vs_tokens.png", "loss_vs_position.png")


def result_row(summary: dict) -> dict:
    """One CSV row of a run's summary (state bytes per layer of each letter; blank when the
    pattern has no such layer; A = the KV cache at the training length)."""
    per_layer = summary["state_bytes"]["per_layer"]
    row = {key: summary[key] for key in ("model", "label", "seed", "layer_pattern",
                                         "parameters", "steps", "tokens_trained",
                                         "val_bits_per_byte", "tokens_per_s")}
    for letter in LETTERS:
        row[f"state_bytes_{letter}"] = per_layer.get(letter, "")
    row["recurrent_state_bytes"] = summary["state_bytes"]["recurrent_total"]
    long_context = summary.get("long_context") or {}
    row["bits_within_train_length"] = long_context.get("bits_within_train_length", "")
    row["bits_beyond_train_length"] = long_context.get("bits_beyond_train_length", "")
    return row


def write_csv(path, summaries):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(result_row(s) for s in summaries)


def write_json(path, summaries, config_dict, *, complete: bool, differences):
    with open(path, "w") as fh:
        json.dump({"complete": complete, "config": config_dict,
                   "results": [result_row(s) for s in summaries], "runs": summaries,
                   "differences": differences}, fh, indent=2)


def spread(values) -> float:
    """Half the range of ``values`` (0 for one value)."""
    return (max(values) - min(values)) / 2


def by_family(summaries) -> dict:
    families = {}
    for summary in summaries:
        families.setdefault(summary["model"], []).append(summary)
    return families


def difference(summaries, first: str, second: str, key="val_bits_per_byte"):
    """``first − second`` of ``key``: the difference of the family means, the spread of each
    family, and the per-seed differences over the seeds both have (or ``None`` when one of
    them has no run)."""
    families = by_family(summaries)
    if first not in families or second not in families:
        return None
    a = {s["seed"]: s[key] for s in families[first]}
    b = {s["seed"]: s[key] for s in families[second]}
    paired = [a[seed] - b[seed] for seed in sorted(set(a) & set(b))]
    return {"first": first, "second": second, "key": key,
            "difference": float(np.mean(list(a.values())) - np.mean(list(b.values()))),
            "spread_first": spread(list(a.values())), "spread_second": spread(list(b.values())),
            "paired": paired,
            "paired_mean": float(np.mean(paired)) if paired else None,
            "paired_spread": spread(paired) if paired else None}


def summary_table(summaries, compare=()) -> str:
    """Per family: parameters, state bytes per recurrent layer, seeds, validation bits per
    byte and long-context bits beyond the training length (mean ± spread), tokens/s; then
    each requested difference next to the seed spreads."""
    families = by_family(summaries)
    width = max(len("family"), *(len(name) for name in families))
    lines = [f"{'family':<{width}}  {'params':>7}  {'state/layer':>20}  seeds  "
             f"{'val bits/byte':>17}  {'beyond-L bits/byte':>18}  {'tokens/s':>9}"]
    for name, runs in families.items():
        values = [r["val_bits_per_byte"] for r in runs]
        beyond = [r["long_context"]["bits_beyond_train_length"] for r in runs
                  if r.get("long_context")]
        per_layer = runs[0]["state_bytes"]["per_layer"]
        state = " ".join(f"{letter}:{_bytes(per_layer[letter])}" for letter in LETTERS[:3]
                         if letter in per_layer) or f"A:{_bytes(per_layer['A'])}"
        long_text = f"{np.mean(beyond):.4f} ± {spread(beyond):.4f}" if beyond else "-"
        lines.append(f"{name:<{width}}  {_short(runs[0]['parameters']):>7}  {state:>20}  "
                     f"{len(runs):>5}  {np.mean(values):.4f} ± {spread(values):.4f}  "
                     f"{long_text:>18}  {_mean_speed(runs):>9}")
    for first, second in compare:
        result = difference(summaries, first, second)
        if result is None:
            lines.append(f"{first} − {second}: not available (no finished run of one of them)")
            continue
        larger = max(result["spread_first"], result["spread_second"])
        ratio = (f"{abs(result['difference']) / larger:.1f}× the larger seed spread"
                 if larger > 0 else "one seed: no spread to compare with")
        paired = ("" if result["paired_mean"] is None else
                  f"; paired by seed {result['paired_mean']:+.4f} ± {result['paired_spread']:.4f}")
        lines.append(f"{first} − {second}: {result['difference']:+.4f} bits/byte{paired}; "
                     f"seed spread {first} ± {result['spread_first']:.4f}, {second} ± "
                     f"{result['spread_second']:.4f} ({ratio})")
    return "\n".join(lines)


def _mean_speed(runs) -> str:
    speeds = [r["tokens_per_s"] for r in runs if r.get("tokens_per_s") is not None]
    return f"{np.mean(speeds):,.0f}" if speeds else "-"


def _band(ax, x, runs_values, color, label):
    values = np.array(runs_values)
    ax.plot(x, values.mean(axis=0), color=color, label=label, linewidth=1.5)
    if len(values) > 1:
        ax.fill_between(x, values.min(axis=0), values.max(axis=0), color=color, alpha=0.2,
                        linewidth=0)


def plot_loss_vs_tokens(path, summaries):
    """Validation bits per byte against tokens trained: the mean over seeds per family, the
    band between the seeds' lowest and highest."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (name, runs) in enumerate(by_family(summaries).items()):
        common = sorted(set.intersection(*({t for t, _ in r["curve"]} for r in runs)))
        curves = [[dict(map(tuple, r["curve"]))[t] for t in common] for r in runs]
        if common:
            _band(ax, common, curves, f"C{i}", f"{runs[0]['label']} ({_seeds(len(runs))})")
    _save(fig, ax, path, "tokens trained (bytes)", "validation bits per byte",
          "Validation loss (mean over seeds; band: seed range)")


def plot_loss_vs_position(path, summaries, train_length: int):
    """Bits per byte per position bucket of long validation documents, per family (mean over
    seeds; band: seed range); the training length as a dashed line."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for i, (name, runs) in enumerate(by_family(summaries).items()):
        evaluated = [r["long_context"] for r in runs if r.get("long_context")]
        if not evaluated:
            continue
        starts = np.array(evaluated[0]["bucket_starts"])
        centers = starts + evaluated[0]["bucket_size"] / 2
        _band(ax, centers, [e["bits"] for e in evaluated], f"C{i}",
              f"{runs[0]['label']} ({_seeds(len(evaluated))})")
    ax.axvline(train_length, color="gray", linestyle="--", linewidth=1)
    ax.annotate(f"training length {train_length}", (train_length, 1), xycoords=("data",
                "axes fraction"), xytext=(4, -12), textcoords="offset points", fontsize=8,
                color="gray")
    _save(fig, ax, path, "position in the document (bytes)", "bits per byte",
          "Loss against position on long validation documents")


def _save(fig, ax, path, xlabel, ylabel, title):
    """Labels, grid and legend of a figure, written to ``path`` and closed."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_all(out_dir, summaries, config_dict, *, train_length: int, compare=(),
              complete: bool = True) -> dict:
    """Writes the four result files into ``out_dir``; returns their paths by name."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {name: os.path.join(out_dir, name) for name in FILES}
    differences = [d for pair in compare if (d := difference(summaries, *pair)) is not None]
    write_csv(paths["results.csv"], summaries)
    write_json(paths["results.json"], summaries, config_dict, complete=complete,
               differences=differences)
    plot_loss_vs_tokens(paths["loss_vs_tokens.png"], summaries)
    plot_loss_vs_position(paths["loss_vs_position.png"], summaries, train_length)
    return paths


def _seeds(n) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def _short(n) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.0f}k"


def _bytes(n) -> str:
    return f"{n / 1e6:.2f}MB" if n >= 1e6 else f"{n / 1e3:.1f}kB"
