"""Why a state-tracking M²RNN that is exact at its training length fails further on: follows
each layer's matrix state along long word problems, read from a run's checkpoint.

    PYTHONPATH=. python3 benchmarks/state_tracking_drift.py \
        --config configs/state_tracking/s5_long.yaml --run 0:runs/s5_long/seed0 \
        --length 1024 --sequences 64 --out PREFIX

The model runs token by token (``HybridLM.decode_step``), keeping every M²RNN layer's state
``H_t`` (flattened, N·K·V values). Per position ``t`` it reports:

* ``accuracy`` and ``survival`` (the fraction of words still right at every position up to
  ``t``; a word problem's state cannot recover from an error, so the gap between the two is
  chance agreement);
* per layer, ``drift``: the distance of ``H_t`` from the centroid of the states the model had
  for the same group element (the prefix product) at positions ``--centroid-from`` to the
  training length, where the model is exact — relative to the mean distance between two
  elements' centroids. A state set that represents each element by a fixed point keeps it
  small at every ``t``; one that wanders off grows with ``t``;
* per layer, ``probe_accuracy``: a linear probe (ridge regression onto the element's one-hot
  code, fitted on the same window in the first half of the words) read from ``H_t`` alone, on
  the other half: does the state hold the answer the same way at every position?
* per layer and head, the state's RMS value;
* ``parity_right_in_errors``: of the wrong answers, the share with the right parity (the
  sign of the permutation: the group's abelian quotient Z2), and per layer
  ``parity_probe_accuracy``: a linear probe of the parity, as the element's.

Writes ``PREFIX.csv`` (one row per run and position) and ``PREFIX.png``. CPU, about a minute.
"""

import argparse
import csv
import os
import sys

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from flax import nnx
from jax import lax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from state_tracking_positions import add_run_arguments, load_experiment, load_run  # noqa: E402


def states_along(runner, params, tokens, zeroed=()):
    """``(logits (L, B, vocab), [H (L, B, N·K·V) per M²RNN layer])`` for ``tokens (B, L)``.
    ``zeroed``: (M²RNN layer, head) pairs whose state is set to 0 after every step (an
    intervention: the head then sees ``H_{t-1} = 0`` at every step)."""
    length = tokens.shape[1]

    def run(params, tokens):
        model = nnx.merge(runner.graphdef, params)
        logits0, caches = model.prefill(tokens[:, :1], max_len=length)
        layers = [i for i, cache in enumerate(caches) if isinstance(cache, dict)
                  and "state" in cache]

        def flat_states(caches):
            return [caches[i]["state"].reshape(tokens.shape[0], -1) for i in layers]

        def intervene(caches):
            caches = list(caches)
            for layer, head in zeroed:
                cache = dict(caches[layers[layer]])
                cache["state"] = cache["state"].at[:, head].set(0.0)
                caches[layers[layer]] = cache
            return caches

        def step(caches, token):
            logits, caches = model.decode_step(token, intervene(caches))
            return caches, (logits, flat_states(caches))

        _, (logits, states) = lax.scan(step, caches, tokens[:, 1:].T)
        first = flat_states(caches)
        return (jnp.concatenate([logits0[:, :1].transpose(1, 0, 2), logits]),
                [jnp.concatenate([f[None], s]) for f, s in zip(first, states)])

    logits, states = jax.jit(run)(params, jnp.asarray(tokens))
    return np.asarray(logits), [np.asarray(s) for s in states]


def centroid_distance(states, elements, correct, first, last):
    """Per position, the mean distance of ``states (L, B, D)`` from their element's centroid
    (the mean state of that element over positions ``first..last``, 1-based, where the model
    is right), relative to the mean distance between two centroids."""
    window = slice(first - 1, last)
    x, g = states[window].reshape(-1, states.shape[-1]), elements[window].ravel()
    ok = correct[window].ravel()
    num_elements = int(elements.max()) + 1
    centroids = np.zeros((num_elements, states.shape[-1]), np.float32)
    seen = np.zeros(num_elements, bool)
    for e in range(num_elements):
        rows = x[(g == e) & ok]
        if len(rows):
            centroids[e], seen[e] = rows.mean(axis=0), True
    known = centroids[seen]
    if len(known) < 2:  # the model was right on fewer than two elements: nothing to compare
        return np.full(states.shape[0], np.nan)
    pair = np.sqrt(((known[:, None] - known[None]) ** 2).sum(-1))
    scale = pair[np.triu_indices(len(known), 1)].mean()
    distance = np.sqrt(((states - centroids[elements]) ** 2).sum(-1)) / scale
    return np.nanmean(np.where(seen[elements], distance, np.nan), axis=1)


