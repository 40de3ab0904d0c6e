"""Flax NNX layers: norms, MLP, mixers (M²RNN, attention) and the mixer registry."""

from m2rnn_jax.layers.attention import Attention
from m2rnn_jax.layers.conv import causal_depthwise_conv
from m2rnn_jax.layers.linear import Embed, Linear
from m2rnn_jax.layers.m2rnn import M2RNN
from m2rnn_jax.layers.mlp import SwiGLU
from m2rnn_jax.layers.norm import RMSNorm
from m2rnn_jax.layers.params import (LOGICAL_AXES, decay_mask, logical_axes, make_param,
                                     no_decay_mask)
from m2rnn_jax.layers.registry import mixer_class, register_mixer

__all__ = ["Attention", "Embed", "LOGICAL_AXES", "Linear", "M2RNN", "RMSNorm", "SwiGLU",
           "causal_depthwise_conv", "decay_mask", "logical_axes", "make_param", "mixer_class",
           "no_decay_mask", "register_mixer"]
