"""``m2rnn-state-tracking``: train models on word problems over a group, evaluate at longer lengths.

Example (the paper's claim: M²RNN tracks S5 at lengths never seen in training)::

    m2rnn-state-tracking --config experiments/state_tracking/configs/s5_long.yaml \\
        --models m2rnn --seeds 3 --out runs/s5_long

Settings come from a YAML file (``--config``; by default ``configs/<group>.yaml`` next to this
module when it exists, else ``configs/s5.yaml``); the flags below override it, and
``--set key=value`` overrides any key (e.g. ``--set models.m2rnn.m2rnn.backend=scan``). Writes
``results.csv``, ``results.json`` and ``accuracy_vs_length.png`` to the output folder and prints a
summary. These hold this invocation's runs and those of other models and seeds that earlier ones
wrote there under the same settings (``--models`` one at a time add up); an earlier ``results.json``
whose runs differ otherwise is moved aside. Each run saves its state to ``<out>/checkpoints/`` every
minute and when it stops (a kill loses at most the last minute); running the same command again
continues every unfinished run from there (``--restart`` starts over), so a long run can be split
over many invocations. A run may continue under a new learning-rate schedule or step count
(``--steps``, ``--lr``, ``--set train.warmup_steps=...`` or ``train.min_lr_ratio``); any other
change of settings is refused with the file's name. Errors in the settings are reported in one line
(exit status 2; ``--debug`` shows the traceback).
"""

import argparse
import dataclasses
import os
import pathlib
import sys
import time

from m2rnn_experiments.state_tracking import checkpoint
from m2rnn_experiments.state_tracking.config import ExperimentConfig
from m2rnn_experiments.state_tracking.groups import from_generators, group_by_name
from m2rnn_experiments.state_tracking.report import summary_table, write_all
from m2rnn_experiments.state_tracking.training import ModelRunner
from m2rnn_jax.typed_config import ConfigError, assign, from_dict, override, read_yaml
from train import compile_cache
from train.config import require_registered_mixers
from train.errors import add_debug_flag, run_command

CONFIG_DIR = pathlib.Path(__file__).resolve().parent / "configs"
PROG = "m2rnn-state-tracking"


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="experiment YAML (default: experiments/state_tracking/"
                                    "configs/<group>.yaml, else s5.yaml)")
    p.add_argument("--group", help="S<n>, A<n>, Z<n> or D<n> (task.group)")
    p.add_argument("--models", help="comma-separated model names from the config (run)")
    p.add_argument("--train-len", type=int, help="training sequence length (task.train_length)")
    p.add_argument("--eval-lens", help="comma-separated evaluation lengths (task.eval_lengths)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (train.steps)")
    p.add_argument("--seeds", type=int, help="seeds per model (train.seeds)")
    p.add_argument("--first-seed", type=int, help="first seed (train.first_seed)")
    p.add_argument("--seeds-per-step", type=int,
                   help="seeds of a model trained together in one vmapped step "
                        "(train.seeds_per_step; faster on a GPU while the seeds are short)")
    p.add_argument("--steps-per-dispatch", type=int,
                   help="optimizer steps per jitted call, in a loop on the device with the "
                        "words drawn there (train.steps_per_dispatch; 1: words drawn in NumPy, "
                        "one step per call)")
    p.add_argument("--batch-size", type=int, help="train.batch_size")
    p.add_argument("--lr", type=float, help="peak learning rate (train.learning_rate)")
    p.add_argument("--time-budget-s", type=float,
                   help="wall-clock budget for all runs; each run stops early at its share")
    p.add_argument("--out", help="output folder (out_dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (repeatable), e.g. train.weight_decay=0.01")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    compile_cache.add_flag(p)
    p.add_argument("--restart", action="store_true",
                   help="delete the runs' checkpoints in the output folder first (by default a "
                        "run resumes from its checkpoint there)")
    add_debug_flag(p)
    return p.parse_args(argv)


def load_config(args):
    """``(ExperimentConfig, path of its YAML)`` for parsed arguments."""
    path = args.config
    if path is None:
        by_group = CONFIG_DIR / f"{(args.group or 's5').lower()}.yaml"
        path = by_group if by_group.exists() else CONFIG_DIR / "s5.yaml"
    config = from_dict(ExperimentConfig, read_yaml(path))
    flags = {"task.group": args.group, "train.steps": args.steps, "train.seeds": args.seeds,
             "train.first_seed": args.first_seed, "train.seeds_per_step": args.seeds_per_step,
             "train.steps_per_dispatch": args.steps_per_dispatch,
             "task.train_length": args.train_len, "train.batch_size": args.batch_size,
             "train.learning_rate": args.lr, "train.time_budget_s": args.time_budget_s,
             "out_dir": args.out,
             "task.eval_lengths": _int_list(args.eval_lens, "--eval-lens"),
             "run": _model_list(args.models)}
    assignments = [f"{key}={_yaml(value)}" for key, value in flags.items() if value is not None]
    assignments += list(args.set)
    # Model sections hold only changes to the defaults, so their overrides may add keys that
    # the file does not spell out; every other key must already exist.
    model_changes = [a for a in assignments if a.split("=", 1)[0].strip().split(".")[0]
                     in ("models", "base_model")]
    config = override(config, [a for a in assignments if a not in model_changes])
    if model_changes:
        data = dataclasses.asdict(config)
        for assignment in model_changes:
            # base_model and models.<name> must exist; below them any key may be set (the
            # model config built from them checks it).
            assign(data, assignment, open_depth=2 if assignment.startswith("models.") else 1)
        config = from_dict(ExperimentConfig, data)
    for name in config.model_names:
        require_registered_mixers(config.model_config(name, vocab_size=2),
                                  key=f"models.{name}.layer_pattern")
    build_group(config.task)  # a bad group fails here, before any work
    return config, path


