"""The recipe, its ablations and its baselines as jobs: one m2rnn-state-tracking process per
GPU listed, each job under a GPU-time budget kept across invocations (README, "Recipe, ablations and
baselines: the plan").

    python -m m2rnn_experiments.state_tracking.plan --list             # jobs, commands, budgets
    python -m m2rnn_experiments.state_tracking.plan --gpus 0,1,2,3 --seconds 3600 [STAGE ...]
    python -m m2rnn_experiments.state_tracking.plan --merge            # one table per stage

A job is one command with its own ``--out`` under ``--root`` and its log beside it. Its budget
is its share of its config's ``train.time_budget_s`` (an S5 recipe seed 30 minutes, an
ablation or baseline model's three seeds 15) unless ``BUDGET_MINUTES`` sets its stage's; the
wall-clock time its processes held a GPU is summed over invocations in ``<root>/ledger.json``.
An invocation runs, in the plan's order, the jobs of the stages (or the jobs) it names, all by
default, that are neither done nor out of budget, as many at a time as ``--gpus`` lists, each
with ``--time-budget-s`` the smaller of what its budget and the invocation have left. A job is
done when every run in its ``results.json`` has reached the config's step cap or stopped exact
(``train.stop_when_exact_every``), or when its budget is spent. Runs resume from their
checkpoints, so the same command, repeated until it prints "every job is done", carries out the
plan however short each invocation is; a job whose checkpoints are gone starts over with its
whole budget.
"""

import argparse
import collections
import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

from m2rnn_experiments.state_tracking import cli
from m2rnn_experiments.state_tracking.config import ExperimentConfig
from m2rnn_jax.typed_config import ConfigError, from_dict, read_yaml
from train.errors import add_debug_flag, run_command
from train.run_folder import write_atomically

PROG = "python -m m2rnn_experiments.state_tracking.plan"
# The groups and seeds chosen before any run (README); the stages in the order they run.
RECIPE_SEEDS = {"S5": 3, "A5": 2, "S4": 2}
ABLATION_GROUPS = ("S3", "S5")
ABLATION_S3_STEPS = 10000  # S3 learns in a few thousand steps; S5 takes the config's 100,000
STAGES = ("recipe-S5", "ablations-S3", "ablations-S5", "baselines", "recipe-A5", "recipe-S4")
# A5 and S4 seeds get 20 GPU-minutes, not the 30 of an S5 seed: they reach the training
# length early, and 18 minutes of training take them ~165k steps, 125k-145k into the rate's
# decay (the rate then 2.4e-5 to 1.2e-5, its floor 1e-5) if they reach length 64 by step
# 20k-40k; the whole plan's estimate is then ~5 GPU-hours.
# S3 ablations stop at 10,000 steps, within ~3 minutes a model; 6 bounds them (and stops the
# K = 64 models: 10,000 steps at the scan's 60.5 ms are ~10 minutes a seed, README, "The K = 64
# models and the scan").
BUDGET_MINUTES = {"recipe-A5": 20, "recipe-S4": 20, "ablations-S3": 6}
# Estimated GPU-minutes per job (the README gives the basis); (stage, model) entries override the
# stage's: the K = 64 variants spend their whole budget. Baselines 12: attention took 9.7 (no PE)
# and 11.6 (RoPE) on an H100 to the 300,000-step cap; Mamba-2 (279 steps/s) spends its 15;
# Gated DeltaNet, not yet run, assumed like attention.
ESTIMATE_MINUTES = {"recipe-S5": 30, "recipe-A5": 20, "recipe-S4": 20, "ablations-S3": 2.5,
                    "ablations-S5": 7.5, "baselines": 12, ("baselines", "mamba2"): 15,
                    ("ablations-S3", "k64"): 6, ("ablations-S3", "shipped"): 6,
                    ("ablations-S5", "k64"): 15, ("ablations-S5", "shipped"): 15}
MIN_CALL_S = 120  # a call with less time left would spend it on start-up and compilation
# Start-up before training and evaluation after it, outside the run's --time-budget-s.
OVERHEAD_S = 90
# How often a running job's seconds reach the ledger: if the plan itself dies (the machine is
# lost, a kill), at most this much of the job's time goes uncounted.
HEARTBEAT_S = 30.0


