"""``m2rnn-train --config PATH [--steps N] [--out DIR] [key=value ...]``

Trains the model described by a YAML ``TrainConfig`` (see ``configs/tiny.yaml``). ``--out``
receives checkpoints, ``metrics.jsonl``, ``loss.png`` and the effective ``config.yaml``;
running again with the same ``--out`` resumes, ``--steps`` being the total to reach.
Overrides use dotted keys with YAML values: ``optimizer.learning_rate=1e-3 mesh.fsdp=2``.

Several processes (multi-host): start one per host with ``JAX_COORDINATOR_ADDRESS=host:port
JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i`` (or under SLURM / Open MPI, detected automatically);
every process runs the same command with the same ``--out`` on a shared filesystem.
"""

import argparse
import sys

from m2rnn_jax.typed_config import ConfigError

DEFAULT_OUT = "runs/default"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="m2rnn-train", description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML TrainConfig, e.g. configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=None,
                        help="total steps to reach (overrides the config's steps)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"run folder: checkpoints, metrics, plots (default {DEFAULT_OUT})")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. optimizer.learning_rate=1e-3")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # Before anything touches a JAX backend: join the other processes if there are any.
    from train.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()
    from train.config import load_train_config
    from train.data import DataError
    from train.trainer import train

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    try:
        config = load_train_config(args.config, overrides)
    except ConfigError as err:
        print(f"m2rnn-train: config error: {err}", file=sys.stderr)
        return 2
    try:
        summary = train(config, args.out)
    except (ConfigError, DataError) as err:
        print(f"m2rnn-train: error: {err}", file=sys.stderr)
        return 2
    if summary["interrupted"]:
        return 130 if summary["reason"] == "SIGINT" else 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