def _model_list(text):
    """``--models`` as a list of distinct names (``None`` when not given)."""
    if text is None:
        return None
    names = [m.strip() for m in text.split(",") if m.strip()]
    if not names or len(set(names)) != len(names):
        raise ConfigError(f"--models takes distinct comma-separated model names, got '{text}'")
    return names


def build_group(task):
    try:
        if task.generators is not None:
            return from_generators(task.generators, name=task.group)
        return group_by_name(task.group)
    except ValueError as err:
        key = "task.generators" if task.generators is not None else "task.group"
        raise ConfigError(f"{key}: {err}") from err


def main(argv=None) -> int:
    """The console script: runs the experiment; the exit status (0, or that of an error)."""
    argv = sys.argv[1:] if argv is None else argv

    def body():
        run_experiment(argv)

    return run_command(PROG, parse_args(argv).debug, body,
                       user_errors=(checkpoint.ResumeError,))


def run_experiment(argv) -> list:
    """Trains and evaluates every (model, seed) the arguments ask for, writes the results to
    the output folder; returns the ``training.RunResult`` of each run."""
    args = parse_args(argv)
    config, path = load_config(args)
    compile_cache.enable(args.compile_cache, config.compile_cache)
    group = build_group(config.task)
    task, train = config.task, config.train
    names = config.model_names
    print(f"config {path}: word problems over {group.name} (order {group.order}), train length "
          f"{task.train_length} ({task.length_sampling}), eval lengths {task.eval_lengths}, "
          f"{train.steps} steps x batch {train.batch_size}, {train.seeds} seed(s), models "
          f"{', '.join(names)}", flush=True)
    total_runs = len(names) * train.seeds
    start = time.perf_counter()
    results = []
    for name in names:
        runner = ModelRunner(name, config.model_config(name, group.order), train)
        print(f"{name}: {runner.num_params:,} parameters, layer pattern "
              f"{runner.model_config.layer_pattern}", flush=True)
        seeds = list(range(train.first_seed, train.first_seed + train.seeds))
        for first in range(0, len(seeds), train.seeds_per_step):
            group_seeds = seeds[first:first + train.seeds_per_step]  # trained in one step
            deadline = None
            if train.time_budget_s is not None:  # cumulative shares: unused time rolls over
                deadline = start + train.time_budget_s * (
                    len(results) + len(group_seeds)) / total_runs
            ckpts = [None] * len(group_seeds)
            if train.checkpoint_every_s is not None:
                ckpts = [checkpoint.path_for(os.path.join(config.out_dir, "checkpoints"), name,
                                             seed) for seed in group_seeds]
                for ckpt in ckpts:
                    if args.restart and os.path.exists(ckpt):
                        os.remove(ckpt)
            for result in runner.run_seeds(group_seeds, group, task, deadline,
                                           progress=not args.no_progress,
                                           checkpoint_paths=ckpts):
                results.append(result)
                accs = ", ".join(f"L={e['length']}: {100 * e['position_accuracy']:.1f}%"
                                 for e in result.evals)
                taken = result.steps - result.resumed_from_step  # by this invocation
                # The first call's steps (steps_per_dispatch of them) are in compile_s.
                timed = taken - min(taken, train.steps_per_dispatch)
                stop = ""
                if result.stopped_exact_step is not None:
                    stop = "; stopped exact on held-out words"
                elif result.steps < train.steps:
                    stop = f"; stopped by the time budget, {train.steps} steps asked"
                print(f"  seed {result.seed}: {result.steps} steps, compile "
                      f"{result.compile_s:.1f}s, train {result.train_s:.1f}s "
                      f"({timed / max(result.train_s, 1e-9):.0f} steps/s), eval "
                      f"{result.eval_s:.1f}s, loss {result.final_loss:.3f}; per-position "
                      f"accuracy {accs}{stop}", flush=True)
    paths, rows, note = write_all(config.out_dir, results, config, group)
    if note:
        print(f"the results leave out earlier runs: {note}", flush=True)
    print(f"\n{summary_table(rows)}\n\ntotal {time.perf_counter() - start:.0f}s; wrote "
          f"{', '.join(str(p) for p in paths.values())}", flush=True)
    return results


def _int_list(text, flag):
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers, got {text!r}") from None


def _yaml(value):
    """A flag value as the YAML text ``override`` parses."""
    if isinstance(value, list):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


if __name__ == "__main__":
    sys.exit(main())
