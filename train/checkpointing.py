"""Checkpoints of a run (Orbax ``CheckpointManager``) under ``<out>/checkpoints/<step>/``.

Each step holds four items: ``params`` (the model's parameters, pure dict), ``train_state``
(optimizer state, step counter, RNG), ``data`` (the training iterator's position and a corpus
fingerprint) and ``config`` (the whole ``TrainConfig`` as JSON), so a run resumes exactly and
the generation CLI can rebuild the model from the directory alone
(:func:`restore_for_inference`).

A checkpoint that fails to restore (damaged or partly written files) is reported, moved to
``<out>/damaged_checkpoints/`` and the previous one is used.
"""

import dataclasses
import pathlib
import shutil
import time
import warnings

import jax
import orbax.checkpoint as ocp
from flax import nnx

from m2rnn_jax import HybridLM, ModelConfig
from m2rnn_jax.typed_config import from_dict

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"
ITEMS = ("params", "train_state", "data", "config")


@dataclasses.dataclass
class Restored:
    step: int
    state: dict  # {"params", "opt_state", "step", "rng"}
    data: dict  # {"iterator": grain iterator state, "corpus_fingerprint": int}
    config: dict  # TrainConfig as plain data


class CheckpointError(RuntimeError):
    """No checkpoint in a directory could be restored."""


class Checkpointer:
    """Saves and restores training checkpoints in ``<out_dir>/checkpoints``."""

    def __init__(self, out_dir, *, keep=3, async_save=True, log=print):
        self.out_dir = pathlib.Path(out_dir).absolute()
        self.directory = self.out_dir / CHECKPOINT_DIR
        self._log = log
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def steps(self) -> list:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: dict, data: dict, config: dict) -> bool:
        """Starts saving ``state`` at ``step`` (in the background when async); False when a
        checkpoint of that step already exists."""
        if step in self._manager.all_steps():
            return False
        train_state = {key: state[key] for key in ("opt_state", "step", "rng")}
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            train_state=ocp.args.StandardSave(train_state),
            data=ocp.args.JsonSave(data),
            config=ocp.args.JsonSave(config)))
        return True

    def saved_config(self) -> dict | None:
        """The config stored with the newest checkpoint whose config reads (``None``: no
        checkpoints)."""
        for step in reversed(self.steps()):
            try:
                return dict(self._manager.restore(step, args=ocp.args.Composite(
                    config=ocp.args.JsonRestore()))["config"])
            except Exception:  # noqa: BLE001 — restore_latest reports and sets it aside
                continue
        return None

    def restore_latest(self, abstract_state) -> Restored | None:
        """The newest checkpoint that restores (``None`` if there is none); unreadable newer ones
        are reported and moved aside to ``<out>/damaged_checkpoints``."""
        for step in reversed(self.steps()):
            abstract_train_state = {key: abstract_state[key] for key in
                                    ("opt_state", "step", "rng")}
            try:
                items = self._manager.restore(step, args=ocp.args.Composite(
                    params=ocp.args.StandardRestore(abstract_state["params"]),
                    train_state=ocp.args.StandardRestore(abstract_train_state),
                    data=ocp.args.JsonRestore(),
                    config=ocp.args.JsonRestore()))
            except Exception as err:  # noqa: BLE001 — any failure means "not usable"
                self._set_aside(step, err)
                continue
            state = {"params": items["params"], **items["train_state"]}
            return Restored(step, state, dict(items["data"]), dict(items["config"]))
        return None

    def _set_aside(self, step, err):
        target = self.out_dir / DAMAGED_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        self._log(f"WARNING: checkpoint {self.directory / str(step)} cannot be restored "
                  f"({_describe(err)}); moving it to {target} and trying the previous one")
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self._manager.reload()

    def wait(self):
        """Blocks until background saves are on disk."""
        self._manager.wait_until_finished()

    def close(self):
        self._manager.close()


def _describe(err) -> str:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first_line[:300]}"


def restore_for_inference(out_dir, *, step=None):
    """``(ModelConfig, HybridLM)`` from the newest readable checkpoint of a training run.

    ``out_dir`` is the ``--out`` folder of ``m2rnn-train``. Parameters land on the default
    device, unsharded. ``step`` picks a checkpoint (default: the newest that restores).
    """
    directory = pathlib.Path(out_dir).absolute() / CHECKPOINT_DIR
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoints in {out_dir}: {directory} does not exist "
                              f"(is {out_dir} the --out folder of m2rnn-train?)")
    manager = ocp.CheckpointManager(directory, item_names=ITEMS,
                                    options=ocp.CheckpointManagerOptions(read_only=True))
    steps = sorted(manager.all_steps(), reverse=True)
    if step is not None:
        if step not in steps:
            raise CheckpointError(f"no checkpoint of step {step} in {directory}; steps: "
                                  f"{sorted(steps)}")
        steps = [step]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    errors = []
    for candidate in steps:
        try:
            config = manager.restore(candidate, args=ocp.args.Composite(
                config=ocp.args.JsonRestore()))["config"]
            model_config = from_dict(ModelConfig, config["model"], "model")
            abstract = nnx.eval_shape(lambda: HybridLM(model_config, rngs=nnx.Rngs(0)))
            graphdef, abstract_params = nnx.split(abstract, nnx.Param)
            target = jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                nnx.to_pure_dict(abstract_params))
            params = manager.restore(candidate, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target)))["params"]
        except Exception as err:  # noqa: BLE001 — fall back to an older checkpoint
            errors.append(f"step {candidate}: {_describe(err)}")
            continue
        manager.close()
        if errors:
            warnings.warn(f"using checkpoint step {candidate} of {directory}; newer ones could "
                          f"not be restored: {'; '.join(errors)}")
        return model_config, nnx.merge(graphdef, params)
    manager.close()
    raise CheckpointError(f"no checkpoint in {directory} could be restored"
                          + (": " + "; ".join(errors) if errors else " (none saved yet)"))
