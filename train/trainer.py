"""The training loop: data → sharded steps → evaluation, checkpoints, metrics, resume.

``train(config, out_dir)`` trains to ``config.steps`` total steps. When ``out_dir`` already
holds checkpoints it resumes from the newest one that verifies and restores (saying so) with
the saved config, taking only ``steps``, ``mesh``, ``remat``, ``logging``, ``checkpoint``,
``on_nonfinite`` and ``compile_cache`` (which do not change the trajectory beyond float rounding,
or only at non-finite steps) from the config given now; a new ``steps`` keeps the learning-rate
schedule's original length. When it holds checkpoints of which none restores it stops with
``CheckpointError`` and changes nothing; ``restart=True`` first moves the previous run's files
aside (``train/run_folder.py``). A run that already reached ``steps`` says so and does nothing.

The config, the data and the model are checked before anything is written under ``out_dir``;
then the folder is locked for the run. SIGINT/SIGTERM stop the loop after the current step,
save a checkpoint and return. A non-finite loss, gradient norm or state is handled as
``on_nonfinite`` says (``train/config.py``); a non-finite state is never saved.
"""

import contextlib
import dataclasses
import math
import pathlib
import signal
import threading
import time

import jax
import numpy as np
import yaml

from m2rnn_jax.typed_config import ConfigError
from train import data as data_lib
from train import run_folder, sharding
from train.checkpointing import CheckpointError, Checkpointer
from train.config import (TrainConfig, require_registered_mixers, train_config_from_dict,
                          train_config_to_dict)
from train.errors import RunFailure, UserError
from train.metrics import MetricsLog, Progress, plot_losses
from train.step import MOE_METRICS, build_trainee, put_batch

# Keys a resumed run takes from the new config; the rest must come from the checkpoint.
RESUMABLE_CHANGES = ("steps", "mesh", "remat", "logging", "checkpoint", "on_nonfinite",
                     "compile_cache")


class NonFiniteError(RunFailure):
    """The loss, the gradient norm or the model state is not finite (``on_nonfinite: stop``)."""


class StopRequest:
    """Set by a signal handler (or a caller) to end training cleanly after the current step."""

    def __init__(self):
        self.reason = None

    def request(self, reason: str):
        self.reason = self.reason or reason

    @property
    def requested(self) -> bool:
        return self.reason is not None


