"""Mixer ``D``: Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024), a baseline.

Per head (``K = key_dim``, ``V = value_dim``) the state ``S ∈ R^{K×V}`` follows the gated
delta rule (``m2rnn_jax.recurrences.gated_delta``)::

    α_t = exp(-exp(A_log) · softplus(a_t + dt_bias))      # decay gate in (0, 1), Mamba-2 style
    β_t = sigmoid(b_t)                                     # write strength in (0, 1)
    S_t = α_t (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ
    o_t = S_tᵀ q_t

``q_t``, ``k_t`` are L2-normalised per head and ``q_t`` is scaled by ``1/√K``. The transition
``α (I - β k kᵀ)`` depends on the input but is linear in the state (eigenvalues in
``[0, 1]``): the recurrence stays linear, unlike M²RNN's ``tanh``.

Layer: ``in_proj`` -> ``[q | k | v | g | b | a]``; causal depthwise conv + SiLU over
``q | k | v``; the recurrence; per-head ``RMSNorm(o) ⊙ silu(g)``; ``out_proj``. The recurrence
runs in float32 by chunks of ``config.gated_deltanet.chunk_size`` (``gated_delta_rule``); a
decode step runs one step of its scan (``gated_delta_rule_scan``).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from m2rnn_jax.layers.conv import causal_depthwise_conv, conv_cache, conv_decode_step
from m2rnn_jax.layers.linear import Linear
from m2rnn_jax.layers.m2rnn import init_A_log, init_dt_bias
from m2rnn_jax.layers.norm import RMSNorm
from m2rnn_jax.layers.params import make_param, model_dtypes, out_proj_std
from m2rnn_jax.layers.registry import register_mixer
from m2rnn_jax.parallel import MeshAxes
from m2rnn_jax.recurrences.gated_delta import gated_delta_rule, gated_delta_rule_scan

# Decay init as in Gated DeltaNet's reference code: A ~ U[0, 16], dt log-uniform in [1e-3, 0.1].
_A_INIT = (0.0, 16.0)
_DT_INIT = (1e-3, 0.1, 1e-4)


def l2_normalize(x, eps=1e-6):
    x = x.astype(jnp.float32)
    return x * lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


class GatedDeltaNet(nnx.Module):
    """Mixer ``D``. ``__call__(x (B, S, d_model), segment_ids=None) -> (B, S, d_model)``."""

    takes_normed_row = True  # its input reaches Linear layers only (registry: NormedRow)
    decode_step_adds = True  # decode_step(x, cache, add) returns add + y (registry)

    def __init__(self, config, *, rngs: nnx.Rngs, axes: MeshAxes = MeshAxes()):
        """``config`` is a ``ModelConfig``; the layer reads ``config.gated_deltanet``."""
        # Split by XLA from the parameters' logical axes; over a split sequence XLA gathers
        # it for the recurrence (only M²RNN and attention place their own collectives).
        del axes
        cfg = config.gated_deltanet
        self.cfg = cfg
        dtype, param_dtype = model_dtypes(config)
        self.dtype = dtype
        h, k_dim, v_dim = cfg.num_heads, cfg.key_dim, cfg.value_dim
        self.conv_width = h * (2 * k_dim + v_dim)  # q | k | v
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_proj = Linear(config.d_model, self.conv_width + h * v_dim + 2 * h,
                              ("embed", "mixer"), std=config.init_std, **kw)
        bound = 1.0 / np.sqrt(cfg.conv_kernel)
        self.conv_weight = make_param(
            jax.random.uniform(rngs.params(), (cfg.conv_kernel, self.conv_width), jnp.float32,
                               -bound, bound).astype(param_dtype), ("conv", "mixer"))
        # Decay parameters stay float32 whatever param_dtype is.
        self.A_log = make_param(init_A_log(rngs.params(), h, *_A_INIT), ("heads",),
                                weight_decay=False)
        self.dt_bias = make_param(init_dt_bias(rngs.params(), h, *_DT_INIT), ("heads",),
                                  weight_decay=False)
        self.out_norm = RMSNorm(v_dim, eps=config.norm_eps, dtype=jnp.float32,
                                param_dtype=param_dtype)
        self.out_proj = Linear(h * v_dim, config.d_model, ("mixer", "embed"),
                               std=out_proj_std(config), **kw)

    def _split(self, projected):
        cfg = self.cfg
        widths = np.cumsum([self.conv_width, cfg.num_heads * cfg.value_dim, cfg.num_heads])
        qkv, g, b, a = jnp.split(projected, widths, axis=-1)
        return qkv, g, b, a

    def _heads(self, qkv):
        cfg = self.cfg
        h, k_dim = cfg.num_heads, cfg.key_dim
        q, k, v = jnp.split(qkv, [h * k_dim, 2 * h * k_dim], axis=-1)
        lead = qkv.shape[:-1]
        q = l2_normalize(q.reshape(lead + (h, k_dim))) / np.sqrt(k_dim)
        k = l2_normalize(k.reshape(lead + (h, k_dim)))
        return q, k, v.reshape(lead + (h, cfg.value_dim))

    def _gates(self, b, a):
        """``log α = -exp(A_log) · softplus(a + dt_bias)`` and ``β = sigmoid(b)`` (float32)."""
        log_alpha = -jnp.exp(self.A_log[...]) * jax.nn.softplus(a.astype(jnp.float32)
                                                               + self.dt_bias[...])
        return log_alpha, jax.nn.sigmoid(b.astype(jnp.float32))

    def _output(self, o, g, add=None):
        g = g.reshape(o.shape).astype(jnp.float32)
        gated = self.out_norm(o) * jax.nn.silu(g)
        return self.out_proj(gated.reshape(o.shape[:-2] + (-1,)).astype(self.dtype), add=add)

    def __call__(self, x, segment_ids=None):
        return self.prefill(x, segment_ids)[0]

    def prefill(self, x, segment_ids=None, max_len=None):
        """Full-sequence path: ``(out, cache)``; the cache is the float32 state ``(B, H, K, V)``
        after the last step and the conv window (``max_len`` is ignored: fixed-size cache)."""
        del max_len
        qkv_in, g, b, a = self._split(self.in_proj(x))
        qkv = jax.nn.silu(causal_depthwise_conv(qkv_in, self.conv_weight[...], None,
                                                segment_ids))
        q, k, v = self._heads(qkv)
        log_alpha, beta = self._gates(b, a)
        o, state = gated_delta_rule(q, k, v, log_alpha, beta, segment_ids=segment_ids,
                                    chunk_size=self.cfg.chunk_size)
        cache = {"state": state, **conv_cache(qkv_in, segment_ids, self.cfg.conv_kernel)}
        return self._output(o, g), cache

    def decode_step(self, x, cache, add=None):
        """One token per row: ``x (B, 1, d_model)`` -> ``(y (B, 1, d_model), cache)``."""
        qkv_in, g, b, a = self._split(self.in_proj(x))
        qkv, conv = conv_decode_step(qkv_in, cache, self.conv_weight[...])
        q, k, v = self._heads(jax.nn.silu(qkv.astype(qkv_in.dtype)))
        log_alpha, beta = self._gates(b, a)
        o, state = gated_delta_rule_scan(q, k, v, log_alpha, beta, initial_state=cache["state"])
        return self._output(o, g, add), {"state": state, **conv}


register_mixer("D", GatedDeltaNet)