def probe_accuracy(states, labels, correct, first, last, ridge=1e-3):
    """Per position, the accuracy of a linear probe ``states (L, B, D) -> labels (L, B)``
    (ridge regression onto one-hot codes; ridge = ``ridge`` × the mean eigenvalue of the
    Gram) fitted on positions ``first..last`` (1-based) of the first half of the words where the
    model is right, measured on the second half."""
    half = states.shape[1] // 2
    window = slice(first - 1, last)
    ok = correct[window, :half].ravel()
    x = states[window, :half].reshape(-1, states.shape[-1])[ok]
    y = labels[window, :half].ravel()[ok]
    if len(np.unique(y)) < 2:  # nothing to tell apart where the model was right
        return np.full(states.shape[0], np.nan)
    mean = x.mean(axis=0)
    xs = (x - mean).astype(np.float64)
    code = np.eye(int(labels.max()) + 1)[y]
    gram = xs.T @ xs
    gram += (ridge * np.trace(gram) / len(gram) + 1e-12) * np.eye(len(gram))
    weights = np.linalg.solve(gram, xs.T @ (code - code.mean(axis=0))).astype(np.float32)
    guess = np.argmax((states[:, half:] - mean) @ weights, axis=-1)
    return (guess == labels[:, half:]).mean(axis=1)


