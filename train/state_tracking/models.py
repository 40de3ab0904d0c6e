"""The experiment's models: ``HybridLM`` (vocab = group order), with the M²RNN variant of
``config.M2RNNVariant`` swapped into its ``M`` blocks when one is asked for."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2rnn_jax import HybridLM
from m2rnn_jax.layers import M2RNN, causal_depthwise_conv
from m2rnn_jax.layers.m2rnn import forget_gate
from m2rnn_jax.ops import m2rnn


class VariantM2RNN(M2RNN):
    """``M2RNN`` whose ``v`` skips the SiLU after the conv (``q``, ``k`` keep it).

    Everything else is the parent layer's (parameters, gate, op, output path); only the
    full-sequence call is provided, which is all the experiment uses.
    """

    def __init__(self, config, *, rngs: nnx.Rngs, value_activation: str):
        super().__init__(config, rngs=rngs)
        self.linear_value = value_activation == "identity"

    def prefill(self, x, segment_ids=None, max_len=None, initial_state=None):
        del max_len
        qkv_in, f_logits, g = self._split(self.in_proj(x))
        conv_bias = None if self.conv_bias is None else self.conv_bias[...]
        qkv = causal_depthwise_conv(qkv_in, self.conv_weight[...], conv_bias, segment_ids)
        q, k, v = self._heads(qkv)
        q, k = jax.nn.silu(q), jax.nn.silu(k)
        if not self.linear_value:
            v = jax.nn.silu(v)
        f = forget_gate(f_logits, self.A_log[...], self.dt_bias[...])
        y, state = m2rnn(q, k, v, self.W[...], f, initial_state, self.cfg.gradient_clipping,
                         segment_ids=segment_ids, backend=self.cfg.backend,
                         chunk_size=self.cfg.chunk_size)
        return self._output(y, v, g), {"state": state}

    def decode_step(self, x, cache):
        raise NotImplementedError("VariantM2RNN is for full-sequence training and evaluation")


def build_model(model_config, variant, seed: int) -> HybridLM:
    """``HybridLM(model_config)`` from ``seed``, its ``M`` blocks changed as ``variant`` says."""
    model = HybridLM(model_config, rngs=nnx.Rngs(seed))
    if variant.is_default:
        return model
    key = jax.random.fold_in(jax.random.key(seed), 0x3C1)
    for index, block in enumerate(model.blocks):
        if not isinstance(block.mixer, M2RNN):
            continue
        if variant.value_activation != "silu":
            block.mixer = VariantM2RNN(model_config, rngs=nnx.Rngs(seed + 7919 * (index + 1)),
                                       value_activation=variant.value_activation)
        if variant.transition_init == "normal":
            weight = block.mixer.W
            std = variant.transition_scale / np.sqrt(weight.shape[-1])
            weight[...] = (std * jax.random.normal(jax.random.fold_in(key, index), weight.shape,
                                                   jnp.float32)).astype(weight.dtype)
    return model