@dataclasses.dataclass(frozen=True)
class Job:
    stage: str
    name: str
    config: str  # a file in configs/
    flags: tuple  # the command's flags besides --config, --out and the invocation's own
    budget_s: float  # GPU-seconds over every invocation
    estimate_s: float

    def out_dir(self, root):
        return os.path.join(root, self.name)

    def argv(self, root, time_budget_s=None):
        """The ``m2rnn-state-tracking`` arguments of one invocation of this job."""
        argv = ["--config", os.path.relpath(cli.CONFIG_DIR / self.config), *self.flags,
                "--out", self.out_dir(root), "--no-progress"]
        if time_budget_s is not None:
            argv += ["--time-budget-s", f"{time_budget_s:.0f}"]
        return argv


def _budget_per_run(config_name):
    """GPU-seconds per (model, seed) run: the config's time budget over its runs."""
    config = from_dict(ExperimentConfig, read_yaml(cli.CONFIG_DIR / config_name))
    return config.train.time_budget_s / (len(config.model_names) * config.train.seeds)


def plan_jobs():
    """Every job of the plan, in the order they run."""
    jobs = []

    def add(stage, name, config, flags, runs, model=None):
        minutes = ESTIMATE_MINUTES.get((stage, model), ESTIMATE_MINUTES[stage])
        budget_s = 60.0 * BUDGET_MINUTES[stage] if stage in BUDGET_MINUTES else \
            runs * _budget_per_run(config)
        jobs.append(Job(stage, name, config, tuple(flags), budget_s, 60.0 * minutes))

    def recipe(group):
        for seed in range(RECIPE_SEEDS[group]):
            add(f"recipe-{group}", f"recipe_{group}_seed{seed}", "recipe.yaml",
                ["--group", group, "--seeds", "1", "--first-seed", str(seed)], runs=1)

    def ablations(group):
        config = from_dict(ExperimentConfig, read_yaml(cli.CONFIG_DIR / "ablations.yaml"))
        steps = ["--steps", str(ABLATION_S3_STEPS)] if group == "S3" else []
        for model in config.model_names:
            add(f"ablations-{group}", f"ablations_{group}_{model}", "ablations.yaml",
                ["--group", group, "--models", model, *steps], runs=config.train.seeds,
                model=model)

    recipe("S5")
    for group in ABLATION_GROUPS:
        ablations(group)
    baselines = from_dict(ExperimentConfig, read_yaml(cli.CONFIG_DIR / "baselines.yaml"))
    for model in baselines.model_names:
        add("baselines", f"baselines_{model}", "baselines.yaml", ["--models", model],
            runs=baselines.train.seeds, model=model)
    recipe("A5")
    recipe("S4")
    assert tuple(dict.fromkeys(j.stage for j in jobs)) == STAGES
    return jobs


def has_checkpoints(out_dir):
    folder = os.path.join(out_dir, "checkpoints")
    return os.path.isdir(folder) and any(f.endswith(".msgpack") for f in os.listdir(folder))


class Ledger:
    """``<root>/ledger.json``: per job, the GPU-seconds used, the invocations and its status."""

    def __init__(self, root):
        self.path = os.path.join(root, "ledger.json")
        self.entries = {}
        if os.path.exists(self.path):
            with open(self.path) as fh:
                self.entries = json.load(fh)
        self.lock = threading.Lock()
        # An invocation that died mid-job left its seconds so far in running_s: they count. (In
        # memory only: the next write keeps them; reading the ledger never writes it.)
        for name, entry in self.entries.items():
            if "running_s" in entry:
                self._charge(entry, entry["running_s"], has_checkpoints(os.path.join(root, name)))

    def entry(self, job):
        return self.entries.setdefault(job.name, {"used_s": 0.0, "calls": 0, "status": "to do"})

    def left_s(self, job):
        return job.budget_s - self.entry(job)["used_s"]

    def finished(self, job):
        return self.entry(job)["status"] in ("done", "budget spent")  # "exit N" is retried

    def forget_lost_work(self, job, root):
        """A job that saved checkpoints in an earlier invocation and is not finished, whose
        checkpoints are now gone (another disk, a deleted folder), starts over: the seconds it
        used move to ``lost_s`` so that the fresh run gets its whole budget. A job that never
        saved one (stopped or failed before its first save) keeps its seconds, so its budget
        still ends it. Returns the seconds moved."""
        entry = self.entry(job)
        if self.finished(job) or not entry.get("checkpointed") or \
                has_checkpoints(job.out_dir(root)):
            return 0.0
        with self.lock:
            lost = entry["used_s"]
            entry["lost_s"] = entry.get("lost_s", 0.0) + lost
            entry["used_s"] = 0.0
            entry["checkpointed"] = False
            self._write()
        return lost

    def record_running(self, job, seconds):
        """The seconds of this invocation's run of ``job`` so far, written while it runs."""
        with self.lock:
            self.entry(job)["running_s"] = seconds
            self._write()

    def record(self, job, used_s, status, checkpointed=False):
        with self.lock:
            entry = self.entry(job)
            self._charge(entry, used_s, checkpointed)
            entry["status"] = status
            self._write()

    @staticmethod
    def _charge(entry, used_s, checkpointed):
        """An invocation's seconds added to ``entry`` (replacing its running seconds, if any)."""
        entry.pop("running_s", None)
        entry["used_s"] += used_s
        entry["calls"] += int(used_s > 0)  # (a job found out of budget is not started)
        entry["checkpointed"] = entry.get("checkpointed", False) or checkpointed

    def _write(self):
        write_atomically(self.path, json.dumps(self.entries, indent=1, sort_keys=True))


