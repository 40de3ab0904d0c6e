"""``m2rnn-train --config PATH [--steps N] [--out DIR] [--restart] [--dry-run]
[--compile-cache DIR|auto|off] [key=value ...]``

Trains the model described by a YAML ``TrainConfig`` (see ``configs/tiny.yaml``). ``--out``
receives checkpoints, ``metrics.jsonl``, ``loss.png`` and the effective ``config.yaml``;
running again with the same ``--out`` resumes, ``--steps`` being the total to reach;
``--restart`` moves the previous run's files aside (under ``<out>/old_runs/``) and starts over.
One run at a time may use an ``--out`` folder. Overrides use dotted keys with YAML values:
``optimizer.learning_rate=1e-3 mesh.fsdp=2``. ``--dry-run`` checks the config and prints the
model's total and active (per token) parameter counts without allocating it.

Errors in the config, the data or the run folder are reported in one line and exit with status
2; a run that cannot go on (no restorable checkpoint, a non-finite loss, a folder in use) exits
with 1; a run stopped by SIGINT / SIGTERM exits with 130 / 143 after saving a checkpoint.

Several processes (multi-host): start one per host with ``JAX_COORDINATOR_ADDRESS=host:port
JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i`` (or under SLURM / Open MPI, detected automatically);
every process runs the same command with the same ``--out`` on a shared filesystem.
"""

import argparse
import sys

from train import compile_cache
from train.errors import add_debug_flag, run_command

DEFAULT_OUT = "runs/default"
PROG = "m2rnn-train"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML TrainConfig, e.g. configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=None,
                        help="total steps to reach (overrides the config's steps)")
    parser.add_argument("--out", default=DEFAULT_OUT,
                        help=f"run folder: checkpoints, metrics, plots (default {DEFAULT_OUT})")
    parser.add_argument("--restart", action="store_true",
                        help="move the checkpoints and metrics already in --out aside (to "
                             "<out>/old_runs/<time>/, nothing is deleted) and start from step 0")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, print the model's total and active parameter "
                             "counts and exit without training")
    compile_cache.add_flag(parser)
    add_debug_flag(parser)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. optimizer.learning_rate=1e-3")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_command(PROG, args.debug, lambda: _train(args))


def _train(args) -> int:
    # Before anything touches a JAX backend: join the other processes if there are any.
    from train.sharding import maybe_initialize_distributed

    maybe_initialize_distributed()
    from train.config import load_train_config
    from train.trainer import train

    overrides = list(args.overrides)
    if args.steps is not None:
        overrides.append(f"steps={args.steps}")
    config = load_train_config(args.config, overrides)
    if args.dry_run:
        from train.config import require_registered_mixers
        from train.step import describe_parameters

        require_registered_mixers(config.model)
        print(describe_parameters(config.model))
        return 0
    compile_cache.enable(args.compile_cache, config.compile_cache)
    summary = train(config, args.out, restart=args.restart)
    if summary["interrupted"]:
        return 130 if summary["reason"] == "SIGINT" else 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
