"""Accuracy of a state-tracking model along the line through two checkpoints of one run.

Evaluates ``(1 - w)·A + w·B`` (parameters of checkpoint files A and B; w = 0 is A, 1 is B,
between them an average, beyond them an extrapolation) on the config's fixed evaluation words,
to ask whether weight averaging (EMA, checkpoint averaging) or more steps in the same direction
would help a run that wanders at a constant learning rate. CPU is enough:

    PYTHONPATH=. python3 benchmarks/state_tracking_interpolate.py \\
        --config configs/state_tracking/s5_long.yaml --seed 0 \\
        runs/s5_long/snapshots/m2rnn_seed0_step345600.msgpack \\
        runs/s5_long/seed0/checkpoints/m2rnn_seed0.msgpack --weights 0,0.5,0.75,1,1.5,2

The same file twice with ``--weights 1`` evaluates one checkpoint; ``--vector-config NAME``
picks the vector-state kernels' configuration for it (to compare two on one checkpoint).
"""

import argparse

import jax
import numpy as np

from m2rnn_jax.typed_config import load_yaml
from m2rnn_experiments.state_tracking import cli
from m2rnn_experiments.state_tracking.config import ExperimentConfig
from m2rnn_experiments.state_tracking.training import ModelRunner


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True)
    p.add_argument("--model", default="m2rnn")
    p.add_argument("--seed", type=int, required=True, help="the run's seed (its fingerprint)")
    p.add_argument("first")
    p.add_argument("second")
    p.add_argument("--weights", default="0,0.5,1", help="comma-separated w")
    p.add_argument("--lengths", default="64,512", help="comma-separated evaluation lengths")
    p.add_argument("--vector-config", metavar="NAME",
                   help="the pallas_gpu_vector kernels' configuration (on a GPU): a name of "
                        "benchmarks/vector_kernel_bench.py's CONFIGS, e.g. 'before'")
    args = p.parse_args(argv)
    if args.vector_config:
        import vector_kernel_bench  # benchmarks/ is on sys.path when run as a script

        vector_kernel_bench.with_config(args.vector_config)
    config = load_yaml(ExperimentConfig, args.config)
    group = cli.build_group(config.task)
    runner = ModelRunner(args.model, config.model_config(args.model, group.order), config.train)
    states = [runner.load_saved(path, config.task, args.seed) for path in (args.first, args.second)]
    a, b = (s.params for s in states)
    sq = lambda tree: sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(tree))  # noqa: E731
    distance = np.sqrt(sq(jax.tree.map(lambda x, y: np.asarray(y) - np.asarray(x), a, b)))
    print(f"steps {states[0].step} -> {states[1].step}; |B - A| / |B| = "
          f"{distance / np.sqrt(sq(b)):.2e}")
    lengths = [int(x) for x in args.lengths.split(",")]
    print("w      " + "".join(f"{'L=' + str(n) + ' pos% (seq%)':>22}" for n in lengths))
    for w in (float(x) for x in args.weights.split(",")):
        params = jax.tree.map(lambda x, y: (1.0 - w) * x + w * y, a, b)
        evals = [runner.evaluate(params, group, config.task, n) for n in lengths]
        print(f"{w:<6g} " + "".join(
            f"{100 * e['position_accuracy']:>14.2f} ({100 * e['sequence_accuracy']:5.1f})"
            for e in evals), flush=True)


if __name__ == "__main__":
    main()