def runs_finished(out_dir):
    """Whether every run in ``out_dir/results.json`` took its config's ``train.steps`` or
    stopped exact."""
    path = os.path.join(out_dir, "results.json")
    if not os.path.exists(path):
        return False
    with open(path) as fh:
        report = json.load(fh)
    cap = report["config"]["train"]["steps"]
    return bool(report["runs"]) and all(run["steps"] >= cap or stopped_exact(run)
                                        for run in report["runs"])


def stopped_exact(run):
    """Whether a run of a results.json stopped exact (``train.stop_when_exact_every``)."""
    return run.get("stopped_exact_step") is not None


def run_with_heartbeat(argv, env, log, timeout_s, heartbeat):
    """Runs ``argv`` (its output to ``log``) for at most ``timeout_s``, calling
    ``heartbeat(seconds so far)`` every ``HEARTBEAT_S``; its exit status, or None when it was
    killed at the limit."""
    start = time.monotonic()
    with subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT) as process:
        try:
            while True:
                left = timeout_s - (time.monotonic() - start)
                try:
                    return process.wait(timeout=max(min(HEARTBEAT_S, left), 0.0))
                except subprocess.TimeoutExpired:
                    if time.monotonic() - start >= timeout_s:
                        process.kill()
                        process.wait()
                        return None
                    heartbeat(time.monotonic() - start)
        except BaseException:  # a failed heartbeat, an interrupt: no job outlives its plan
            process.kill()
            raise


def cli_command(argv):
    return [sys.executable, "-m", "m2rnn_experiments.state_tracking.cli", *argv]


def run_jobs(jobs, gpus, seconds, root, command=cli_command):
    """Runs the unfinished ``jobs`` on ``gpus`` (one process each) for at most ``seconds``;
    returns the ``Ledger``."""
    os.makedirs(root, exist_ok=True)
    ledger = Ledger(root)
    deadline = time.monotonic() + seconds
    queue = collections.deque(j for j in jobs if not ledger.finished(j))
    take = threading.Lock()

    def worker(gpu):
        while True:
            with take:
                if not queue:
                    return
                job = queue.popleft()
            lost = ledger.forget_lost_work(job, root)
            if lost:
                print(f"{job.name}: its checkpoints are gone ({job.out_dir(root)}): it starts "
                      f"over with its whole budget ({lost / 60:.1f} GPU-minutes lost)", flush=True)
            left = min(ledger.left_s(job), deadline - time.monotonic())
            if left < MIN_CALL_S:
                if ledger.left_s(job) < MIN_CALL_S:
                    ledger.record(job, 0.0, "budget spent")
                    continue
                # The invocation's time is up; the job (and the queue) waits for the next one.
                print(f"{job.name}: not started, {max(left, 0):.0f} s left in this invocation "
                      f"(a start needs {MIN_CALL_S} s)", flush=True)
                return
            start = time.monotonic()
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
            os.makedirs(job.out_dir(root), exist_ok=True)
            with open(job.out_dir(root) + ".log", "a") as log:
                log.write(f"\n# plan: gpu {gpu}, {left:.0f} s of the budget for this call\n")
                log.flush()
                exit_status = run_with_heartbeat(
                    command(job.argv(root, left - OVERHEAD_S)), env, log, left,
                    lambda seconds: ledger.record_running(job, seconds))
                if exit_status is None:  # killed: resumes from its last checkpoint
                    log.write("# plan: stopped at the call's limit\n")
            used = time.monotonic() - start
            if runs_finished(job.out_dir(root)):
                status = "done"
            elif ledger.left_s(job) - used < MIN_CALL_S:
                status = "budget spent"
            else:  # stopped by the call's time, or failed (retried next time; the log says)
                status = "to do" if exit_status in (0, None) else f"exit {exit_status}"
            ledger.record(job, used, status, checkpointed=has_checkpoints(job.out_dir(root)))
            print(f"{job.name}: {status}, {(ledger.entry(job)['used_s']) / 60:.1f} of "
                  f"{job.budget_s / 60:.0f} GPU-minutes used", flush=True)

    threads = [threading.Thread(target=worker, args=(gpu,)) for gpu in gpus]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return ledger


