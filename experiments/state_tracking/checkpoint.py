"""Resumable state-tracking runs: one file per (model, seed) with everything a run needs to
continue exactly where it stopped — parameters, optimizer state, step, curriculum length, the
NumPy data generator's state (words drawn on the device need only the step) — and a
fingerprint of the settings it was trained with.

Long S5 runs take hundreds of thousands of steps, and a stopped or killed run must not lose its
work: ``training.ModelRunner.run`` saves every ``train.checkpoint_every_s`` seconds and when it
stops, and resumes from the file if it exists. A file written under other settings, or an
unreadable one, is an error that names the file, never silently ignored or overwritten. The
recurrence's backend is not part of the settings (it computes the same function); and one
exception: the learning-rate schedule, the number of steps, Adam's ε, the batch's scale and
label smoothing (``SCHEDULE_KEYS``) may change between invocations — a run continues its
trajectory under the new schedule (say, a lower rate once the curriculum reaches the training
length, or more steps), and the runner prints what changed.

Serialisation is Flax's msgpack (``flax.serialization``), one small self-contained file per
run, rather than ``train.checkpointing``: its Orbax manager keeps a folder of numbered steps
per training run and falls back to an older step when one does not restore, where a run here
must resume from its one file or stop with an error, and several seeds of one model share a
folder.
"""

import dataclasses
import hashlib
import json
import os

from flax import serialization

from train.run_folder import write_atomically

FORMAT = 1
# Settings that do not change what a run's steps compute (how long this invocation may take,
# how often it logs or saves, which seeds the command line asked for, how many share a step,
# how many steps a jitted call runs, how often it is checked for a stop when exact). The word
# generator does, and is hashed as resolved below.
_NOT_FINGERPRINTED = {"time_budget_s", "log_every", "checkpoint_every_s", "seeds", "first_seed",
                      "seeds_per_step", "steps_per_dispatch", "word_generator",
                      "stop_when_exact_every"}
_HASHED_BACKEND = "scan"
_EVAL_ONLY = {"eval_lengths", "eval_sequences", "eval_batch_size", "eval_seed"}
# The learning-rate schedule, the run's length, Adam's ε, the batch's scale and label
# smoothing: a run may be continued under new values. A schedule key a file holds that is not
# listed here is ignored.
SCHEDULE_KEYS = ("learning_rate", "warmup_steps", "min_lr_ratio", "steps",
                 "length_decay_steps", "length_decay_ratio", "adam_eps", "batch_scale",
                 "label_smoothing", "label_smoothing_from")


class ResumeError(RuntimeError):
    """A run's file that cannot be resumed from (unreadable, or other settings); ``reason`` is
    the message without its advice to the training command."""

    def __init__(self, message, reason):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass
class RunState:
    params: dict
    opt_state: object
    step: int  # optimizer steps taken
    scored: int | None  # the curriculum's scored length at ``step`` (None: no curriculum)
    rng_state: dict  # numpy bit generator state of the training words (device words: unused)
    loss: float
    accuracy: float
    schedule: dict | None = None  # SCHEDULE_KEYS when saved (None: not recorded in the file)
    # The step at which the scored length reached the training length (None: not reached, or
    # not recorded in the file).
    reached_step: int | None = None
    # The step at which a check found the run exact and stopped it (None: not, or not recorded).
    exact_step: int | None = None


@dataclasses.dataclass(frozen=True)
class Fingerprints:
    """What a checkpoint is matched against: ``exact`` (every setting), ``trajectory`` (every
    setting but the schedule), the ``schedule`` values themselves, and the ``settings`` behind
    ``trajectory`` as dotted keys (saved so that a mismatch can name what differs)."""
    exact: str
    trajectory: str
    schedule: dict
    settings: dict


def run_settings(model_config, train_config, task_config, *, with_schedule=True) -> dict:
    """Everything but the seed that decides a run's trajectory (without ``SCHEDULE_KEYS`` when
    ``with_schedule`` is false), as plain data."""
    skip = _NOT_FINGERPRINTED | (set() if with_schedule else set(SCHEDULE_KEYS))
    train = {k: v for k, v in dataclasses.asdict(train_config).items() if k not in skip}
    if train_config.device_words:  # (NumPy's words hash as before the key existed)
        train["word_generator"] = "device"
    task = {k: v for k, v in dataclasses.asdict(task_config).items() if k not in _EVAL_ONLY}
    model = dataclasses.asdict(model_config)
    # The recurrence's backend computes the same function (to rounding): a run may move between
    # backends, e.g. from the scan to the GPU kernels. It is always hashed as "scan".
    model["m2rnn"] = {**model["m2rnn"], "backend": _HASHED_BACKEND}
    return {"model": model, "train": train, "task": task}