def install_stop_handlers(stop: StopRequest):
    """First SIGINT/SIGTERM requests a clean stop (checkpoint, then exit); a second one acts
    as usual. Returns a function that puts the previous handlers back. No-op off the main
    thread (Python only delivers signals there)."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}

    def handler(signum, _frame):
        stop.request(signal.Signals(signum).name)
        signal.signal(signum, previous[signum])  # a second signal is not swallowed

    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.getsignal(signum)
        signal.signal(signum, handler)

    def restore():
        for signum, old in previous.items():
            signal.signal(signum, old)
    return restore


def resolve_resumed_config(given: TrainConfig, saved: dict, log=print) -> TrainConfig:
    """The saved config with the keys of ``RESUMABLE_CHANGES`` taken from ``given``."""
    merged = dict(saved)
    given_dict = train_config_to_dict(given)
    for key in RESUMABLE_CHANGES:
        merged[key] = given_dict[key]
    ignored = sorted(k for k in given_dict if k not in RESUMABLE_CHANGES
                     and given_dict[k] != saved.get(k))
    if ignored:
        log(f"NOTE: the resumed run keeps its saved {', '.join(ignored)} settings; the new "
            f"values given for them are ignored (use a new --out to change them)")
    if merged["steps"] != saved["steps"] and saved["optimizer"]["schedule_steps"] is None:
        # The learning-rate schedule keeps the length it was started with: no jump in the
        # learning rate when a run is extended; steps past it use the final learning rate.
        merged["optimizer"] = dict(saved["optimizer"], schedule_steps=saved["steps"])
        log(f"NOTE: the learning-rate schedule keeps its length of {saved['steps']} steps "
            f"(optimizer.schedule_steps); steps beyond it use the final learning rate")
    return train_config_from_dict(merged)


@dataclasses.dataclass
class Evaluation:
    loss: float  # nats per target
    bits: float  # bits per target (= bits per byte for byte-level data)


def evaluate(trainee, params, batches) -> Evaluation:
    total, count = 0.0, 0
    for batch in batches:
        loss_sum, n = trainee.eval_step(params, put_batch(batch, trainee))
        total += float(loss_sum)
        count += int(n)
    loss = total / max(count, 1)
    return Evaluation(loss=loss, bits=loss / math.log(2))


@dataclasses.dataclass
class Setup:
    """What a run needs besides its folder: checked before anything is written there."""

    mesh: jax.sharding.Mesh
    corpus: data_lib.Corpus
    fingerprint: int
    validation: list
    unigram_bits: float
    iterator: object
    trainee: object


def set_up(config: TrainConfig, devices=None) -> Setup:
    """Mesh, data and model of ``config``; ``ConfigError`` / ``DataError`` when they do not fit."""
    require_registered_mixers(config.model)
    mesh = sharding.make_mesh(config.mesh, devices)
    corpus = data_lib.load_corpus(config.data)
    if corpus.max_token >= config.model.vocab_size:
        raise ConfigError(f"model.vocab_size = {config.model.vocab_size} is too small for the "
                          f"data, whose largest token id is {corpus.max_token}")
    train_rows = data_lib.PackedRows(corpus.train, config.data.seq_len, seed=config.data.seed)
    validation = data_lib.validation_batches(
        data_lib.PackedRows(corpus.validation, config.data.seq_len), config.data.eval_rows,
        config.micro_batch_size)
    iterator = data_lib.train_iterator(train_rows, config.data.batch_size, config.data.seed,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())
    return Setup(mesh=mesh, corpus=corpus, fingerprint=data_lib.corpus_fingerprint(corpus),
                 validation=validation,
                 unigram_bits=data_lib.unigram_bits_per_token(validation), iterator=iterator,
                 trainee=build_trainee(config, mesh))


@contextlib.contextmanager
def locked_run_folder(out, log):
    """Creates and locks ``out`` (on the main process) for the ``with`` block; every process
    fails when the main one cannot take it."""
    lock = run_folder.RunLock(out, log=log) if jax.process_index() == 0 else None
    error = None
    try:
        if lock is not None:
            lock.acquire()
    except UserError as err:
        error = err
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        taken = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not taken and error is None:
            error = run_folder.RunFolderBusy(f"the main process could not take {out}")
    if error is not None:
        raise error
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def train(config: TrainConfig, out_dir, *, devices=None, stop: StopRequest | None = None,
          on_step=None, log=print, restart=False) -> dict:
    """Trains (or resumes) a run in ``out_dir``; returns a summary dict.

    ``on_step(step, metrics)`` is called after every step (tests use it to interrupt);
    ``devices`` restricts the mesh to some devices (default: all); ``restart`` moves the files
    of a previous run in ``out_dir`` aside and starts from step 0.
    """
    setup_start = time.perf_counter()
    out = pathlib.Path(out_dir)
    main_process = jax.process_index() == 0
    say = log if main_process else (lambda *_: None)
    run_folder.check_out_dir(out)

    given = config

    def new_checkpointer():
        return Checkpointer(out, keep=given.checkpoint.keep,
                            async_save=given.checkpoint.async_save, log=say)

    checkpointer = new_checkpointer()
    saved_config = None if restart else checkpointer.saved_config()
    if saved_config is not None:
        config = resolve_resumed_config(given, saved_config, log=say)
    setup = set_up(config, devices)
    trainee = setup.trainee

    with locked_run_folder(out, say):
        try:
            if restart:
                moved = run_folder.move_aside(out) if main_process else None
                _sync("--restart")
                if moved is not None:
                    say(f"Restarting from step 0; the previous run's files are in {moved}")
                checkpointer.close()
                checkpointer = new_checkpointer()
            restored = checkpointer.restore_latest(trainee.abstract_state())
            if (restored is None) != (saved_config is None) or (
                    restored is not None and config != resolve_resumed_config(
                        given, restored.config, log=lambda *_: None)):
                raise CheckpointError(f"the checkpoints in {checkpointer.directory} changed "
                                      f"while this run was starting (did another run use "
                                      f"{out}?); run the command again")
            if restored is not None and restored.step >= config.steps:
                say(f"Already finished at step {restored.step} (steps = {config.steps}); "
                    f"nothing to do. Give a larger --steps to train further, or --restart to "
                    f"start over")
                return {"step": restored.step, "interrupted": False, "already_finished": True,
                        "out_dir": str(out)}
            return _train_loop(config, out, setup, checkpointer, restored, stop=stop,
                               on_step=on_step, say=say, setup_start=setup_start)
        finally:
            checkpointer.wait()  # a save in flight holds a good state: let it finish
            checkpointer.close()


def _sync(name):
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _train_loop(config, out, setup, checkpointer, restored, *, stop, on_step, say, setup_start):
    main_process = jax.process_index() == 0
    trainee, iterator, corpus = setup.trainee, setup.iterator, setup.corpus
    config_dict = train_config_to_dict(config)
    if restored is not None:
        start_step = restored.step
        state = dict(restored.state, health=trainee.init_health(start_step))
        iterator.set_state(restored.data["iterator"])
        if restored.data.get("corpus_fingerprint") != setup.fingerprint:
            say("WARNING: the training corpus differs from the one this run was trained on "
                "(another Python version or changed files); the data order will not match")
        say(f"Resuming from step {start_step} ({checkpointer.directory / str(start_step)}); "
            f"training to step {config.steps}")
    else:
        state, start_step = trainee.init_state(), 0
    if main_process:
        (out / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))

    tokens_per_step = config.data.batch_size * config.data.seq_len
    bits_name = "bits per byte" if corpus.byte_level else "bits per token"
    unigram_name = "unigram byte model" if corpus.byte_level else "unigram model"
    say(f"{corpus.description}")
    say(f"Model: {trainee.num_params / 1e6:.2f}M parameters, pattern "
        f"{config.model.layer_pattern}; mesh {dict(setup.mesh.shape)} on "
        f"{setup.mesh.devices.size} {jax.default_backend()} device(s); {tokens_per_step} "
        f"tokens/step")
    say(f"Validation: {len(setup.validation)} batches of {config.micro_batch_size} rows; "
        f"{unigram_name}: {setup.unigram_bits:.3f} {bits_name}")

    metrics_log = MetricsLog(out, resume_step=start_step if restored else None,
                             enabled=main_process, log=say)
    stop = stop or StopRequest()
    restore_handlers = install_stop_handlers(stop)
    progress = Progress(start_step, config.steps,
                        enabled=config.logging.progress_bar and main_process)
    last_saved = start_step if restored else None
    logged_nonfinite = 0

    def check_health(health_values=None):
        """Raises ``NonFiniteError`` (``on_nonfinite: stop``) once a step was not finite."""
        values = jax.device_get(state["health"]) if health_values is None else health_values
        if int(values["nonfinite"]) and config.on_nonfinite == "stop":
            saved = ("no checkpoint was saved" if last_saved is None else
                     f"the newest checkpoint, step {last_saved}, precedes it")
            raise NonFiniteError(
                f"the training loss or gradient norm is not finite (NaN or inf) at step "
                f"{int(values['first_nonfinite'])}; {saved}. Lower optimizer.learning_rate "
                f"(with --restart or another --out), or run again with on_nonfinite=skip to "
                f"skip such steps")

    def save(step):
        nonlocal last_saved
        check_health()
        if not bool(trainee.state_is_finite(state)):
            raise NonFiniteError(
                f"the model state is not finite (NaN or inf) after step {step} although every "
                f"loss and gradient norm was; it was not saved. Lower "
                f"optimizer.learning_rate (with --restart or another --out)")
        data_state = {"iterator": iterator.get_state(), "corpus_fingerprint": setup.fingerprint}
        checkpointer.save(step, state, data_state, config_dict)
        last_saved = step

    def run_eval(step):
        check_health()
        result = evaluate(trainee, state["params"], setup.validation)
        metrics_log.write("eval", step, val_loss=result.loss, val_bits=result.bits)
        progress.write(f"step {step}: validation loss {result.loss:.4f}, "
                       f"{result.bits:.4f} {bits_name}")
        return result

    setup_seconds = time.perf_counter() - setup_start
    train_start = time.perf_counter()
    interval_start, interval_steps = train_start, 0
    last_eval = None
    step = start_step

    def should_stop():
        if jax.process_count() == 1:
            return stop.requested
        # Processes must stop at the same step: agree every log_every steps.
        if step % config.logging.log_every:
            return False
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.array(stop.requested))))

    try:
        while step < config.steps and not should_stop():
            batch = put_batch(next(iterator), trainee,
                              accum_steps=config.optimizer.grad_accum_steps)
            state, metrics = trainee.train_step(state, batch)
            step += 1
            interval_steps += 1
            progress.advance()
            if on_step is not None:
                on_step(step, metrics)
            if step % config.logging.log_every == 0 or step == config.steps:
                values, health_values = jax.device_get((metrics, state["health"]))
                now = time.perf_counter()
                tokens_per_s = interval_steps * tokens_per_step / (now - interval_start)
                interval_start, interval_steps = now, 0
                loss = float(values["loss"])
                skipped = {}
                if config.on_nonfinite == "skip":
                    nonfinite = int(health_values["nonfinite"])
                    skipped = {"skipped_steps": nonfinite - logged_nonfinite}
                    logged_nonfinite = nonfinite
                metrics_log.write("train", step, loss=loss, grad_norm=values["grad_norm"],
                                  learning_rate=values["learning_rate"],
                                  tokens_per_s=tokens_per_s, elapsed_s=now - train_start,
                                  **{key: values[key] for key in MOE_METRICS if key in values},
                                  **skipped)
                progress.show(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                              lr=f"{float(values['learning_rate']):.2e}")
                check_health(health_values)
                if skipped.get("skipped_steps"):
                    progress.write(f"step {step}: skipped {skipped['skipped_steps']} step(s) "
                                   f"with a non-finite loss or gradient norm since the last log")
            if config.logging.eval_every and step % config.logging.eval_every == 0 \
                    and step < config.steps:
                last_eval = (step, run_eval(step))
            if config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0:
                save(step)
    finally:
        progress.close()
        restore_handlers()

    train_seconds = time.perf_counter() - train_start
    if step < config.steps:  # stopped by a signal (on any process)
        stop.request("a signal to another process")
        save(step)
        checkpointer.wait()
        say(f"Stopped by {stop.reason} at step {step}/{config.steps}; checkpoint of step "
            f"{step} in {checkpointer.directory}. Run the same command again to resume.")
        return {"step": step, "interrupted": True, "reason": stop.reason, "out_dir": str(out)}

    if last_eval is None or last_eval[0] != step:
        last_eval = (step, run_eval(step))
    save(step)
    checkpointer.wait()
    final = last_eval[1]
    plot_path = None
    if config.logging.plot and main_process:
        plot_path = plot_losses(out, unigram_bits=setup.unigram_bits, bits_label=bits_name)
    trained_steps = step - start_step
    summary = {
        "step": step, "interrupted": False, "out_dir": str(out),
        "val_loss": final.loss, "val_bits": final.bits, "unigram_bits": setup.unigram_bits,
        "byte_level": corpus.byte_level, "setup_s": setup_seconds, "train_s": train_seconds,
        "tokens_per_s": trained_steps * tokens_per_step / train_seconds,
        "num_params": trainee.num_params,
    }
    say(f"Done: step {step}/{config.steps}, {trained_steps} steps in {train_seconds / 60:.1f} "
        f"min (+{setup_seconds:.0f} s set-up), {summary['tokens_per_s']:,.0f} tokens/s over "
        f"the whole loop (compilation and evaluations included). "
        f"Validation: {final.bits:.3f} {bits_name} ({unigram_name}: "
        f"{setup.unigram_bits:.3f}). Checkpoints: {checkpointer.directory}; metrics: "
        f"{metrics_log.path}" + (f"; plot: {plot_path}" if plot_path else ""))
    return summary
