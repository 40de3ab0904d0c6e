"""The comparison as data: one ``TrainConfig`` shared by every run, the model families, seeds,
equal-size matching, the corpus and the long-context evaluation.

YAML layout (``experiments/lm_comparison/configs/small.yaml``)::

    train:            # a TrainConfig (train/config.py); its model is what the families share
      steps: 300
      model: {vocab_size: 256, d_model: 448, m2rnn: {...}, gated_deltanet: {...}, ...}
      optimizer: {...}
      data: {seq_len: 512, batch_size: 64, ...}    # the corpus fills in source and paths
    families:         # name -> label, changes to train.model, the width matched
      m2rnn: {label: M²RNN hybrid, model: {layer_pattern: MMMMAMMMMMMMAMMM}}
      gdn: {label: ..., model: {layer_pattern: DDDD...}, match: mlp.hidden_dim}
    run: [m2rnn, gdn, ...]       # which families (empty = all)
    seeds: 2                     # seeds first_seed .. first_seed + seeds - 1 of each family
    matching: {reference: m2rnn, tolerance: 0.03}
    compare: [[m2rnn, gdn]]      # differences the summary prints (a minus b)
    corpus: {packages: [...], validation_fraction: 0.05, sha256: ...}
    long_context: {length_factor: 8, documents: 64}

Seed ``s`` of every family trains with ``seed = train.seed + s`` (initialisation) and
``data.seed = train.data.seed + s`` (document order): the families of one seed see the same
data in the same order.
"""

import dataclasses
import hashlib
import json
import os

from m2rnn_experiments.lm_comparison import sizing
from m2rnn_experiments.lm_comparison.manifest import MANIFEST
from m2rnn_jax.config import ModelConfig
from m2rnn_jax.typed_config import (ConfigError, from_dict, merge_dicts, require,
                                    require_positive_int, to_dict)
from train.config import TrainConfig, train_config_to_dict
from train.trainer import RESUMABLE_CHANGES

# Keys of train.data the corpus sets; a config may not.
CORPUS_DATA_KEYS = ("source", "paths", "validation_paths")


@dataclasses.dataclass(frozen=True)
class FamilyConfig:
    label: str  # shown in the table and the plots
    model: dict = dataclasses.field(default_factory=dict)  # changes to train.model
    match: str = "mlp.hidden_dim"  # the integer model setting searched to match the size
    match_step: int | None = None  # the width is a multiple of this; null: matching.step

    def __post_init__(self):
        require(isinstance(self.label, str) and self.label, "label", "must be a non-empty "
                f"string, got {self.label!r}")
        require(isinstance(self.model, dict), "model", f"must be a mapping, got "
                f"{type(self.model).__name__}")
        require("vocab_size" not in self.model, "model.vocab_size",
                "is shared by every family: set it in train.model")
        if self.match_step is not None:
            require_positive_int(self.match_step, "match_step")


@dataclasses.dataclass(frozen=True)
class MatchingConfig:
    reference: str = "m2rnn"  # the family whose size the others match (its widths are kept)
    tolerance: float = 0.03  # largest relative difference accepted
    step: int = 16  # the matched width is a multiple of this (a family's match_step may differ)

    def __post_init__(self):
        require_positive_int(self.step, "matching.step")
        require(0 < self.tolerance < 1, "matching.tolerance",
                f"must lie in (0, 1), got {self.tolerance!r}")


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    packages: list[str] = dataclasses.field(default_factory=lambda: [e.name for e in MANIFEST])
    validation_fraction: float = 0.05
    sha256: str | None = None  # expected SHA-256 of the built corpus; null: not checked
    cache_dir: str | None = None  # null: <out>/corpus

    def __post_init__(self):
        require(bool(self.packages), "corpus.packages", "must list at least one package")
        known = [e.name for e in MANIFEST]
        for name in self.packages:
            require(name in known, "corpus.packages", f"lists {name!r}, which the corpus "
                    f"manifest does not define (known: {', '.join(known)})")
        require(len(set(self.packages)) == len(self.packages), "corpus.packages",
                "lists a package twice")
        require(0 < self.validation_fraction < 1, "corpus.validation_fraction",
                f"must lie in (0, 1), got {self.validation_fraction!r}")
        require(self.sha256 is None or (isinstance(self.sha256, str) and len(self.sha256) == 64),
                "corpus.sha256", f"must be null or 64 hex digits, got {self.sha256!r}")


