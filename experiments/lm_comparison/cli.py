"""``m2rnn-compare``: train M²RNN, Gated DeltaNet, Mamba-2 and attention hybrids of equal size
on one byte-level corpus and compare their validation bits per byte.

Example (the GPU study; stop any time, rerun the same command to go on)::

    m2rnn-compare --config experiments/lm_comparison/configs/small.yaml --out runs/compare \\
        --time-budget-s 540

Every family × seed of the config is one training run of ``train.trainer.train`` in
``<out>/runs/<family>_seed<k>/`` with the same data order, token budget, schedule and byte
tokens. Running the command again skips finished runs and resumes unfinished ones from their
checkpoints; ``--time-budget-s`` stops the current run cleanly (checkpoint saved) once the
budget is spent and starts no other; ``--restart`` first moves the selected runs' folders and
the results aside (under ``<out>/old_runs/<time>/``, nothing is deleted). Writes
``results.csv``, ``results.json``, ``loss_vs_tokens.png`` and ``loss_vs_position.png`` to
``--out`` from every finished run, and prints a summary table. Errors in the settings are
reported in one line (exit status 2; ``--debug`` shows the traceback); a run that cannot go on
exits with 1; a stop by SIGINT / SIGTERM with 130 / 143.
"""

import argparse
import dataclasses
import json
import pathlib
import shutil
import statistics
import sys
import time

from m2rnn_experiments.lm_comparison import report, sizing
from m2rnn_experiments.lm_comparison.config import (CORPUS_DATA_KEYS, ExperimentConfig,
                                                    check_raw, matched_families,
                                                    relative_path, run_fingerprint,
                                                    run_train_config)
from m2rnn_experiments.lm_comparison.corpus import prepare_corpus
from m2rnn_jax.typed_config import ConfigError, assign, from_dict, read_yaml
from train import compile_cache
from train.errors import RunFailure, UserError, add_debug_flag, run_command
from train.run_folder import write_atomically

PROG = "m2rnn-compare"
RUNS_DIR = "runs"
SUMMARY_FILE = "comparison.json"
# Keys of a run's saved config that must equal the requested ones for it to be resumed.
COMPARED_KEYS = ("model", "data", "optimizer", "seed")
_clock = time.monotonic  # the time budget's clock (a test replaces it)


class RunMismatch(UserError):
    """A run folder holds a run of other settings than the config asks for."""


def parse_args(argv):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True,
                   help="experiment YAML, e.g. experiments/lm_comparison/configs/small.yaml")
    p.add_argument("--out", required=True, help="output folder: runs, corpus cache, results")
    p.add_argument("--models", help="comma-separated families to train now (default: the "
                                    "config's run list); results cover every finished one")
    p.add_argument("--seeds", type=int, help="seeds per family (seeds)")
    p.add_argument("--first-seed", type=int, help="first seed (first_seed)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (train.steps)")
    p.add_argument("--time-budget-s", type=float,
                   help="stop cleanly once this many seconds have passed (rerun to go on)")
    p.add_argument("--corpus-dir", help="corpus cache folder (default <out>/corpus)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable), e.g. train.optimizer."
                        "learning_rate=1e-3 or families.gdn.model.mlp.hidden_dim=1024")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    compile_cache.add_flag(p)
    p.add_argument("--restart", action="store_true",
                   help="move the selected runs and the results aside first and start over")
    add_debug_flag(p)
    return p.parse_args(argv)


def load_config(args) -> ExperimentConfig:
    data = read_yaml(args.config)
    check_raw(data)
    config = from_dict(ExperimentConfig, data)
    assignments = list(args.set)
    if args.seeds is not None:
        assignments.append(f"seeds={args.seeds}")
    if args.first_seed is not None:
        assignments.append(f"first_seed={args.first_seed}")
    if args.steps is not None:
        assignments.append(f"train.steps={args.steps}")
    if args.corpus_dir is not None:
        assignments.append(f"corpus.cache_dir={args.corpus_dir}")
    if assignments:
        full = dataclasses.asdict(config)
        for assignment in assignments:
            key = assignment.split("=", 1)[0].strip()
            if key in (f"train.data.{name}" for name in CORPUS_DATA_KEYS):
                raise ConfigError(f"--set {key}: it is set by the corpus section")
            # families.<name>.model holds only changes, so keys below it may be new.
            assign(full, assignment, open_depth=3 if key.startswith("families.") else None)
        config = from_dict(ExperimentConfig, full)
    return config


