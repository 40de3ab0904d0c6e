"""m2rnn-jax: M²RNN (non-linear RNN with matrix-valued states) in JAX and Flax NNX."""

from m2rnn_jax.config import (AttentionConfig, GatedDeltaNetConfig, M2RNNConfig, Mamba2Config,
                              MLPConfig, ModelConfig, MoEConfig)
from m2rnn_jax.generation import Generator, generate
from m2rnn_jax.layers.params import LOGICAL_AXES, decay_mask, logical_axes, no_decay_mask
from m2rnn_jax.layers.registry import register_mixer
from m2rnn_jax.models.hybrid_lm import HybridLM
from m2rnn_jax.ops import BACKENDS, m2rnn
from m2rnn_jax.parallel import MeshAxes
from m2rnn_jax.recurrences import diagonal_ssm, gated_delta_rule
from m2rnn_jax.typed_config import ConfigError

__all__ = ["AttentionConfig", "BACKENDS", "ConfigError", "GatedDeltaNetConfig", "Generator",
           "HybridLM", "LOGICAL_AXES", "M2RNNConfig", "MLPConfig", "Mamba2Config", "MeshAxes",
           "ModelConfig", "MoEConfig",
           "decay_mask", "diagonal_ssm", "gated_delta_rule", "generate", "logical_axes", "m2rnn",
           "no_decay_mask", "register_mixer"]
