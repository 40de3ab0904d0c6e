"""Checkpoints of a run (Orbax ``CheckpointManager``) under ``<out>/checkpoints/<step>/``.

Each step holds four items: ``params`` (the model's parameters, pure dict), ``train_state``
(optimizer state, step counter, RNG), ``data`` (the training iterator's position and a corpus
fingerprint) and ``config`` (the whole ``TrainConfig`` as JSON), so a run resumes exactly and
the generation CLI can rebuild the model from the directory alone
(:func:`restore_for_inference`); and a ``SHA256SUMS`` file, the checksums of its files
(``train/checksums.py``), checked before anything is restored.

Restoring takes the newest checkpoint that verifies and restores. Newer ones that do not (a
damaged or partly written file) are reported and moved to ``<out>/damaged_checkpoints/`` once
an older one has restored; when none restores, ``CheckpointError`` names the folder and
nothing is moved. Checkpoints written before they carried checksums restore unverified, with a
warning. Nothing is written under ``<out>`` before the first save.
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
from train import checksums
from train.errors import RunFailure

CHECKPOINT_DIR = "checkpoints"
DAMAGED_DIR = "damaged_checkpoints"
ITEMS = ("params", "train_state", "data", "config")
INFERENCE_ITEMS = ("params", "config")


@dataclasses.dataclass
class Restored:
    step: int
    state: dict  # {"params", "opt_state", "step", "rng"}
    data: dict  # {"iterator": grain iterator state, "corpus_fingerprint": int}
    config: dict  # TrainConfig as plain data


class CheckpointError(RunFailure, RuntimeError):
    """No checkpoint in a directory can be restored."""


class Checkpointer:
    """Saves and restores training checkpoints in ``<out_dir>/checkpoints``."""

    def __init__(self, out_dir, *, keep=3, async_save=True, log=print):
        self.out_dir = pathlib.Path(out_dir).absolute()
        self.directory = self.out_dir / CHECKPOINT_DIR
        self._log = log
        self._keep = keep
        self._async_save = async_save
        self._saving_step = None
        self._problems = {}  # step -> why it cannot be restored (None: verified or unverifiable)
        self._manager = self._open_manager() if self.directory.is_dir() else None

    def _open_manager(self):
        # Saves always go through Orbax's background saver, whose finalization hook writes the
        # checksums before the step folder takes its final name; a synchronous save waits.
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self._keep, create=True, enable_async_checkpointing=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums))
        return ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

    def steps(self) -> list:
        return sorted(self._manager.all_steps()) if self._manager is not None else []

    def save(self, step: int, state: dict, data: dict, config: dict) -> bool:
        """Starts saving ``state`` at ``step`` (in the background when async); False when a
        checkpoint of that step already exists."""
        if self._manager is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            self._manager = self._open_manager()
        if step in self._manager.all_steps():
            return False
        self._manager.wait_until_finished()  # one save at a time: the hook knows its step
        self._saving_step = step
        train_state = {key: state[key] for key in ("opt_state", "step", "rng")}
        self._manager.save(step, args=ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            train_state=ocp.args.StandardSave(train_state),
            data=ocp.args.JsonSave(data),
            config=ocp.args.JsonSave(config)))
        if not self._async_save:
            self._manager.wait_until_finished()
        return True

    def _write_checksums(self):
        """Orbax's post-finalization hook (on its saving thread): the step's files are all
        written; its folder still has Orbax's temporary name, unless the storage commits in
        place."""
        if jax.process_index() != 0:
            return
        final = self.directory / str(self._saving_step)
        unfinished = [p for p in self.directory.glob(f"{self._saving_step}.*") if p.is_dir()]
        checksums.write_manifest(unfinished[0] if unfinished else final)

    def saved_config(self) -> dict | None:
        """The config of the newest checkpoint that verifies and whose config reads; ``None``
        when there are no checkpoints, ``CheckpointError`` when none is usable."""
        steps = self.steps()
        problems = {}
        for step in reversed(steps):
            problem = self._verify(step)
            if problem is None:
                try:
                    return dict(self._manager.restore(step, args=ocp.args.Composite(
                        config=ocp.args.JsonRestore()))["config"])
                except Exception as err:  # noqa: BLE001 — any failure means "not usable"
                    problem = _describe(err)
            problems[step] = problem
        if steps:
            raise self._nothing_restorable(problems)
        return None

    def restore_latest(self, abstract_state) -> Restored | None:
        """The newest checkpoint that verifies and restores (``None``: there are none). Newer
        ones that do not are reported and moved aside to ``<out>/damaged_checkpoints``; when
        none restores, ``CheckpointError`` and nothing is moved."""
        steps = self.steps()
        abstract_train_state = {key: abstract_state[key] for key in ("opt_state", "step", "rng")}
        failed = {}
        for step in reversed(steps):
            problem = self._verify(step)
            if problem is None:
                try:
                    items = self._manager.restore(step, args=ocp.args.Composite(
                        params=ocp.args.StandardRestore(abstract_state["params"]),
                        train_state=ocp.args.StandardRestore(abstract_train_state),
                        data=ocp.args.JsonRestore(),
                        config=ocp.args.JsonRestore()))
                except Exception as err:  # noqa: BLE001 — any failure means "not usable"
                    problem = _describe(err)
                else:
                    for bad_step, reason in failed.items():
                        self._set_aside(bad_step, reason, step)
                    state = {"params": items["params"], **items["train_state"]}
                    return Restored(step, state, dict(items["data"]), dict(items["config"]))
            failed[step] = problem
        if steps:
            raise self._nothing_restorable(failed)
        return None

    def _verify(self, step):
        """Why ``step`` cannot be restored according to its checksums (``None``: it verifies,
        or it predates them — said once)."""
        if step not in self._problems:
            step_dir = self.directory / str(step)
            try:
                verified = checksums.verify(step_dir)
            except checksums.ChecksumError as err:
                self._problems[step] = str(err)
            else:
                self._problems[step] = None
                if not verified:
                    self._log(f"WARNING: checkpoint {step_dir} has no {checksums.MANIFEST} "
                              f"(written before checkpoints carried checksums); restoring it "
                              f"unverified")
        return self._problems[step]

    def _nothing_restorable(self, problems) -> CheckpointError:
        reasons = "; ".join(f"step {step}: {why}" for step, why in problems.items())
        return CheckpointError(
            f"no checkpoint in {self.directory} can be restored ({reasons}). Nothing there was "
            f"changed. To start over, run again with --restart (it moves the old checkpoints "
            f"and metrics aside, under {self.out_dir}/old_runs/) or use another --out")

    def _set_aside(self, step, reason, good_step):
        target = self.out_dir / DAMAGED_DIR / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        self._log(f"WARNING: checkpoint {self.directory / str(step)} cannot be restored "
                  f"({reason}); moved it to {target} and using the previous one, step "
                  f"{good_step}")
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(self.directory / str(step)), str(target))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"set aside checkpoint {step}")
        self._problems.pop(step, None)
        self._manager.reload()

    def wait(self):
        """Blocks until background saves are on disk."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self):
        if self._manager is not None:
            self._manager.close()