def selected_families(config: ExperimentConfig, models_flag):
    if models_flag is None:
        return config.family_names
    names = [m.strip() for m in models_flag.split(",") if m.strip()]
    for name in names:
        if name not in config.families:
            raise ConfigError(f"--models lists {name!r}, which the config does not define "
                              f"(families: {', '.join(config.families)})")
    return names


def main(argv=None) -> int:
    """The console script: the exit status (0, or that of an error or a stop by a signal)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    return run_command(PROG, args.debug, lambda: run_comparison(args))


def run_comparison(args) -> int:
    import jax

    from train import run_folder
    from train.trainer import StopRequest, train

    start = _clock()
    deadline = None if args.time_budget_s is None else start + args.time_budget_s
    config = load_config(args)
    compile_cache.enable(args.compile_cache, config.train.compile_cache)
    families = selected_families(config, args.models)
    out = pathlib.Path(args.out)
    run_folder.check_out_dir(out)
    devices = jax.devices()[:config.devices] if config.devices else None
    matched = matched_families(config)
    print(sizes_table(matched, config), flush=True)

    lock = run_folder.RunLock(out, log=print)
    try:
        lock.acquire()
    except run_folder.RunFolderBusy:
        holder = (out / run_folder.LOCK_FILE).read_text(errors="replace").strip()
        raise run_folder.RunFolderBusy(f"{out} is in use by another {PROG} ({holder}); wait "
                                       f"for it to end or choose another --out") from None
    try:
        if args.restart:
            moved = move_aside(out, [run_name(f, s) for f in families for s in config.seed_list])
            if moved:
                print(f"Restarting: the previous runs and results are in {moved}", flush=True)
        cache = config.corpus.cache_dir or out / "corpus"
        corpus = prepare_corpus(cache, config.corpus.packages, config.corpus.validation_fraction,
                                config.corpus.sha256)
        print(corpus.describe(), flush=True)
        corpus_paths = (relative_path(corpus.train_dir), relative_path(corpus.validation_dir))
        validation = None  # read when the first run is evaluated

        stop = StopRequest()
        runs = [(f, s) for f in families for s in config.seed_list]
        status = 0
        for index, (family, seed) in enumerate(runs, 1):
            tag = f"[{index}/{len(runs)}] {family} seed {seed}"
            run_dir = out / RUNS_DIR / run_name(family, seed)
            train_config = run_train_config(config, matched[family].model, seed, corpus_paths,
                                            progress_bar=False if args.no_progress else None)
            fingerprint = run_fingerprint(train_config, config.long_context,
                                          config.long_context_bucket, corpus.sha256)
            finished = read_summary(run_dir)
            if finished is not None and finished.get("fingerprint") == fingerprint:
                print(f"{tag}: finished ({finished['val_bits_per_byte']:.4f} bits/byte); "
                      f"skipped", flush=True)
                continue
            if deadline is not None and _clock() >= deadline:
                stop.request(f"the time budget (--time-budget-s {args.time_budget_s:g})")
            if stop.requested:
                print(f"{tag}: not started (stopped by {stop.reason})", flush=True)
                continue
            check_saved_run(run_dir, train_config)
            print(f"{tag}: training {train_config.steps} steps "
                  f"({matched[family].params / 1e6:.2f}M parameters, pattern "
                  f"{train_config.model.layer_pattern}) in {run_dir}", flush=True)

            def on_step(step, metrics):
                if deadline is not None and _clock() >= deadline:
                    stop.request(f"the time budget (--time-budget-s {args.time_budget_s:g})")

            result = train(train_config, run_dir, devices=devices, stop=stop, on_step=on_step)
            if result["interrupted"]:
                if result["reason"] in ("SIGINT", "SIGTERM"):
                    status = 130 if result["reason"] == "SIGINT" else 143
                stop.request(result["reason"])
                continue
            if result["step"] != train_config.steps:
                raise RunMismatch(f"{run_dir} has trained to step {result['step']}, beyond "
                                  f"the {train_config.steps} steps asked for; give --steps "
                                  f"{result['step']}, or --restart to start it over")
            if validation is None:
                from m2rnn_experiments.lm_comparison.long_context import validation_documents
                validation = validation_documents(corpus.validation_dir)
            summary = summarize_run(run_dir, family, seed, matched[family], train_config,
                                    config, validation, fingerprint)
            write_summary(run_dir, summary)
            print(f"{tag}: {summary['val_bits_per_byte']:.4f} bits/byte, "
                  f"{summary['tokens_per_s']:,.0f} tokens/s; beyond the training length "
                  f"{summary['long_context']['bits_beyond_train_length']:.4f} bits/byte",
                  flush=True)
        return finish(out, config, matched, corpus, status, start)
    finally:
        lock.release()


def finish(out, config, matched, corpus, status, start) -> int:
    """Writes the results of every finished run of the config and prints the table."""
    summaries, missing = [], []
    for family in config.family_names:
        for seed in config.seed_list:
            train_config = run_train_config(config, matched[family].model, seed,
                                            (corpus.train_dir, corpus.validation_dir))
            fingerprint = run_fingerprint(train_config, config.long_context,
                                          config.long_context_bucket, corpus.sha256)
            summary = read_summary(out / RUNS_DIR / run_name(family, seed))
            if summary is not None and summary.get("fingerprint") == fingerprint:
                summaries.append(summary)
            else:
                missing.append(run_name(family, seed))
    elapsed = f"{(_clock() - start) / 60:.1f} min"
    if not summaries:
        print(f"No finished runs yet ({elapsed}); run the same command again to go on.")
        return status
    config_dict = dataclasses.asdict(config)
    paths = report.write_all(out, summaries, config_dict, train_length=config.train.data.seq_len,
                             compare=config.compare, complete=not missing)
    print(f"\n{report.summary_table(summaries, config.compare)}\n")
    if missing:
        print(f"{len(missing)} of {len(summaries) + len(missing)} runs are not finished "
              f"({', '.join(missing)}): run the same command again to go on.")
    print(f"{elapsed}; wrote {', '.join(str(p) for p in paths.values())}", flush=True)
    return status


def sizes_table(matched, config) -> str:
    reference = matched[config.matching.reference].params
    width = max(len(name) for name in matched)
    pattern_width = max(len("pattern"), *(len(m.model.layer_pattern) for m in matched.values()))
    lines = [f"{'family':<{width}}  {'pattern':<{pattern_width}}  {'parameters':>11}  "
             f"{'vs ref':>7}  matched by"]
    for name, m in matched.items():
        by = "(reference)" if m.match is None else f"{m.match} = {m.width}"
        lines.append(f"{name:<{width}}  {m.model.layer_pattern:<{pattern_width}}  "
                     f"{m.params:>11,}  {100 * (m.params / reference - 1):>+6.2f}%  {by}")
    return "\n".join(lines)


def run_name(family: str, seed: int) -> str:
    return f"{family}_seed{seed}"


def read_summary(run_dir):
    try:
        return json.loads((pathlib.Path(run_dir) / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return None


def write_summary(run_dir, summary):
    write_atomically(pathlib.Path(run_dir) / SUMMARY_FILE, json.dumps(summary, indent=2) + "\n")


def check_saved_run(run_dir, train_config):
    """``RunMismatch`` when ``run_dir`` holds checkpoints of other model, data or seed settings
    than ``train_config`` (the trainer would resume them and ignore the new settings)."""
    from train.checkpointing import Checkpointer
    from train.config import train_config_to_dict

    if not (pathlib.Path(run_dir) / "checkpoints").is_dir():
        return
    checkpointer = Checkpointer(run_dir, log=lambda *_: None)
    try:
        saved = checkpointer.saved_config()
    finally:
        checkpointer.close()
    if saved is None:
        return
    wanted = train_config_to_dict(train_config)
    for settings in (saved, wanted):  # a run extended by --steps keeps its schedule's length
        settings["optimizer"] = dict(settings.get("optimizer") or {}, schedule_steps=None)
    differing = [key for key in COMPARED_KEYS if saved.get(key) != wanted[key]]
    if differing:
        details = _first_difference(saved[differing[0]], wanted[differing[0]], differing[0])
        raise RunMismatch(f"{run_dir} holds a run of other {', '.join(differing)} settings "
                          f"({details}); run with --restart to move it aside and start over, "
                          f"or use another --out")


def _first_difference(saved, wanted, key):
    if isinstance(saved, dict) and isinstance(wanted, dict):
        for name in sorted(set(saved) | set(wanted)):
            if saved.get(name) != wanted.get(name):
                return _first_difference(saved.get(name), wanted.get(name), f"{key}.{name}")
    return f"{key} was {saved!r}, the config asks for {wanted!r}"


def move_aside(out, names):
    """Moves the runs ``names`` under ``<out>/runs`` and the result files to
    ``<out>/old_runs/<time>/``; that folder, or ``None`` when there was nothing to move."""
    out = pathlib.Path(out)
    present = [out / RUNS_DIR / name for name in names if (out / RUNS_DIR / name).exists()]
    present += [out / name for name in report.FILES if (out / name).exists()]
    if not present:
        return None
    target = out / "old_runs" / time.strftime("%Y%m%d-%H%M%S")
    suffix = 1
    while target.exists():
        target = target.with_name(f"{target.name.split('.')[0]}.{suffix}")
        suffix += 1
    for path in present:
        destination = target / path.relative_to(out)
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), str(destination))
    return target


def summarize_run(run_dir, family, seed, matched, train_config, config, validation,
                  fingerprint) -> dict:
    """The run's results: size, state bytes, the validation curve and final bits per byte,
    throughput (median over the logged intervals) and the long-context evaluation."""
    from m2rnn_experiments.lm_comparison.long_context import evaluate_run
    from train.metrics import read_metrics

    records = read_metrics(run_dir)
    tokens_per_step = train_config.data.batch_size * train_config.data.seq_len
    evals = [(r["step"], r["val_bits"]) for r in records
             if r["kind"] == "eval" and isinstance(r.get("val_bits"), float)]
    final = [bits for step, bits in evals if step == train_config.steps]
    if not final:
        raise RunFailure(f"{run_dir}/metrics.jsonl has no evaluation at step "
                         f"{train_config.steps}; run with --restart to train it again")
    speeds = [r["tokens_per_s"] for r in records if r["kind"] == "train"
              and isinstance(r.get("tokens_per_s"), float)]
    long_context = evaluate_run(
        run_dir, validation, train_length=train_config.data.seq_len,
        length_factor=config.long_context.length_factor, count=config.long_context.documents,
        bucket_size=config.long_context_bucket, batch_size=config.long_context.batch_size)
    return {"model": family, "label": matched.label, "seed": seed,
            "layer_pattern": matched.model.layer_pattern, "parameters": matched.params,
            "matched_by": None if matched.match is None else {matched.match: matched.width},
            "state_bytes": sizing.state_bytes(matched.model, train_config.data.seq_len),
            "steps": train_config.steps, "tokens_trained": train_config.steps * tokens_per_step,
            "val_bits_per_byte": final[-1],
            "tokens_per_s": float(statistics.median(speeds)) if speeds else None,
            "curve": [[step * tokens_per_step, bits] for step, bits in evals],
            "long_context": long_context, "fingerprint": fingerprint}


if __name__ == "__main__":
    sys.exit(main())