def flat_settings(settings) -> dict:
    """Nested settings as ``{"train.batch_size": 512, ...}``, values as JSON gives them."""
    flat, stack = {}, [("", json.loads(json.dumps(settings, default=str)))]
    while stack:
        prefix, value = stack.pop()
        if isinstance(value, dict):
            stack += [(f"{prefix}{key}.", item) for key, item in value.items()]
        else:
            flat[prefix[:-1]] = value
    return flat


def differing_keys(before, now) -> set:
    """The keys of two ``flat_settings`` whose values differ (a key one side lacks differs, even
    from a None on the other)."""
    missing = object()
    return {key for key in before.keys() | now.keys()
            if before.get(key, missing) != now.get(key, missing)}


def name_keys(keys) -> str:
    """Setting keys for a one-line message, sorted, the first four named: "a, b, c, d, ..."."""
    keys = sorted(keys)
    return ", ".join(keys[:4]) + (", ..." if len(keys) > 4 else "")


def _digest(settings, seed) -> str:
    text = json.dumps({**settings, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fingerprint(model_config, train_config, task_config, seed, *, with_schedule=True) -> str:
    """A short hash of ``run_settings`` and the seed."""
    return _digest(run_settings(model_config, train_config, task_config,
                                with_schedule=with_schedule), seed)


def fingerprints(model_config, train_config, task_config, seed) -> Fingerprints:
    """The fingerprints a run's checkpoint is saved with and matched against."""
    trajectory = run_settings(model_config, train_config, task_config, with_schedule=False)
    return Fingerprints(
        exact=fingerprint(model_config, train_config, task_config, seed),
        trajectory=_digest(trajectory, seed),
        schedule={k: getattr(train_config, k) for k in SCHEDULE_KEYS},
        settings=flat_settings({**trajectory, "seed": seed}))


def path_for(directory, model, seed):
    return os.path.join(directory, f"{model}_seed{seed}.msgpack")


def save(path, state: RunState, prints: Fingerprints):
    """Writes ``state`` atomically (a kill mid-write leaves the previous file intact)."""
    meta = {"format": FORMAT, "fingerprint": prints.exact, "trajectory": prints.trajectory,
            "schedule": prints.schedule, "settings": prints.settings, "step": state.step,
            "scored": state.scored, "rng_state": state.rng_state, "loss": state.loss,
            "accuracy": state.accuracy, "reached_step": state.reached_step,
            "exact_step": state.exact_step}
    payload = {"meta": json.dumps(meta),
               "tree": serialization.to_state_dict({"params": state.params,
                                                    "opt_state": state.opt_state})}
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_atomically(path, serialization.msgpack_serialize(payload))


def load(path, target_params, target_opt_state, prints: Fingerprints) -> RunState:
    """The state saved at ``path``, shaped like the targets; ``ResumeError`` if the file is
    unreadable or was written under other settings (other than ``SCHEDULE_KEYS``; a file
    without a trajectory fingerprint must match exactly)."""
    try:
        with open(path, "rb") as fh:
            payload = serialization.msgpack_restore(fh.read())
        meta = json.loads(payload["meta"])
        tree = serialization.from_state_dict(
            {"params": target_params, "opt_state": target_opt_state}, payload["tree"])
    except Exception as err:  # noqa: BLE001 - any decoding failure means the same thing
        reason = f"checkpoint {path} is unreadable ({type(err).__name__}: {err})"
        raise ResumeError(f"{reason}; delete it to start this run over", reason) from err
    same = meta.get("fingerprint") == prints.exact or (
        meta.get("trajectory") is not None and meta.get("trajectory") == prints.trajectory)
    if meta.get("format") != FORMAT or not same:
        saved = meta.get("settings")  # files from before the settings were saved hold none
        differing = differing_keys(saved, prints.settings) if isinstance(saved, dict) else set()
        if meta.get("format") != FORMAT:
            what = f"file format {meta.get('format')}, this code's {FORMAT}"
        elif differing:
            what = f"differing: {name_keys(differing)}"
        else:
            what = f"fingerprint {meta.get('fingerprint')}, this run {prints.exact}"
        reason = (f"checkpoint {path} was written under other settings ({what}; only "
                  f"{', '.join(SCHEDULE_KEYS)} may change)")
        raise ResumeError(f"{reason}; use another output folder, or --restart or delete the "
                          f"file to start this run over", reason)
    return RunState(params=tree["params"], opt_state=tree["opt_state"], step=meta["step"],
                    scored=meta["scored"], rng_state=meta["rng_state"], loss=meta["loss"],
                    accuracy=meta["accuracy"], schedule=meta.get("schedule"),
                    reached_step=meta.get("reached_step"), exact_step=meta.get("exact_step"))
