"""The state-tracking experiment as data: task, training, and one ``ModelConfig`` per model.

YAML layout (``configs/state_tracking/s5.yaml``)::

    task: {group: S5, train_length: 64, eval_lengths: [64, 128, ...], ...}
    train: {steps: 2000, batch_size: 256, learning_rate: 3.0e-3, seeds: 3, ...}
    base_model: {d_model: 128, mlp: {hidden_dim: 256}, ...}     # shared by every model
    models:                                                       # name -> changes to the base
      m2rnn: {layer_pattern: MM, m2rnn: {num_heads: 8, ...}}
      attention: {layer_pattern: AA, attention: {num_heads: 4}}
    run: [m2rnn, attention]                                       # which models to train

``models.<name>`` is merged key by key into ``base_model`` and the result is a
``m2rnn_jax.config.ModelConfig``; its ``vocab_size`` is set to the group's order (element
tokens in, logits over elements out), so neither section may set it.
"""

import copy
import dataclasses
from typing import Literal

from m2rnn_jax.config import ModelConfig
from m2rnn_jax.typed_config import ConfigError, from_dict


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    group: str = "S5"  # S<n>, A<n>, Z<n>, D<n>; or a custom group from `generators`
    generators: list[list[int]] | None = None  # permutations (lists of images); overrides group
    train_length: int = 64
    length_sampling: Literal["fixed", "uniform"] = "fixed"
    eval_lengths: list[int] = dataclasses.field(default_factory=lambda: [64, 128, 256, 512, 1024])
    eval_sequences: int = 512  # per eval length, the same words for every model and seed
    eval_batch_size: int = 128
    eval_seed: int = 1234
    # Length curriculum: over the first `curriculum_steps` training steps the scored length
    # grows geometrically from `curriculum_start_length` to `train_length` (later positions are
    # masked out of the loss). 0 = off.
    curriculum_steps: int = 0
    curriculum_start_length: int = 4
    # Accuracy-gated curriculum instead (when set): start at `curriculum_start_length` and
    # double the scored length whenever the training accuracy, read every `train.log_every`
    # steps, reaches this value. Excludes `curriculum_steps`.
    curriculum_accuracy: float | None = None

    def __post_init__(self):
        for name in ("train_length", "eval_sequences", "eval_batch_size",
                     "curriculum_start_length"):
            _positive(getattr(self, name), f"task.{name}")
        if self.curriculum_steps < 0:
            raise ConfigError(f"task.curriculum_steps must be >= 0, got {self.curriculum_steps}")
        if self.curriculum_accuracy is not None:
            if not 0 < self.curriculum_accuracy <= 1:
                raise ConfigError(f"task.curriculum_accuracy must be in (0, 1], got "
                                  f"{self.curriculum_accuracy}")
            if self.curriculum_steps:
                raise ConfigError("task.curriculum_accuracy and task.curriculum_steps are two "
                                  "curricula: set one of them")
        curriculum = self.curriculum_steps or self.curriculum_accuracy is not None
        if curriculum and self.curriculum_start_length > self.train_length:
            raise ConfigError(f"task.curriculum_start_length ({self.curriculum_start_length}) "
                              f"must not exceed task.train_length ({self.train_length})")
        if not self.eval_lengths:
            raise ConfigError("task.eval_lengths must list at least one length")
        for length in self.eval_lengths:
            _positive(length, "task.eval_lengths[]")