def budget_table(jobs, ledger=None):
    """Per stage: jobs, the budget and the estimate in GPU-minutes (and from the ledger the
    minutes used, those lost with checkpoints that went missing, and the jobs done)."""
    def minutes(group, key):
        return f"{sum(ledger.entry(j).get(key, 0.0) for j in group) / 60:.1f}"

    lines = ["| stage | jobs | budget (GPU-min) | estimate (GPU-min) |"
             + (" used | lost | done |" if ledger else ""), "| --- | --- | --- | --- |"
             + (" --- | --- | --- |" if ledger else "")]
    for stage in STAGES:
        group = [j for j in jobs if j.stage == stage]
        if not group:
            continue
        line = (f"| {stage} | {len(group)} | {sum(j.budget_s for j in group) / 60:.0f} | "
                f"{sum(j.estimate_s for j in group) / 60:.0f} |")
        if ledger:
            line += (f" {minutes(group, 'used_s')} | {minutes(group, 'lost_s')} | "
                     f"{sum(ledger.entry(j)['status'] == 'done' for j in group)} |")
        lines.append(line)
    lines.append(f"| total | {len(jobs)} | {sum(j.budget_s for j in jobs) / 60:.0f} | "
                 f"{sum(j.estimate_s for j in jobs) / 60:.0f} |"
                 + (f" {minutes(jobs, 'used_s')} | {minutes(jobs, 'lost_s')} | |"
                    if ledger else ""))
    return "\n".join(lines)


TARGET_ACCURACY = 0.99  # per position, at 8x the training length (the recipe's aim, README)


def _percentages(values):
    return ", ".join("—" if v is None else f"{100 * v:.2f}" for v in values)