def permutation_parity(group):
    """0/1 per element: the parity of its permutation (S_n's one homomorphism onto Z2)."""
    perms = group.elements
    inversions = (perms[:, :, None] > perms[:, None, :]) & np.triu(
        np.ones((group.degree, group.degree), bool), 1)
    return inversions.sum(axis=(1, 2)) % 2


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(p, length=1024, sequences=64)
    p.add_argument("--centroid-from", type=int, default=16,
                   help="first position (1-based) of the centroids' window; it ends at the "
                        "training length")
    p.add_argument("--zero-state", default="", metavar="SEED:LAYER:HEAD,...",
                   help="also run these seeds with the state of M²RNN layer LAYER (1-based), head "
                        "HEAD (0-based) set to 0 after every step (rows 'SEED zeroed L:H')")
    p.add_argument("--out", required=True, help="output prefix (PREFIX.csv, PREFIX.png)")
    args = p.parse_args()
    interventions = {}
    for item in filter(None, args.zero_state.split(",")):
        seed_text, layer, head = item.split(":")
        interventions.setdefault(int(seed_text), []).append((int(layer) - 1, int(head)))
    config, group, runner, words, runs = load_experiment(args)
    train_length = config.task.train_length
    if not 1 <= args.centroid_from < train_length <= args.length:
        p.error(f"need 1 <= --centroid-from < training length ({train_length}) <= --length")
    elements = words.targets.T  # (L, B): the prefix product each state should represent
    parity = permutation_parity(group)
    rows, results = [], []
    for seed, out_dir in runs:
        params, step, _ = load_run(runner, config, seed, out_dir)
        cases = [(f"seed {seed}", ())]
        if seed in interventions:
            cases.append((f"seed {seed}, state 0 in " + " ".join(
                f"{layer + 1}:{head}" for layer, head in interventions[seed]),
                tuple(interventions[seed])))
        for label, zeroed in cases:
            logits, states = states_along(runner, params, words.tokens, zeroed)
            result = analyse(label, step, logits, states, elements, parity, runner, args,
                             train_length)
            results.append(result)
            rows += result.pop("rows")
    with open(args.out + ".csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(results, args, config, train_length)
    print(f"wrote {args.out}.csv, {args.out}.png")


def analyse(label, step, logits, states, elements, parity, runner, args, train_length):
    """The per-position curves of one run (``label``), printed and as CSV rows."""
    guess = logits.argmax(-1)
    correct = guess == elements
    accuracy, survival = correct.mean(1), np.cumprod(correct, axis=0).mean(1)
    wrong = ~correct
    same_parity = parity[guess] == parity[elements]
    # Of the wrong answers at t, the share with the right parity (chance: 59/119 on S5).
    parity_in_errors = np.where(wrong.any(1), (same_parity & wrong).sum(1) /
                                np.maximum(wrong.sum(1), 1), np.nan)
    layers = []
    window = (correct, args.centroid_from, train_length)
    for i, h in enumerate(states):
        heads = h.reshape(h.shape[0], h.shape[1], runner.model_config.m2rnn.num_heads, -1)
        rms = np.sqrt((heads ** 2).mean(axis=(1, 3)))  # (L, N)
        layers.append((centroid_distance(h, elements, *window),
                       probe_accuracy(h, elements, *window),
                       probe_accuracy(h, parity[elements], *window), rms))
        grown = [n for n in range(rms.shape[1])
                 if rms[-1, n] > max(0.1, 2 * rms[:train_length, n].max())]
        if grown:
            print(f"{label}: layer {i + 1} heads whose state grows past the training length "
                  "(RMS at the end vs the most up to it): " + ", ".join(
                      f"{n} ({rms[-1, n]:.3f} vs {rms[:train_length, n].max():.3f})"
                      for n in grown))
    rows = []
    for t in range(args.length):
        row = {"run": label, "step": step, "position": t + 1, "accuracy": accuracy[t],
               "survival": survival[t], "parity_right_in_errors": parity_in_errors[t]}
        for i, (drift, probe, parity_probe, _) in enumerate(layers):
            row[f"drift_layer{i + 1}"] = drift[t]
            row[f"probe_accuracy_layer{i + 1}"] = probe[t]
            row[f"parity_probe_accuracy_layer{i + 1}"] = parity_probe[t]
        rows.append(row)
    late = slice(2 * train_length, None)
    print(f"{label}: of the wrong answers past {2 * train_length}, "
          f"{(same_parity & wrong)[late].sum() / max(wrong[late].sum(), 1):.3f} have the right "
          f"parity ({wrong[late].sum()} wrong answers)")
    marks = sorted({p for p in (train_length, 2 * train_length, 8 * train_length, args.length)
                    if p <= args.length})
    print(f"{label} (step {step}): " + "; ".join(
        f"t={t}: acc {accuracy[t - 1]:.3f}, survival {survival[t - 1]:.3f}, drift "
        + "/".join(f"{layer[0][t - 1]:.2f}" for layer in layers) + ", probe acc "
        + "/".join(f"{layer[1][t - 1]:.3f}" for layer in layers) + ", parity probe acc "
        + "/".join(f"{layer[2][t - 1]:.3f}" for layer in layers) for t in marks), flush=True)
    return {"label": label, "step": step, "accuracy": accuracy, "survival": survival,
            "layers": layers, "rows": rows}


def plot(results, args, config, train_length):
    num_layers = len(results[0]["layers"])
    fig, axes = plt.subplots(2 + num_layers, 1, figsize=(10, 3.0 * (2 + num_layers)),
                             sharex=True)
    positions = np.arange(1, args.length + 1)
    for r, result in enumerate(results):
        color, label = f"C{r}", result["label"]
        axes[0].plot(positions, result["accuracy"], color=color,
                     label=f"{label} (step {result['step']}) accuracy")
        axes[0].plot(positions, result["survival"], color=color, linestyle="--",
                     label=f"{label}: words right up to t")
        for i, (drift, probe, parity_probe, rms) in enumerate(result["layers"]):
            style = ("-", ":")[i % 2]
            axes[1].plot(positions, drift, color=color, linestyle=style,
                         label=f"{label} layer {i + 1}")
            axes[2 + i].plot(positions, rms, color=color, linewidth=0.6, alpha=0.6)
            axes[2 + i].set_ylabel(f"layer {i + 1}: state RMS\nper head")
    axes[0].set_ylabel("accuracy")
    axes[0].set_ylim(-0.02, 1.02)
    axes[1].set_ylabel("distance to the element's\ncentroid / between centroids")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.axvline(train_length, color="gray", linestyle="--", linewidth=1)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    axes[-1].set_xscale("log", base=2)
    axes[-1].set_xlabel(f"position (training length {train_length} dashed)")
    fig.suptitle(f"{config.task.group}, {args.model}: the states along length-{args.length} words "
                 f"({args.sequences} words)")
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