LABEL_SMOOTHING_FROM = ("start", "train_length")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 2000
    batch_size: int = 256
    learning_rate: float = 3e-3
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decay ends at learning_rate * min_lr_ratio
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.99
    # AdamW's ε (optax's default). At a training loss near 0 the gradients shrink far below
    # 1e-8 relative to their running RMS and Adam still takes steps of about the learning rate
    # in their direction; a larger ε makes the last phase's steps proportional to the gradient
    # (SGD-like with rate learning_rate / ε) instead. May change when a run continues.
    adam_eps: float = 1e-8
    # Words per step = batch_size × batch_scale. Unlike batch_size (part of what a run is) the
    # scale may change when a run continues: at the S5 plateau the mean of Adam's gradient
    # estimate is ~1 % of its RMS (RESULTS.md, ninth session), so the steps are mostly
    # minibatch noise, and a larger batch is the other way besides a lower rate to quiet them.
    batch_scale: int = 1
    # Label smoothing α of the training loss (0 = plain cross-entropy). At the S5 plateau the
    # per-token loss at the training length is ~3e-8 (logit margins ~31): the objective no
    # longer responds to a state that is slightly off. With α its minimum has finite margins,
    # so it keeps asking for exact states. May change when a run continues.
    label_smoothing: float = 0.0
    # When label smoothing applies: "start" (every step) or "train_length" (once the scored
    # length reaches the training length, as the length decay: where it was measured on S5;
    # from a fresh start on S3 it learnt a little slower). May change when a run continues.
    label_smoothing_from: str = "start"
    clip_grad_norm: float | None = 1.0
    # Std of N(0, 1) noise added to every M²RNN state entry after every training step (0 =
    # off; evaluation is always noise-free). Meant to make the state's code of the group
    # elements an attractor, so that errors do not accumulate past the training length.
    state_noise_std: float = 0.0
    # Once the scored length reaches the training length (the curriculum's end; step 0 without
    # a curriculum) the learning rate is multiplied by a factor that falls geometrically from 1
    # to `length_decay_ratio` over `length_decay_steps` steps, then stays there (0 = off). The rate that gets a model through the curriculum is too high to make its code
    # exact beyond the training length (RESULTS, state tracking, fifth session); the step at
    # which the curriculum ends differs from seed to seed, hence a decay tied to it.
    length_decay_steps: int = 0
    length_decay_ratio: float = 0.01
    seeds: int = 3  # seeds first_seed .. first_seed+seeds-1 per model (init and training words)
    first_seed: int = 0  # lets parallel processes each take other seeds of one experiment
    # Seeds of a model trained together, as one step vmapped over them (ModelRunner.run_seeds).
    # Each seed's run is the same as alone, up to rounding. On an H200 it pays only at short
    # lengths (3 seeds: 1.41x the seed-steps/s at length 4, 1.04x at 64; RESULTS.md).
    seeds_per_step: int = 1
    time_budget_s: float | None = None  # wall-clock for all runs; split evenly, stops early
    log_every: int = 50  # steps between progress-bar updates of loss/accuracy
    # Seconds between saves of a run's state to out_dir/checkpoints/ (and one when it stops);
    # a rerun of the same command resumes from there. null = no checkpoints.
    checkpoint_every_s: float | None = 60.0

    def __post_init__(self):
        for name in ("steps", "batch_size", "batch_scale", "seeds", "seeds_per_step",
                     "log_every"):
            _positive(getattr(self, name), f"train.{name}")
        if not self.learning_rate > 0:
            raise ConfigError(f"train.learning_rate must be > 0, got {self.learning_rate}")
        if not (isinstance(self.label_smoothing, (int, float))
                and 0 <= self.label_smoothing < 1):
            raise ConfigError(f"train.label_smoothing must be in [0, 1), got "
                              f"{self.label_smoothing!r}")
        if self.label_smoothing_from not in LABEL_SMOOTHING_FROM:
            raise ConfigError(f"train.label_smoothing_from must be one of "
                              f"{LABEL_SMOOTHING_FROM}, got {self.label_smoothing_from!r}")
        if not (isinstance(self.adam_eps, (int, float)) and self.adam_eps > 0):
            raise ConfigError(f"train.adam_eps must be a number > 0, got {self.adam_eps!r}")
        if self.first_seed < 0:
            raise ConfigError(f"train.first_seed must be >= 0, got {self.first_seed}")
        if not (isinstance(self.state_noise_std, (int, float)) and self.state_noise_std >= 0):
            raise ConfigError(f"train.state_noise_std must be a number >= 0, got "
                              f"{self.state_noise_std!r}")
        if not isinstance(self.length_decay_steps, int) or self.length_decay_steps < 0:
            raise ConfigError(f"train.length_decay_steps must be an integer >= 0, got "
                              f"{self.length_decay_steps!r}")
        if not (isinstance(self.length_decay_ratio, (int, float))
                and 0 < self.length_decay_ratio <= 1):
            raise ConfigError(f"train.length_decay_ratio must be in (0, 1], got "
                              f"{self.length_decay_ratio!r}")
        if self.warmup_steps < 0:
            raise ConfigError(f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.checkpoint_every_s is not None and not self.checkpoint_every_s >= 0:
            raise ConfigError(f"train.checkpoint_every_s must be null or >= 0, got "
                              f"{self.checkpoint_every_s}")
        if self.time_budget_s is not None and not self.time_budget_s > 0:
            raise ConfigError(f"train.time_budget_s must be null or > 0, got "
                              f"{self.time_budget_s}")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    base_model: dict = dataclasses.field(default_factory=dict)
    models: dict = dataclasses.field(default_factory=dict)
    run: list[str] = dataclasses.field(default_factory=list)  # empty = every model in `models`
    out_dir: str = "runs/state_tracking"

    def __post_init__(self):
        for name in self.run:
            if name not in self.models:
                raise ConfigError(f"run lists model {name!r}, which models does not define "
                                  f"(defined: {', '.join(sorted(self.models))})")
        for name in self.models:
            self.model_config(name, vocab_size=2)  # fail at load time, naming the model

    @property
    def model_names(self) -> list[str]:
        return list(self.run) if self.run else list(self.models)

    def model_config(self, name: str, vocab_size: int) -> ModelConfig:
        """``base_model`` updated by ``models[name]``, as a ``ModelConfig`` with ``vocab_size``."""
        if name not in self.models:
            raise ConfigError(f"unknown model {name!r}; defined: {', '.join(sorted(self.models))}")
        changes = self.models[name] or {}
        for where, section in (("base_model", self.base_model), (f"models.{name}", changes)):
            if not isinstance(section, dict):
                raise ConfigError(f"{where} must be a mapping, got {type(section).__name__}")
            if "vocab_size" in section:
                raise ConfigError(f"{where}.vocab_size is set by the group's order; remove it")
        data = merge(self.base_model, changes)
        data["vocab_size"] = vocab_size
        return from_dict(ModelConfig, data, path=f"models.{name}")


def merge(base: dict, changes: dict) -> dict:
    """``base`` with ``changes`` applied key by key (nested mappings merge recursively)."""
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _positive(value, key):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{key} must be a positive integer, got {value!r}")
