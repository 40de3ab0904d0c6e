"""What the training objective still asks of a state-tracking run: per checkpoint file, the
per-position training loss and the logit margin (right answer's logit minus the largest
other) on fresh words of the training length. A run whose 8× accuracy is flat while these
still move is limited by its optimizer; one where they are flat too (a loss at float32's
floor, margins far past what any answer needs) by the objective. A CPU is enough.

    python -m m2rnn_experiments.state_tracking.margins \
        0:runs/s5_long/seed0/checkpoints/m2rnn_seed0.msgpack \
        5:runs/s5_long/seed5/checkpoints/m2rnn_seed5.msgpack

Each argument is ``SEED:FILE``, a checkpoint of that seed's run, read under the config the
run's ``results.json`` (above ``checkpoints/``) records, or ``--config FILE`` without one.
``--label-smoothing`` reports the loss the run would see with that α.
"""

import argparse
import os

import numpy as np

from m2rnn_experiments.state_tracking.positions import (batched_logits, load_checkpoint,
                                                         positive_counts, run_config, runner_cache,
                                                         seed_and_path)
from m2rnn_experiments.state_tracking.tasks import sample_word_problems
from m2rnn_experiments.state_tracking.training import token_losses
from m2rnn_jax.typed_config import ConfigError
from train.errors import add_debug_flag, run_command


def losses_and_margins(runner, params, tokens, targets, label_smoothing, batch_size):
    """(per-position losses, per-position margins), each (sequences, length) float64."""
    losses, margins = [], []
    for rows, logits in batched_logits(runner, params, tokens, batch_size):
        losses.append(np.asarray(token_losses(logits, targets[rows], label_smoothing),
                                 np.float64))
        logits = np.asarray(logits, np.float64)
        right = np.take_along_axis(logits, targets[rows][..., None], -1)[..., 0]
        np.put_along_axis(logits, targets[rows][..., None], -np.inf, -1)
        margins.append(right - logits.max(-1))
    return np.concatenate(losses), np.concatenate(margins)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="the config of checkpoints whose run folder (above "
                                    "checkpoints/) has no results.json")
    p.add_argument("--model", default="m2rnn", help="the model of the runs (default m2rnn)")
    p.add_argument("runs", nargs="+", metavar="SEED:FILE", help="a seed and its checkpoint file")
    p.add_argument("--sequences", type=int, default=2048, help="words (default 2048)")
    p.add_argument("--batch-size", type=int, default=256, help="words per call (default 256)")
    p.add_argument("--label-smoothing", type=float, default=0.0,
                   help="α of the loss reported, in [0, 1) (default 0)")
    p.add_argument("--words-seed", type=int, default=99, help="seed of the fresh words")
    add_debug_flag(p)
    args = p.parse_args(argv)
    return run_command("margins", args.debug, lambda: report_margins(args))


def report_margins(args):
    positive_counts(args, "sequences", "batch_size")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise ConfigError(f"--label-smoothing must be in [0, 1), got {args.label_smoothing}")
    runner_of = runner_cache(args.model)
    for argument in args.runs:
        seed, path = seed_and_path(argument, "FILE",
                                   "0:runs/s5/checkpoints/m2rnn_seed0.msgpack")
        folder = os.path.dirname(os.path.abspath(path))
        run_dir = os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else None
        config = run_config(args.config, run_dir, path)
        group, runner = runner_of(config)
        length = config.task.train_length
        words = sample_word_problems(group, np.random.default_rng(args.words_seed),
                                     args.sequences, length)
        tokens, targets = np.asarray(words.tokens), np.asarray(words.targets)
        half = length // 2
        print(f"{args.sequences} fresh words of length {length}; loss per position (label "
              f"smoothing {args.label_smoothing}), margin = right logit - largest other")
        saved = load_checkpoint(runner, config, seed, path)
        loss, margin = losses_and_margins(runner, saved.params, tokens, targets,
                                          args.label_smoothing, args.batch_size)
        print(f"seed {seed} step {saved.step}: loss mean {loss.mean():.2e} (positions 1-{half} "
              f"{loss[:, :half].mean():.2e}, {half + 1}-{length} {loss[:, half:].mean():.2e}, "
              f"max {loss.max():.2e}); margin median {np.median(margin):.2f}, 1st percentile "
              f"{np.percentile(margin, 1):.2f}, min {margin.min():.2f}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
