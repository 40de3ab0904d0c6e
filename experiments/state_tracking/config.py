"""The state-tracking experiment as data: task, training, and one ``ModelConfig`` per model.

YAML layout (``experiments/state_tracking/configs/s5.yaml``)::

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

import dataclasses
from typing import Literal

from m2rnn_jax.config import ModelConfig
from m2rnn_jax.typed_config import (ConfigError, from_dict, merge_dicts, require,
                                    require_positive, require_positive_int)
from train.config import OptimizerConfig


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
            require_positive_int(getattr(self, name), f"task.{name}")
        require(self.curriculum_steps >= 0, "task.curriculum_steps",
                f"must be >= 0, got {self.curriculum_steps}")
        if self.curriculum_accuracy is not None:
            require(0 < self.curriculum_accuracy <= 1, "task.curriculum_accuracy",
                    f"must be in (0, 1], got {self.curriculum_accuracy}")
            require(not self.curriculum_steps, "task.curriculum_accuracy",
                    "and task.curriculum_steps are two curricula: set one of them")
        curriculum = self.curriculum_steps or self.curriculum_accuracy is not None
        if curriculum:
            require(self.curriculum_start_length <= self.train_length,
                    "task.curriculum_start_length", f"({self.curriculum_start_length}) must not "
                    f"exceed task.train_length ({self.train_length})")
        require(bool(self.eval_lengths), "task.eval_lengths", "must list at least one length")
        for length in self.eval_lengths:
            require_positive_int(length, "task.eval_lengths[]")


LABEL_SMOOTHING_FROM = ("start", "train_length")
WORD_GENERATORS = ("auto", "numpy", "device")


@dataclasses.dataclass(frozen=True)
class StateTrackingTrainConfig:
    """How each (model, seed) run trains: AdamW with warmup and cosine (``train.optimizer``),
    the length decay and label smoothing of this experiment, seeds, budget and checkpoints."""

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
    # scale may change when a run continues: where the mean of Adam's gradient estimate is
    # small against its RMS the steps are mostly minibatch noise, and a larger batch is the
    # other way besides a lower rate to quiet them.
    batch_scale: int = 1
    # Label smoothing α of the training loss (0 = plain cross-entropy). Once every answer at
    # the training length is right, plain cross-entropy drives the logit margins up until the
    # loss reaches float32's floor, where a slightly inexact state costs nothing; with α the
    # minimum has finite margins, so the loss keeps asking for exact states. May change when a
    # run continues.
    label_smoothing: float = 0.0
    # When label smoothing applies: "start" (every step) or "train_length" (once the scored
    # length reaches the training length, as the length decay; on S3 from step 0 it learnt a
    # little slower). May change when a run continues.
    label_smoothing_from: str = "start"
    clip_grad_norm: float | None = 1.0
    # Once the scored length reaches the training length (the curriculum's end; step 0 without
    # a curriculum) the learning rate is multiplied by a factor that falls geometrically from 1
    # to `length_decay_ratio` over `length_decay_steps` steps, then stays there (0 = off). The
    # rate that gets a model through the curriculum is too high to make its code exact beyond
    # the training length; the step at which the curriculum ends differs from seed to seed,
    # hence a decay tied to it.
    length_decay_steps: int = 0
    length_decay_ratio: float = 0.01
    seeds: int = 3  # seeds first_seed .. first_seed+seeds-1 per model (init and training words)
    first_seed: int = 0  # lets parallel processes each take other seeds of one experiment
    # Seeds of a model trained together, as one step vmapped over them (ModelRunner.run_seeds).
    # Each seed's run is the same as alone, up to rounding. On an H200 it pays only at short
    # lengths (3 seeds: 1.41x the seed-steps/s at length 4, 1.04x at 64).
    seeds_per_step: int = 1
    # Optimizer steps per jitted call: N > 1 runs N steps in one `lax.scan` with the words drawn
    # on the device (`word_generator`), so the host dispatches and reads back once per N steps.
    # Logging, the gated curriculum, checkpoints and the time budget act between calls.
    steps_per_dispatch: int = 1
    # Where the training words are drawn: "numpy" (on the host, a NumPy generator per seed),
    # "device" (`jax.random` from (seed, step): the same words for every steps_per_dispatch, a
    # different stream from NumPy's) or "auto" (numpy at steps_per_dispatch 1, else device).
    word_generator: Literal["auto", "numpy", "device"] = "auto"
    time_budget_s: float | None = None  # wall-clock for all runs; split evenly, stops early
    log_every: int = 50  # steps between progress-bar updates of loss/accuracy
    # Seconds between saves of a run's state to out_dir/checkpoints/ (and one when it stops);
    # a rerun of the same command resumes from there. null = no checkpoints.
    checkpoint_every_s: float | None = 60.0
    # After the call that reaches or passes each multiple of this many steps, once the scored
    # length is the training length, a run is evaluated on held-out words (task.eval_seed + 1,
    # every evaluation length and count) and stops, done, when it is exact on all of them: its
    # trajectory is unchanged, only its end comes sooner (its checkpoint records the stop). Not
    # the reported evaluation's words, which would then choose the stopping step. null = off.
    stop_when_exact_every: int | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size", "batch_scale", "seeds", "seeds_per_step",
                     "steps_per_dispatch", "log_every"):
            require_positive_int(getattr(self, name), f"train.{name}")
        for name in ("learning_rate", "adam_eps"):
            require_positive(getattr(self, name), f"train.{name}")
        for name in ("b1", "b2"):
            require(0 <= getattr(self, name) < 1, f"train.{name}",
                    f"must be in [0, 1), got {getattr(self, name)!r}")
        require(0 <= self.min_lr_ratio <= 1, "train.min_lr_ratio",
                f"must be in [0, 1], got {self.min_lr_ratio!r}")
        require(self.weight_decay >= 0, "train.weight_decay",
                f"must be >= 0, got {self.weight_decay!r}")
        if self.clip_grad_norm is not None:
            require_positive(self.clip_grad_norm, "train.clip_grad_norm")
        require(isinstance(self.label_smoothing, (int, float))
                and 0 <= self.label_smoothing < 1, "train.label_smoothing",
                f"must be in [0, 1), got {self.label_smoothing!r}")
        require(self.label_smoothing_from in LABEL_SMOOTHING_FROM, "train.label_smoothing_from",
                f"must be one of {LABEL_SMOOTHING_FROM}, got {self.label_smoothing_from!r}")
        require(self.first_seed >= 0, "train.first_seed",
                f"must be >= 0, got {self.first_seed}")
        require(isinstance(self.length_decay_steps, int) and self.length_decay_steps >= 0,
                "train.length_decay_steps",
                f"must be an integer >= 0, got {self.length_decay_steps!r}")
        require(isinstance(self.length_decay_ratio, (int, float))
                and 0 < self.length_decay_ratio <= 1, "train.length_decay_ratio",
                f"must be in (0, 1], got {self.length_decay_ratio!r}")
        require(self.warmup_steps >= 0, "train.warmup_steps",
                f"must be >= 0, got {self.warmup_steps}")
        require(self.checkpoint_every_s is None or self.checkpoint_every_s >= 0,
                "train.checkpoint_every_s",
                f"must be null or >= 0, got {self.checkpoint_every_s}")
        if self.time_budget_s is not None:
            require_positive(self.time_budget_s, "train.time_budget_s")
        if self.stop_when_exact_every is not None:
            require_positive_int(self.stop_when_exact_every, "train.stop_when_exact_every")
        require(self.word_generator in WORD_GENERATORS, "train.word_generator",
                f"must be one of {WORD_GENERATORS}, got {self.word_generator!r}")
        require(self.word_generator != "numpy" or self.steps_per_dispatch == 1,
                "train.word_generator", f"'numpy' draws words on the host, one step per call; "
                f"train.steps_per_dispatch {self.steps_per_dispatch} needs 'device' or 'auto'")

    @property
    def device_words(self) -> bool:
        """Whether the training words are drawn on the device (``word_generator``)."""
        return self.word_generator == "device" or (
            self.word_generator == "auto" and self.steps_per_dispatch > 1)

    def optimizer_config(self) -> OptimizerConfig:
        """The AdamW settings as ``train.optimizer.make_optimizer`` reads them (the cosine runs
        over ``steps``)."""
        return OptimizerConfig(
            learning_rate=self.learning_rate, b1=self.b1, b2=self.b2, eps=self.adam_eps,
            weight_decay=self.weight_decay, warmup_steps=self.warmup_steps,
            min_lr_ratio=self.min_lr_ratio, schedule_steps=None,
            clip_grad_norm=self.clip_grad_norm)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    train: StateTrackingTrainConfig = dataclasses.field(
        default_factory=StateTrackingTrainConfig)
    base_model: dict = dataclasses.field(default_factory=dict)
    models: dict = dataclasses.field(default_factory=dict)
    run: list[str] = dataclasses.field(default_factory=list)  # empty = every model in `models`
    out_dir: str = "runs/state_tracking"
    compile_cache: str = "auto"  # JAX's persistent compilation cache: a folder, "auto" or "off"

    def __post_init__(self):
        require(isinstance(self.compile_cache, str) and self.compile_cache.strip(),
                "compile_cache", f"must be a folder, 'auto' or 'off', got {self.compile_cache!r}")
        for name in self.run:
            require(name in self.models, "run", f"lists model {name!r}, which models does not "
                    f"define (defined: {', '.join(sorted(self.models))})")
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
            require(isinstance(section, dict), where,
                    f"must be a mapping, got {type(section).__name__}")
            require("vocab_size" not in section, f"{where}.vocab_size",
                    "is set by the group's order; remove it")
        data = merge_dicts(self.base_model, changes)
        data["vocab_size"] = vocab_size
        return from_dict(ModelConfig, data, path=f"models.{name}")


