"""Runs named variants of one state-tracking experiment side by side and tabulates them.

Each variant is one process of ``python -m m2rnn_experiments.state_tracking.cli`` (one model, one seed) with
its own ``--set`` overrides, all on the same GPU (or the CPU), logging to ``OUT/<variant>.log``
and writing ``OUT/<variant>/results.json``. The table at the end shows how far each variant got:
steps, the longest curriculum length it was trained on, its last training accuracy, and the
per-position accuracy at each evaluation length. Use it to find settings cheaply before
spending seeds and baselines on them.

    PYTHONPATH=. python3 benchmarks/state_tracking_sweep.py --variants all --time-budget-s 420 \
        --out /tmp/sweep [--gpu 1] [-- extra cli flags, e.g. --train-len 16]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

M2RNN = "models.m2rnn.m2rnn."
# Decay init that makes f = exp(-A·dt) small at the start (A·dt in [0.8, 16]): each step
# replaces most of the state, as an Elman RNN's does, instead of integrating slowly (SPEC §2's
# init gives f ≈ 0.9).
OVERWRITE = [f"{M2RNN}A_init_min=8.0", f"{M2RNN}dt_init_min=0.1", f"{M2RNN}dt_init_max=1.0"]
# Gates f ≈ 0.2-0.85 at the start: the per-head gate is the model's only product of state and
# input (f·H), so start where its gradient is largest.
GATE_MID = [f"{M2RNN}A_init_min=0.5", f"{M2RNN}A_init_max=1.5", f"{M2RNN}dt_init_min=0.3",
            f"{M2RNN}dt_init_max=1.0"]


def heads(num_heads, value_dim):
    """Overrides for ``num_heads`` heads of width ``value_dim``."""
    return [f"{M2RNN}num_heads={num_heads}", f"{M2RNN}value_dim={value_dim}"]


H16_V64 = heads(16, 64)
WIDE = heads(1, 256)
# f ≈ 0.5-0.95 at the start (A·dt in [0.05, 0.7]).
GATE_HIGH = [f"{M2RNN}A_init_min=0.5", f"{M2RNN}A_init_max=1.0", f"{M2RNN}dt_init_min=0.1",
             f"{M2RNN}dt_init_max=0.7"]
VARIANTS = {
    "base": [],  # the config as written
    "overwrite": OVERWRITE,
    "gatemid": GATE_MID,
    "v256": WIDE,
    "v256_overwrite": WIDE + OVERWRITE,
    "v128_h4_overwrite": [f"{M2RNN}value_dim=128"] + OVERWRITE,
    "v256_overwrite_lr5e-4": WIDE + OVERWRITE + ["train.learning_rate=5e-4"],
    "v256_overwrite_noclip": WIDE + OVERWRITE + [f"{M2RNN}gradient_clipping=null"],
    "v128_h4_overwrite_3layers": [f"{M2RNN}value_dim=128", "models.m2rnn.layer_pattern=MMM"]
    + OVERWRITE,
    # More heads = more input-dependent gates per layer.
    "h32_v16": heads(32, 16),
    "h32_v16_gatemid": heads(32, 16) + GATE_MID,
    "h64_v8_gatemid": heads(64, 8) + GATE_MID,
    "h32_v16_k4_kheads_gatemid": heads(32, 16) + [f"{M2RNN}key_dim=4",
                                                  f"{M2RNN}num_k_heads=32"] + GATE_MID,
    "h16_v64_gatemid": H16_V64 + GATE_MID,
    "h32_v16_gatemid_lr5e-3": heads(32, 16) + ["train.learning_rate=5e-3"] + GATE_MID,
    # Around the first variant that got past length 4 (h16_v64_gatemid, 2026-11-30).
    "h16_v64_gatemid_seed1": H16_V64 + GATE_MID + ["train.first_seed=1"],
    "h16_v64_gatemid_seed2": H16_V64 + GATE_MID + ["train.first_seed=2"],
    "h8_v64_gatemid": heads(8, 64) + GATE_MID,
    "h32_v64_gatemid": heads(32, 64) + GATE_MID,
    "h32_v64_gatemid_seed1": heads(32, 64) + GATE_MID + ["train.first_seed=1"],
    "h32_v64_gatemid_seed2": heads(32, 64) + GATE_MID + ["train.first_seed=2"],
    "h16_v128_gatemid": heads(16, 128) + GATE_MID,
    "h16_v64_gatemid_lr1e-3": H16_V64 + GATE_MID + ["train.learning_rate=1e-3"],
    "h16_v64_gatemid_lr4e-3": H16_V64 + GATE_MID + ["train.learning_rate=4e-3"],
    "h16_v64_gatehigh": H16_V64 + GATE_HIGH,
    "h16_v64_gatemid_1layer": H16_V64 + GATE_MID + ["models.m2rnn.layer_pattern=M"],
    "h16_v64_gatemid_3layers": H16_V64 + GATE_MID + ["models.m2rnn.layer_pattern=MMM"],
    "h16_v64_gatemid_identity_w": H16_V64 + GATE_MID + [f"{M2RNN}transition_init=identity"],
}
# Continuations of one A5 run (fifth session): `--start-from` its checkpoint (gatemid model of
# s5_gated.yaml, train length 16, 36,000 steps: benchmarks/state_tracking/a5_lr_drop_cpu.txt)
# under a constant learning rate, with or without noise on the M²RNN states in training;
# run with `-- --group A5 --eval-lens 16,64,128,256`. Only SCHEDULE_KEYS differ from the run.


def continuation(lr, noise=0.0):
    return GATE_MID + [f"train.learning_rate={lr}", "train.min_lr_ratio=1.0",
                       f"train.state_noise_std={noise}"]


VARIANTS.update({
    "cont_lr2e-4": continuation(2e-4),
    "cont_lr5e-5": continuation(5e-5),
    "cont_lr2e-4_noise0.02": continuation(2e-4, 0.02),
    "cont_lr2e-4_noise0.05": continuation(2e-4, 0.05),
    "cont_lr1e-3_noise0.05": continuation(1e-3, 0.05),
    "cont_lr2e-4_noise0.1": continuation(2e-4, 0.1),
})
# What every variant shares (the cli's own flags may follow `--` on the command line).
COMMON = ["--config", "configs/state_tracking/s5_gated.yaml", "--models", "m2rnn", "--seeds",
          "1", "--steps", "200000", "--train-len", "16", "--eval-lens", "16,64,128",
          "--batch-size", "256", "--no-progress", "--set", "train.log_every=250",
          "--set", f"{M2RNN}backend=scan"]


def launch(name, overrides, args, extra):
    out = os.path.join(args.out, name)
    if args.start_from:
        # The run resumes from a copy of that checkpoint (unless it has its own already).
        target = os.path.join(out, "checkpoints", os.path.basename(args.start_from))
        if not os.path.exists(target):
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(args.start_from, target)
    cmd = [sys.executable, "-m", "m2rnn_experiments.state_tracking.cli", *COMMON, "--time-budget-s",
           str(args.time_budget_s), "--out", out, *extra]
    for assignment in overrides:
        cmd += ["--set", assignment]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if args.gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
    # Several processes share one GPU: let each take a slice of its memory, not 75 %.
    env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{0.9 / max(1, args.parallel):.3f}")
    log = open(os.path.join(args.out, f"{name}.log"), "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log


def summarize(names, out_dir):
    rows = []
    for name in names:
        path = os.path.join(out_dir, name, "results.json")
        if not os.path.exists(path):
            rows.append(f"{name:30s} no results (see {name}.log)")
            continue
        with open(path) as fh:
            data = json.load(fh)
        run = data["runs"][0]
        accs = "  ".join(f"L={r['length']}: {100 * r['position_accuracy']:5.1f}%"
                         for r in data["results"])
        rows.append(f"{name:30s} {run['steps']:>7d} {run.get('final_scored_length', '?'):>6} "
                    f"{100 * run['final_train_accuracy']:7.1f}%  {accs}")
    header = f"{'variant':30s} {'steps':>7s} {'length':>6s} {'train acc':>8s}  eval per-position"
    return "\n".join([header, *rows])


def main():
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="all",
                   help=f"comma-separated names, or all: {', '.join(VARIANTS)}")
    p.add_argument("--time-budget-s", type=float, default=420.0, help="per variant")
    p.add_argument("--out", required=True)
    p.add_argument("--gpu", help="CUDA_VISIBLE_DEVICES for every variant")
    p.add_argument("--start-from", metavar="CKPT",
                   help="a run's checkpoint (m2rnn_seed<k>.msgpack) every variant continues "
                        "from; the variants may differ from that run only in its schedule")
    args = p.parse_args(argv)
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        p.error(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    args.parallel = len(names)
    os.makedirs(args.out, exist_ok=True)
    start = time.time()
    procs = {name: launch(name, VARIANTS[name], args, extra) for name in names}
    for name, (proc, log) in procs.items():
        proc.wait()
        log.close()
        print(f"{name}: exit {proc.returncode} after {time.time() - start:.0f}s", flush=True)
    table = summarize(names, args.out)
    with open(os.path.join(args.out, "sweep.txt"), "w") as fh:
        fh.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