def results_table(jobs, root, ledger):
    """Markdown, one row per job that has results: per seed (in order) the steps ("exact": it
    stopped so), the step at which the curriculum reached the training length, the longest
    scored length, the per-position accuracy at 1x and 8x the training length; the seeds at
    >= 99 % at 8x; the GPU-minutes the ledger holds."""
    lines = ["| job | group | steps | reached training length at step | longest length "
             "| 1× (%) | 8× (%) | seeds ≥ 99 % at 8× | GPU-min |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for job in jobs:
        path = os.path.join(job.out_dir(root), "results.json")
        if not os.path.exists(path):
            continue
        with open(path) as fh:
            report = json.load(fh)
        task = report["config"]["task"]
        runs = sorted(report["runs"], key=lambda run: run["seed"])

        def accuracy(seed, length):
            found = [row["position_accuracy"] for row in report["results"]
                     if row["seed"] == seed and row["length"] == length]
            return found[0] if found else None

        once = [accuracy(run["seed"], task["train_length"]) for run in runs]
        eight = [accuracy(run["seed"], 8 * task["train_length"]) for run in runs]
        passed = sum(a is not None and a >= TARGET_ACCURACY for a in eight)
        steps = ", ".join(f"{run['steps']:,}" + (" (exact)" if stopped_exact(run) else "")
                          for run in runs)
        reached = ", ".join("—" if run.get("reached_train_length_step") is None
                            else f"{run['reached_train_length_step']:,}" for run in runs)
        lines.append(
            f"| {job.name} | {task['group']} | {steps} "
            f"| {reached} | {', '.join(str(run['final_scored_length']) for run in runs)} "
            f"| {_percentages(once)} | {_percentages(eight)} | {passed} of {len(runs)} "
            f"| {ledger.entry(job)['used_s'] / 60:.1f} |")
    return "\n".join(lines)


def merge(jobs, root):
    """``merge_runs`` per stage: ``<root>/<stage>.csv`` and its plots; then the results table
    of every job, printed and written to ``<root>/results.md``."""
    from m2rnn_experiments.state_tracking import merge_runs

    for stage in STAGES:
        done = [j for j in jobs if j.stage == stage
                and os.path.exists(os.path.join(j.out_dir(root), "results.csv"))]
        if not done:
            continue
        logs = [j.out_dir(root) + ".log" for j in done if os.path.exists(j.out_dir(root) + ".log")]
        merge_runs.merge(merge_runs.parse_args(
            ["--out", os.path.join(root, stage), "--results",
             *[os.path.join(j.out_dir(root), "results.csv") for j in done],
             *(["--logs", *logs] if logs else [])]))
    table = results_table(jobs, root, Ledger(root))
    with open(os.path.join(root, "results.md"), "w") as fh:
        fh.write(table + "\n")
    print(table)
    unlisted = [j.name for j in jobs
                if os.path.exists(os.path.join(j.out_dir(root), "results.csv"))
                and not os.path.exists(os.path.join(j.out_dir(root), "results.json"))]
    if unlisted:
        print(f"not in the table (a results.csv without its results.json; `plan JOB` runs the "
              f"job again and writes both): {', '.join(unlisted)}")


def parse_gpus(text):
    """``--gpus``' ids as CUDA_VISIBLE_DEVICES takes them, each once: numbers written one way
    (``00`` is GPU 0), other ids (``GPU-<uuid>``) as given, so an index and the UUID of one GPU
    pass as two. Two jobs on one GPU take turns on it (docs/kernels.md: no faster than one after
    the other) and two JAX pools would not fit it."""
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus:
        raise ConfigError("--gpus must list at least one GPU id")
    gpus = [str(int(g)) if g.isascii() and g.isdigit() else g for g in gpus]
    twice = sorted({g for g in gpus if gpus.count(g) > 1})
    if twice:
        raise ConfigError(f"--gpus lists GPU {', '.join(twice)} more than once: one job per GPU "
                          "(two on one take turns, no faster)")
    return gpus


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("stages", nargs="*", metavar="STAGE",
                   help=f"stages to run (default all, in this order): {', '.join(STAGES)}; "
                        "or single jobs by name (--list), still in the plan's order")
    p.add_argument("--gpus", default="0", help="comma-separated GPU ids, one process on each")
    p.add_argument("--seconds", type=float, default=3600.0,
                   help="wall-clock limit of this invocation (jobs resume in the next)")
    p.add_argument("--root", default="runs/plan", help="folder of the jobs' runs and logs")
    p.add_argument("--list", action="store_true",
                   help="print the jobs' commands and the budget table; run nothing")
    p.add_argument("--merge", action="store_true",
                   help="merge each stage's results into <root>/<stage>.csv and plots")
    add_debug_flag(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)

    def body():
        jobs = plan_jobs()
        unknown = [s for s in args.stages if s not in STAGES and s not in [j.name for j in jobs]]
        if unknown:
            raise ConfigError(f"unknown stage(s) or job(s) {', '.join(unknown)}; stages: "
                              f"{', '.join(STAGES)} (--list names the jobs)")
        jobs = [j for j in jobs if not args.stages or j.stage in args.stages
                or j.name in args.stages]
        if args.list:
            for job in jobs:
                print(f"{job.name} ({job.budget_s / 60:.0f} GPU-min): m2rnn-state-tracking "
                      + " ".join(job.argv(args.root)))
            print(budget_table(jobs))
            return
        if args.merge:
            if [s for s in args.stages if s not in STAGES]:
                raise ConfigError("--merge takes stages, not jobs: it rewrites each stage's "
                                  "files from all of its jobs")
            merge(jobs, args.root)
            return
        gpus = parse_gpus(args.gpus)
        if not args.seconds > 0:
            raise ConfigError(f"--seconds must be positive, got {args.seconds:g}")
        ledger = run_jobs(jobs, gpus, args.seconds, args.root)
        print(budget_table(jobs, ledger))
        left = [j.name for j in jobs if not ledger.finished(j)]
        print("every job is done" if not left else f"to do: {', '.join(left)}")

    return run_command(PROG, args.debug, body)


if __name__ == "__main__":
    sys.exit(main())