@dataclasses.dataclass(frozen=True)
class LongContextConfig:
    """Per-position loss on validation documents at least ``length_factor × data.seq_len + 1``
    bytes long, each read from its start as one contiguous window (no segment ids)."""

    length_factor: int = 8
    documents: int = 64  # at most this many such documents, spread evenly over the split
    bucket_size: int | None = None  # positions per bucket of the mean; null: seq_len // 4
    batch_size: int = 8

    def __post_init__(self):
        for name in ("length_factor", "documents", "batch_size"):
            require_positive_int(getattr(self, name), f"long_context.{name}")
        require(self.length_factor >= 2, "long_context.length_factor",
                f"must be >= 2 (positions beyond the training length), got {self.length_factor}")
        if self.bucket_size is not None:
            require_positive_int(self.bucket_size, "long_context.bucket_size")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    train: TrainConfig
    families: dict
    run: list[str] = dataclasses.field(default_factory=list)  # empty = every family
    seeds: int = 2
    first_seed: int = 0
    matching: MatchingConfig = dataclasses.field(default_factory=MatchingConfig)
    compare: list[list[str]] = dataclasses.field(default_factory=list)
    corpus: CorpusConfig = dataclasses.field(default_factory=CorpusConfig)
    long_context: LongContextConfig = dataclasses.field(default_factory=LongContextConfig)
    devices: int | None = None  # the first N devices train each run; null = all

    def __post_init__(self):
        require(isinstance(self.families, dict) and self.families, "families",
                "must define at least one family")
        for name in self.families:
            self.family(name)  # every family's section and model must read
        for name in self.run:
            require(name in self.families, "run", f"lists family {name!r}, which families "
                    f"does not define (defined: {', '.join(self.families)})")
        require(self.matching.reference in self.families, "matching.reference",
                f"= {self.matching.reference!r} is not a family (defined: "
                f"{', '.join(self.families)})")
        for pair in self.compare:
            require(len(pair) == 2 and all(name in self.families for name in pair), "compare",
                    f"entries must be [family, family], got {pair!r}")
        require_positive_int(self.seeds, "seeds")
        require(isinstance(self.first_seed, int) and self.first_seed >= 0, "first_seed",
                f"must be an integer >= 0, got {self.first_seed!r}")
        if self.devices is not None:
            require_positive_int(self.devices, "devices")
        require(self.train.model.vocab_size >= 256, "train.model.vocab_size",
                f"must be >= 256 for byte tokens, got {self.train.model.vocab_size}")
        require(self.train.data.seq_len >= self.long_context_bucket, "long_context.bucket_size",
                "must not exceed train.data.seq_len")

    @property
    def family_names(self) -> list[str]:
        return list(self.run) if self.run else list(self.families)

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.first_seed, self.first_seed + self.seeds))

    @property
    def long_context_bucket(self) -> int:
        return self.long_context.bucket_size or max(1, self.train.data.seq_len // 4)

    def family(self, name) -> FamilyConfig:
        if name not in self.families:
            raise ConfigError(f"unknown family {name!r}; defined: {', '.join(self.families)}")
        section = self.families[name]
        require(isinstance(section, dict), f"families.{name}",
                f"must be a mapping, got {type(section).__name__}")
        family = from_dict(FamilyConfig, section, path=f"families.{name}")
        self.unmatched_model(name, family)
        return family

    def unmatched_model(self, name, family=None) -> ModelConfig:
        """``train.model`` with the family's changes, before its width is matched."""
        family = family or self.family(name)
        data = merge_dicts(to_dict(self.train.model), family.model)
        return from_dict(ModelConfig, data, path=f"families.{name}.model")


@dataclasses.dataclass(frozen=True)
class MatchedFamily:
    name: str
    label: str
    model: ModelConfig
    params: int
    match: str | None  # the setting searched (None for the reference)

    @property
    def width(self):
        return None if self.match is None else sizing.get_value(self.model, self.match)


def matched_families(config: ExperimentConfig) -> dict:
    """``{name: MatchedFamily}`` of every family, each within ``matching.tolerance`` of the
    reference's parameter count (``ConfigError`` naming a family that cannot be matched)."""
    reference = config.matching.reference
    reference_model = config.unmatched_model(reference)
    target = sizing.count_params(reference_model)
    matched = {}
    for name in config.families:
        family = config.family(name)
        if name == reference:
            matched[name] = MatchedFamily(name, family.label, reference_model, target, None)
            continue
        try:
            model, params = sizing.match_width(
                config.unmatched_model(name, family), family.match, target,
                step=family.match_step or config.matching.step)
        except ConfigError as err:
            raise ConfigError(f"families.{name}.match: {err}") from err
        gap = params / target - 1
        require(abs(gap) <= config.matching.tolerance, f"families.{name}",
                f"has {params:,} parameters at best ({family.match} = "
                f"{sizing.get_value(model, family.match)}), {100 * gap:+.1f}% from "
                f"{reference}'s {target:,}: beyond matching.tolerance = "
                f"{config.matching.tolerance}; choose another families.{name}.match or "
                f"match_step")
        matched[name] = MatchedFamily(name, family.label, model, params, family.match)
    return matched


def run_train_config(config: ExperimentConfig, model: ModelConfig, seed: int, corpus_paths,
                     *, progress_bar=None) -> TrainConfig:
    """The ``TrainConfig`` of one run: the shared settings, the family's matched model, the
    seed, and the corpus folders ``corpus_paths = (train, validation)``."""
    train = config.train
    data = dataclasses.replace(train.data, source="text", paths=(str(corpus_paths[0]),),
                               validation_paths=(str(corpus_paths[1]),),
                               seed=train.data.seed + seed)
    logging = train.logging if progress_bar is None else dataclasses.replace(
        train.logging, progress_bar=progress_bar)
    return dataclasses.replace(train, model=model, seed=train.seed + seed, data=data,
                               logging=logging)


def run_fingerprint(train_config: TrainConfig, long_context: LongContextConfig,
                    bucket: int, corpus_sha256: str) -> str:
    """A hash of what decides a run's results: its config less the settings a resumed run may
    change without changing them (``RESUMABLE_CHANGES`` but ``steps``), the corpus by its
    SHA-256 rather than its folder, and the evaluation."""
    data = train_config_to_dict(train_config)
    for key in RESUMABLE_CHANGES:
        if key != "steps":
            data.pop(key)
    for key in CORPUS_DATA_KEYS:
        data["data"].pop(key)
    data["corpus_sha256"] = corpus_sha256
    data["long_context"] = dataclasses.asdict(long_context)
    data["long_context"]["bucket_size"] = bucket
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def check_raw(data: dict):
    """Checks of the YAML mapping that the dataclasses cannot make (who set a key)."""
    train = data.get("train")
    require(isinstance(train, dict) and isinstance(train.get("model"), dict), "train.model",
            "must describe the shared model (a mapping)")
    data_section = train.get("data") or {}
    for key in CORPUS_DATA_KEYS:
        require(key not in data_section, f"train.data.{key}",
                "is set by the corpus section; remove it")


def relative_path(path) -> str:
    """``path`` relative to the working folder when it lies below it (so that a run folder
    moved with its corpus between machines still finds it), else absolute."""
    absolute = os.path.abspath(path)
    relative = os.path.relpath(absolute)
    return absolute if relative.startswith("..") else relative