def _describe(err) -> str:
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first_line[:300]}"


def restore_for_inference(out_dir, *, step=None):
    """``(ModelConfig, HybridLM)`` from the newest readable checkpoint of a training run.

    ``out_dir`` is the ``--out`` folder of ``m2rnn-train``. Parameters land on the default
    device, unsharded. ``step`` picks a checkpoint (default: the newest that verifies and
    restores). Raises ``CheckpointError`` when there is none.
    """
    directory = pathlib.Path(out_dir).absolute() / CHECKPOINT_DIR
    if not directory.is_dir():
        raise CheckpointError(f"no checkpoints in {out_dir}: {directory} does not exist "
                              f"(is {out_dir} the --out folder of m2rnn-train?)")
    # (Nothing is saved through it; read_only=True would only add a warning to every run.)
    manager = ocp.CheckpointManager(directory, item_names=ITEMS,
                                    options=ocp.CheckpointManagerOptions(create=False))
    steps = sorted(manager.all_steps(), reverse=True)
    if step is not None:
        if step not in steps:
            manager.close()
            raise CheckpointError(f"no checkpoint of step {step} in {directory}; steps: "
                                  f"{sorted(steps) or 'none'}")
        steps = [step]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    errors = []
    for candidate in steps:
        try:
            if not checksums.verify(directory / str(candidate), items=INFERENCE_ITEMS):
                warnings.warn(f"checkpoint {directory / str(candidate)} has no "
                              f"{checksums.MANIFEST}; restoring it unverified")
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
    raise CheckpointError(f"no checkpoint in {directory} can be restored"
                          + (": " + "; ".join(errors) if errors else " (none saved yet)"))
