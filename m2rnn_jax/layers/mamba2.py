"""Mixer ``S``: a Mamba-2 style diagonal gated linear recurrence (baseline).

Per head ``h`` (``H = num_heads``, ``P = head_dim``, ``N = state_dim``) the state
``S ∈ R^{N×P}`` follows the diagonal recurrence (``m2rnn_jax.recurrences.diagonal_ssm``)::

    dt_t = softplus(dt_logit_t + dt_bias)                 # step size, > 0
    a_t  = exp(-exp(A_log) · dt_t)                        # scalar decay in (0, 1)
    S_t  = a_t · S_{t-1} + dt_t · B_t x_tᵀ                # B_t ∈ R^N, x_t ∈ R^P
    y_t  = S_tᵀ C_t + D · x_t

The transition is a scalar times the identity, so the recurrence is linear and associative
(a parallel scan exists) and, unlike M²RNN, cannot represent non-commuting state updates.

Layer (as in Mamba-2): ``in_proj`` -> ``[z | x | B | C | dt_logit]``; causal depthwise conv +
SiLU over ``x | B | C``; the recurrence (``B``, ``C`` shared by the heads of each of
``num_groups`` groups); ``RMSNorm(y ⊙ silu(z))`` over ``H·P``; ``out_proj``. Init:
``A ~ U[A_init_min, A_init_max]``, ``dt_bias`` = softplus⁻¹ of a log-uniform ``dt``, ``D = 1``.
The recurrence runs in float32 by chunks of ``config.mamba2.chunk_size`` (``diagonal_ssm``); a
decode step runs one step of its scan (``diagonal_ssm_scan``).
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2rnn_jax.layers.conv import causal_depthwise_conv, conv_cache, conv_decode_step
from m2rnn_jax.layers.linear import Linear
from m2rnn_jax.layers.m2rnn import init_A_log, init_dt_bias
from m2rnn_jax.layers.norm import RMSNorm
from m2rnn_jax.layers.params import make_param, model_dtypes, out_proj_std
from m2rnn_jax.layers.registry import register_mixer
from m2rnn_jax.parallel import MeshAxes
from m2rnn_jax.recurrences.diagonal_ssm import diagonal_ssm, diagonal_ssm_scan


class Mamba2(nnx.Module):
    """Mixer ``S``. ``__call__(x (B, S, d_model), segment_ids=None) -> (B, S, d_model)``."""

    takes_normed_row = True  # its input reaches Linear layers only (registry: NormedRow)
    decode_step_adds = True  # decode_step(x, cache, add) returns add + y (registry)

    def __init__(self, config, *, rngs: nnx.Rngs, axes: MeshAxes = MeshAxes()):
        """``config`` is a ``ModelConfig``; the layer reads ``config.mamba2``."""
        # Split by XLA from the parameters' logical axes; over a split sequence XLA gathers
        # it for the recurrence (only M²RNN and attention place their own collectives).
        del axes
        cfg = config.mamba2
        self.cfg = cfg
        dtype, param_dtype = model_dtypes(config)
        self.dtype = dtype
        self.inner = cfg.num_heads * cfg.head_dim
        self.conv_width = self.inner + 2 * cfg.num_groups * cfg.state_dim  # x | B | C
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_proj = Linear(config.d_model, self.inner + self.conv_width + cfg.num_heads,
                              ("embed", "mixer"), std=config.init_std, **kw)
        bound = 1.0 / np.sqrt(cfg.conv_kernel)
        self.conv_weight = make_param(
            jax.random.uniform(rngs.params(), (cfg.conv_kernel, self.conv_width), jnp.float32,
                               -bound, bound).astype(param_dtype), ("conv", "mixer"))
        # Decay parameters stay float32 whatever param_dtype is.
        self.A_log = make_param(
            init_A_log(rngs.params(), cfg.num_heads, cfg.A_init_min, cfg.A_init_max),
            ("heads",), weight_decay=False)
        self.dt_bias = make_param(
            init_dt_bias(rngs.params(), cfg.num_heads, cfg.dt_init_min, cfg.dt_init_max,
                         cfg.dt_init_floor), ("heads",), weight_decay=False)
        self.D = make_param(jnp.ones((cfg.num_heads,), param_dtype), ("heads",),
                            weight_decay=False)
        self.out_norm = RMSNorm(self.inner, eps=config.norm_eps, dtype=dtype,
                                param_dtype=param_dtype)
        self.out_proj = Linear(self.inner, config.d_model, ("mixer", "embed"),
                               std=out_proj_std(config), **kw)

    def _split(self, projected):
        z, xbc, dt_logits = jnp.split(projected, [self.inner, self.inner + self.conv_width],
                                      axis=-1)
        return z, xbc, dt_logits

    def _heads(self, xbc):
        """Conv output -> ``x (..., H, P)``, ``B``/``C`` ``(..., H, N)`` (groups expanded)."""
        cfg = self.cfg
        group_width = cfg.num_groups * cfg.state_dim
        x, b, c = jnp.split(xbc, [self.inner, self.inner + group_width], axis=-1)
        lead = xbc.shape[:-1]
        per_group = cfg.num_heads // cfg.num_groups
        expand = lambda a: jnp.repeat(a.reshape(lead + (cfg.num_groups, cfg.state_dim)),
                                      per_group, axis=-2)
        return x.reshape(lead + (cfg.num_heads, cfg.head_dim)), expand(b), expand(c)

    def _gates(self, dt_logits):
        """Step sizes ``dt`` and ``log a = -exp(A_log) · dt`` (float32)."""
        dt = jax.nn.softplus(dt_logits.astype(jnp.float32) + self.dt_bias[...])
        return dt, -jnp.exp(self.A_log[...]) * dt

    def _output(self, y, x, z, add=None):
        y = y + self.D[...].astype(jnp.float32)[:, None] * x.astype(jnp.float32)
        y = y.reshape(y.shape[:-2] + (self.inner,)).astype(self.dtype)
        return self.out_proj(self.out_norm.for_product(y * jax.nn.silu(z)), add=add)

    def __call__(self, x, segment_ids=None):
        return self.prefill(x, segment_ids)[0]

    def prefill(self, x, segment_ids=None, max_len=None):
        """Full-sequence path: ``(out, cache)``; the cache is the float32 state ``(B, H, N, P)``
        after the last step and the conv window (``max_len`` is ignored: the cache has a fixed
        size)."""
        del max_len
        z, xbc_in, dt_logits = self._split(self.in_proj(x))
        xbc = jax.nn.silu(causal_depthwise_conv(xbc_in, self.conv_weight[...], None,
                                                segment_ids))
        xh, b, c = self._heads(xbc)
        dt, log_decay = self._gates(dt_logits)
        y, state = diagonal_ssm(xh, dt, log_decay, b, c, segment_ids=segment_ids,
                                chunk_size=self.cfg.chunk_size)
        cache = {"state": state, **conv_cache(xbc_in, segment_ids, self.cfg.conv_kernel)}
        return self._output(y, xh, z), cache

    def decode_step(self, x, cache, add=None):
        """One token per row: ``x (B, 1, d_model)`` -> ``(y (B, 1, d_model), cache)``."""
        z, xbc_in, dt_logits = self._split(self.in_proj(x))
        xbc, conv = conv_decode_step(xbc_in, cache, self.conv_weight[...])
        xh, b, c = self._heads(jax.nn.silu(xbc.astype(xbc_in.dtype)))
        dt, log_decay = self._gates(dt_logits)
        y, state = diagonal_ssm_scan(xh, dt, log_decay, b, c, initial_state=cache["state"])
        return self._output(y, xh, z, add), {"state": state, **conv}


register_mixer("S", Mamba2)
