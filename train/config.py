"""``TrainConfig``: the model's ``ModelConfig`` plus optimizer, data, mesh, checkpoint and logging.

Load with ``load_train_config(path, overrides)``; every key is type-checked by
``m2rnn_jax.typed_config`` and every value range here, so a bad value fails before any work
with an error naming its dotted key (``optimizer.learning_rate must be > 0, got -1.0``). A
config file must describe the model (a ``model`` section): the defaults alone are a
410M-parameter model, never what an empty file meant.

``on_nonfinite`` says what a step whose loss or gradient norm is not finite (NaN or inf) does.
Every step checks on the device, without waiting for the host; the host reads the result when
it logs, evaluates or saves, and never saves a state that is not finite. ``stop`` (default) ends
the run with an error naming the first such step; the checkpoints on disk are the last good
state. ``skip`` leaves the parameters, the optimizer state and the learning-rate schedule as
they were for that step (also when its update would make them non-finite), goes on, and
counts the skipped steps in ``metrics.jsonl`` (``skipped_steps``). A resumed run may change it.
"""

import dataclasses
import pathlib
from typing import Literal

from m2rnn_jax.config import ModelConfig
from m2rnn_jax.layers.registry import mixer_class
from m2rnn_jax.typed_config import (ConfigError, from_dict, override, read_yaml, require,
                                    require_positive, require_positive_int, to_dict)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """AdamW with linear warmup, cosine decay and global-norm gradient clipping."""

    learning_rate: float = 3e-4
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-10
    weight_decay: float = 0.1  # not applied to norms, biases, A_log, dt_bias, D
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # the cosine ends at learning_rate · min_lr_ratio
    schedule_steps: int | None = None  # length of warmup + cosine; None = train steps
    clip_grad_norm: float | None = 1.0  # None: no clipping
    grad_accum_steps: int = 1  # micro-batches per optimizer step (data.batch_size is the total)

    def __post_init__(self):
        require_positive(self.learning_rate, "optimizer.learning_rate")
        for key in ("b1", "b2"):
            require(0 <= getattr(self, key) < 1, f"optimizer.{key}",
                    f"must lie in [0, 1), got {getattr(self, key)!r}")
        require(self.eps >= 0, "optimizer.eps", f"must be >= 0, got {self.eps!r}")
        require(self.weight_decay >= 0, "optimizer.weight_decay",
                f"must be >= 0, got {self.weight_decay!r}")
        require(self.warmup_steps >= 0, "optimizer.warmup_steps",
                f"must be >= 0, got {self.warmup_steps!r}")
        require(0 <= self.min_lr_ratio <= 1, "optimizer.min_lr_ratio",
                f"must lie in [0, 1], got {self.min_lr_ratio!r}")
        if self.schedule_steps is not None:
            require_positive_int(self.schedule_steps, "optimizer.schedule_steps")
        if self.clip_grad_norm is not None:
            require_positive(self.clip_grad_norm, "optimizer.clip_grad_norm")
        require_positive_int(self.grad_accum_steps, "optimizer.grad_accum_steps")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where tokens come from and how they are packed (see ``train/data.py``)."""

    source: Literal["stdlib", "text", "tokens"] = "stdlib"
    paths: tuple[str, ...] = ()  # files/folders for source text or tokens
    validation_paths: tuple[str, ...] = ()  # explicit validation files; else split by file
    validation_fraction: float = 0.02  # every round(1/fraction)-th file is held out
    seq_len: int = 256
    batch_size: int = 16  # rows per optimizer step, over all devices and micro-batches
    seed: int = 0  # document order and row shuffling
    eval_rows: int = 128  # validation rows per evaluation (spread over the split); 0 = all

    def __post_init__(self):
        require(0 < self.validation_fraction < 1, "data.validation_fraction",
                f"must lie in (0, 1), got {self.validation_fraction!r}")
        require_positive_int(self.seq_len, "data.seq_len")
        require_positive_int(self.batch_size, "data.batch_size")
        require(self.seed >= 0, "data.seed", f"must be >= 0, got {self.seed!r}")
        require(self.eval_rows >= 0, "data.eval_rows", f"must be >= 0, got {self.eval_rows!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)  # by name: axes were added before `tensor`
class MeshConfig:
    """Device mesh axis sizes; one may be -1 to take the remaining devices (``train/sharding.py``
    says what each axis splits)."""

    data: int = -1
    fsdp: int = 1
    expert: int = 1
    context: int = 1
    tensor: int = 1
    # Micro-batches of the M²RNN recurrence's pipeline over the context shards: shard c works
    # on micro-batch t - c at tick t, so (context - 1) / (microbatches + context - 1) of the
    # ticks are idle. More micro-batches idle less but run the kernel on fewer rows at a time.
    context_microbatches: int = 4

    def __post_init__(self):
        require_positive_int(self.context_microbatches, "mesh.context_microbatches")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = 200  # periodic saves (and always a final one); 0 = final only
    keep: int = 3  # most recent checkpoints kept
    async_save: bool = True  # write in the background while training continues

    def __post_init__(self):
        require(self.every_steps >= 0, "checkpoint.every_steps",
                f"must be >= 0, got {self.every_steps!r}")
        require_positive_int(self.keep, "checkpoint.keep")


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    eval_every: int = 100  # validation loss / bits-per-byte every N steps (and at the end)
    log_every: int = 10  # training metrics to metrics.jsonl every N steps
    progress_bar: bool = True
    plot: bool = True  # loss curves PNG at the end

    def __post_init__(self):
        require(self.eval_every >= 0, "logging.eval_every",
                f"must be >= 0, got {self.eval_every!r}")
        require_positive_int(self.log_every, "logging.log_every")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    steps: int = 1000  # total optimizer steps to reach (a resumed run continues to it)
    seed: int = 0  # parameter init and the training RNG
    remat: bool = False  # recompute block activations in the backward pass (saves memory)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    on_nonfinite: Literal["stop", "skip"] = "stop"  # a step with a NaN/inf loss or gradient
    # JAX's persistent compilation cache: a folder, "auto" or "off" (train/compile_cache.py);
    # the command's --compile-cache flag wins over it.
    compile_cache: str = "auto"

    def __post_init__(self):
        require_positive_int(self.steps, "steps")
        require(self.seed >= 0, "seed", f"must be >= 0, got {self.seed!r}")
        require(isinstance(self.compile_cache, str) and self.compile_cache.strip(),
                "compile_cache", f"must be a folder, 'auto' or 'off', got {self.compile_cache!r}")
        require(self.data.batch_size % self.optimizer.grad_accum_steps == 0, "data.batch_size",
                f"= {self.data.batch_size} must be divisible by optimizer.grad_accum_steps = "
                f"{self.optimizer.grad_accum_steps}")

    @property
    def micro_batch_size(self) -> int:
        return self.data.batch_size // self.optimizer.grad_accum_steps


def train_config_from_dict(data) -> TrainConfig:
    return from_dict(TrainConfig, data)


def load_train_config(path, overrides=()) -> TrainConfig:
    """Reads a YAML file and applies ``key=value`` overrides (dotted keys, YAML values).

    The ``model`` section may be the path of a model file (a ``ModelConfig`` YAML such as
    ``configs/model/hybrid_400m.yaml``), relative to the config file's folder; its keys are then
    read from there, so one model file serves every training config of that model.
    """
    data = read_yaml(path)
    if isinstance(data, dict) and isinstance(data.get("model"), str):
        model_path = pathlib.Path(path).parent / data["model"]
        try:
            data = dict(data, model=read_yaml(model_path))
        except ConfigError as err:
            raise ConfigError(f"model = {data['model']!r} in {path}: {err}") from None
    config = from_dict(TrainConfig, data)
    if not data:
        raise ConfigError(f"config file {path} is empty: it must at least describe the model "
                          f"to train in a 'model' section (see configs/tiny.yaml)")
    if "model" not in data:
        raise ConfigError(f"config file {path} does not describe the model to train: add a "
                          f"'model' section (see configs/tiny.yaml)")
    return override(config, list(overrides)) if overrides else config


def require_registered_mixers(model_config: ModelConfig, key="model.layer_pattern"):
    """``ConfigError`` naming ``key`` unless every letter of the layer pattern has a mixer
    (checked when the model is about to be built: other modules may register letters)."""
    for letter in dict.fromkeys(model_config.layer_pattern):
        try:
            mixer_class(letter)
        except ValueError as err:
            raise ConfigError(f"{key} {model_config.layer_pattern!r}: {err}") from err


def train_config_to_dict(config: TrainConfig) -> dict:
    """Plain data (lists for tuples) that ``train_config_from_dict`` reads back."""
    return _plain(to_dict(config))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
