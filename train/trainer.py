"""The training loop: data → sharded steps → evaluation, checkpoints, metrics, resume.

``train(config, out_dir)`` trains to ``config.steps`` total steps. When ``out_dir`` already
holds checkpoints it resumes from the newest readable one (saying so) with the saved config,
taking only ``steps``, ``mesh``, ``remat``, ``logging`` and ``checkpoint`` (which do not change
the trajectory beyond float rounding) from the config given now; a new ``steps`` keeps the
learning-rate schedule's original length. SIGINT/SIGTERM stop the loop after the current
step, save a checkpoint and return.
"""

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
from train import sharding
from train.checkpointing import Checkpointer
from train.config import TrainConfig, train_config_from_dict, train_config_to_dict
from train.metrics import MetricsLog, Progress, plot_losses
from train.step import build_trainee, put_batch

# Keys a resumed run takes from the new config; the rest must come from the checkpoint.
RESUMABLE_CHANGES = ("steps", "mesh", "remat", "logging", "checkpoint")


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


def train(config: TrainConfig, out_dir, *, devices=None, stop: StopRequest | None = None,
          on_step=None, log=print) -> dict:
    """Trains (or resumes) a run in ``out_dir``; returns a summary dict.

    ``on_step(step, metrics)`` is called after every step (tests use it to interrupt);
    ``devices`` restricts the mesh to some devices (default: all).
    """
    setup_start = time.perf_counter()
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    main_process = jax.process_index() == 0
    say = log if main_process else (lambda *_: None)

    checkpointer = Checkpointer(out, keep=config.checkpoint.keep,
                                async_save=config.checkpoint.async_save, log=say)
    saved_config = checkpointer.saved_config()
    if saved_config is not None:
        config = resolve_resumed_config(config, saved_config, log=say)
    config_dict = train_config_to_dict(config)

    mesh = sharding.make_mesh(config.mesh, devices)
    corpus = data_lib.load_corpus(config.data)
    if corpus.max_token >= config.model.vocab_size:
        raise ConfigError(f"model.vocab_size = {config.model.vocab_size} is too small for the "
                          f"data, whose largest token id is {corpus.max_token}")
    fingerprint = data_lib.corpus_fingerprint(corpus)
    train_rows = data_lib.PackedRows(corpus.train, config.data.seq_len, seed=config.data.seed)
    validation = data_lib.validation_batches(
        data_lib.PackedRows(corpus.validation, config.data.seq_len), config.data.eval_rows,
        config.micro_batch_size)
    unigram_bits = data_lib.unigram_bits_per_token(validation)
    bits_name = "bits per byte" if corpus.byte_level else "bits per token"
    iterator = data_lib.train_iterator(train_rows, config.data.batch_size, config.data.seed,
                                       process_index=jax.process_index(),
                                       process_count=jax.process_count())
    trainee = build_trainee(config, mesh)

    restored = checkpointer.restore_latest(trainee.abstract_state()) if saved_config else None
    if restored is not None:
        state, start_step = restored.state, restored.step
        iterator.set_state(restored.data["iterator"])
        if restored.data.get("corpus_fingerprint") != fingerprint:
            say("WARNING: the training corpus differs from the one this run was trained on "
                "(another Python version or changed files); the data order will not match")
        say(f"Resuming from step {start_step} ({checkpointer.directory / str(start_step)}); "
            f"training to step {config.steps}")
    else:
        if saved_config is not None:
            say("WARNING: no checkpoint could be restored; starting from scratch")
        state, start_step = trainee.init_state(), 0
    if main_process:
        (out / "config.yaml").write_text(yaml.safe_dump(config_dict, sort_keys=False))

    tokens_per_step = config.data.batch_size * config.data.seq_len
    say(f"{corpus.description}")
    say(f"Model: {trainee.num_params / 1e6:.2f}M parameters, pattern "
        f"{config.model.layer_pattern}; mesh {dict(mesh.shape)} on "
        f"{mesh.devices.size} {jax.default_backend()} device(s); {tokens_per_step} tokens/step")
    unigram_name = "unigram byte model" if corpus.byte_level else "unigram model"
    say(f"Validation: {len(validation)} batches of {config.micro_batch_size} rows; "
        f"{unigram_name}: {unigram_bits:.3f} {bits_name}")

    metrics_log = MetricsLog(out, resume_step=start_step if restored else None,
                             enabled=main_process)
    stop = stop or StopRequest()
    restore_handlers = install_stop_handlers(stop)
    progress = Progress(start_step, config.steps,
                        enabled=config.logging.progress_bar and main_process)

    def save(step):
        data_state = {"iterator": iterator.get_state(), "corpus_fingerprint": fingerprint}
        checkpointer.save(step, state, data_state, config_dict)

    def run_eval(step):
        result = evaluate(trainee, state["params"], validation)
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
                values = jax.device_get(metrics)
                now = time.perf_counter()
                tokens_per_s = interval_steps * tokens_per_step / (now - interval_start)
                interval_start, interval_steps = now, 0
                loss = float(values["loss"])
                metrics_log.write("train", step, loss=loss, grad_norm=values["grad_norm"],
                                  learning_rate=values["learning_rate"],
                                  tokens_per_s=tokens_per_s, elapsed_s=now - train_start)
                progress.show(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}",
                              lr=f"{float(values['learning_rate']):.2e}")
                if not math.isfinite(loss):
                    raise FloatingPointError(f"training loss is {loss} at step {step}; "
                                             f"try a lower optimizer.learning_rate")
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
        checkpointer.close()
        say(f"Stopped by {stop.reason} at step {step}/{config.steps}; checkpoint saved in "
            f"{checkpointer.directory}. Run the same command again to resume.")
        return {"step": step, "interrupted": True, "reason": stop.reason, "out_dir": str(out)}

    if last_eval is None or last_eval[0] != step:
        last_eval = (step, run_eval(step))
    save(step)
    checkpointer.wait()
    checkpointer.close()
    final = last_eval[1]
    plot_path = None
    if config.logging.plot and main_process:
        plot_path = plot_losses(out, unigram_bits=unigram_bits, bits_label=bits_name)
    trained_steps = step - start_step
    summary = {
        "step": step, "interrupted": False, "out_dir": str(out),
        "val_loss": final.loss, "val_bits": final.bits, "unigram_bits": unigram_bits,
        "byte_level": corpus.byte_level, "setup_s": setup_seconds, "train_s": train_seconds,
        "tokens_per_s": trained_steps * tokens_per_step / train_seconds if trained_steps else 0.0,
        "num_params": trainee.num_params,
    }
    say(f"Done: step {step}/{config.steps}, {trained_steps} steps in {train_seconds / 60:.1f} "
        f"min (+{setup_seconds:.0f} s set-up), {summary['tokens_per_s']:,.0f} tokens/s. "
        f"Validation: {final.bits:.3f} {bits_name} ({unigram_name}: {unigram_bits:.3f}). "
        f"Checkpoints: {checkpointer.directory}; metrics: {metrics_log.path}"
        + (f"; plot: {plot_path}" if plot_path else ""))
    return summary
