"""Causal softmax attention with grouped KV heads and optional RoPE (mixer ``A``).

Packed documents (``segment_ids``) attend only within themselves; with RoPE, positions restart
at 0 at each document start. The authors' hybrids use no positional encoding (the default).

With a ``MeshAxes`` that splits anything, full-sequence attention runs under ``shard_map``
(``m2rnn_jax.parallel.context.sharded_attention``: keys and values all-gathered over the
context axis, heads split over the tensor axis).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from m2rnn_jax.layers.linear import Linear
from m2rnn_jax.layers.params import model_dtypes, out_proj_std
from m2rnn_jax.parallel import MeshAxes
from m2rnn_jax.parallel.context import sharded_attention


def positions_in_document(segment_ids, batch, seq_len):
    """Index of each step within its document: ``(B, S)`` int32."""
    steps = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len))
    if segment_ids is None:
        return steps
    starts = jnp.concatenate([jnp.ones((batch, 1), bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    last_start = jax.lax.cummax(jnp.where(starts, steps, 0), axis=1)
    return steps - last_start


def apply_rope(x, positions, theta):
    """Rotary embedding on ``x (B, S, H, D)`` at ``positions (B, S)`` (half-split layout)."""
    half = x.shape[-1] // 2
    freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[..., None, None] * freqs  # (B, S, 1, half)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def attention_implementation(requested, dtype, head_dim, seq_len, platform=None,
                             compute_capability=None):
    """What ``jax.nn.dot_product_attention`` runs for ``attention.implementation = requested``:
    ``"auto"`` takes cuDNN's flash attention on an Ampere or newer GPU for bfloat16/float16
    inputs with a head dim that is a multiple of 8 up to 128 and an even sequence length (what
    its fused kernel supports with a mask), XLA otherwise."""
    if requested != "auto":
        return requested
    if platform is None:
        platform = jax.default_backend()
    if platform == "gpu" and compute_capability is None:
        compute_capability = getattr(jax.devices()[0], "compute_capability", "0")
    supported = (platform == "gpu" and float(compute_capability) >= 8.0
                 and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
                 and head_dim % 8 == 0 and head_dim <= 128 and seq_len % 2 == 0)
    return "cudnn" if supported else "xla"


class Attention(nnx.Module):
    """Mixer ``A``. ``__call__(x (B, S, d_model), segment_ids=None) -> (B, S, d_model)``."""

    takes_normed_row = True  # its input reaches Linear layers only (registry: NormedRow)
    decode_step_adds = True  # decode_step(x, cache, add) returns add + y (registry)

    def __init__(self, config, *, rngs: nnx.Rngs, axes: MeshAxes = MeshAxes()):
        """``config`` is a ``ModelConfig``; the layer reads ``config.attention``."""
        cfg = config.attention
        self.cfg = cfg
        self.axes = axes
        self.head_dim = config.attention_head_dim
        dtype, param_dtype = model_dtypes(config)
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=cfg.add_bias)
        d, h, hkv = config.d_model, cfg.num_heads, cfg.kv_heads
        self.q_proj = Linear(d, h * self.head_dim, ("embed", "mixer"), std=config.init_std, **kw)
        self.k_proj = Linear(d, hkv * self.head_dim, ("embed", "mixer"), std=config.init_std,
                             **kw)
        self.v_proj = Linear(d, hkv * self.head_dim, ("embed", "mixer"), std=config.init_std,
                             **kw)
        self.o_proj = Linear(h * self.head_dim, d, ("mixer", "embed"), std=out_proj_std(config),
                             rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def _project(self, x, positions):
        batch, seq_len = x.shape[:2]
        q = self.q_proj(x).reshape(batch, seq_len, self.cfg.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(batch, seq_len, self.cfg.kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(batch, seq_len, self.cfg.kv_heads, self.head_dim)
        if self.cfg.rope:
            q = apply_rope(q, positions, self.cfg.rope_theta)
            k = apply_rope(k, positions, self.cfg.rope_theta)
        return q, k, v

    def __call__(self, x, segment_ids=None):
        return self.prefill(x, segment_ids)[0]

    def prefill(self, x, segment_ids=None, max_len=None):
        """Full-sequence attention; with ``max_len``, also the KV cache for ``decode_step``.

        The cache holds keys/values of ``max_len`` steps (``max_len >= S``), a mask of the
        cached steps the next token may see (those of each row's last document), the number of
        filled steps and each row's position in its last document (for RoPE).

        With ``self.axes`` splitting anything and no ``max_len`` (training), attention runs
        split over the mesh (projections and RoPE stay XLA's); with ``max_len`` (generation)
        the path runs as is, under whatever sharding XLA gives it.
        """
        batch, seq_len = x.shape[:2]
        positions = positions_in_document(segment_ids, batch, seq_len)
        q, k, v = self._project(x, positions)
        implementation = attention_implementation(self.cfg.implementation, q.dtype,
                                                  self.head_dim, seq_len)
        if max_len is None and self.axes.splits_anything:
            out = sharded_attention(q, k, v, segment_ids, axes=self.axes,
                                    implementation=implementation)
            return self.o_proj(out.reshape(batch, seq_len, -1)), None
        # Causality goes in as is_causal (cuDNN's flash kernel then skips the blocks above the
        # diagonal); packed documents as a boolean (B, 1, T, S) mask, which the cuDNN path turns
        # into an additive bias (no bias gradient is computed for a boolean mask).
        mask = None if segment_ids is None else \
            (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                           implementation=implementation)
        y = self.o_proj(out.reshape(batch, seq_len, -1))
        if max_len is None:
            return y, None
        if max_len < seq_len:
            raise ValueError(f"max_len = {max_len} must be >= the prompt length {seq_len}")
        pad = ((0, 0), (0, max_len - seq_len), (0, 0), (0, 0))
        visible = jnp.ones((batch, seq_len), bool) if segment_ids is None else \
            segment_ids == segment_ids[:, -1:]
        cache = {"key": jnp.pad(k, pad), "value": jnp.pad(v, pad),
                 "visible": jnp.pad(visible, ((0, 0), (0, max_len - seq_len))),
                 "length": jnp.asarray(seq_len, jnp.int32),
                 "position": positions[:, -1] + 1}
        return y, cache

    def decode_step(self, x, cache, add=None):
        """One token per row: ``x (B, 1, d_model)`` -> ``(y (B, 1, d_model), cache)``."""
        batch = x.shape[0]
        q, k, v = self._project(x, cache["position"][:, None])
        index = cache["length"]
        key = jax.lax.dynamic_update_slice(cache["key"], k.astype(cache["key"].dtype),
                                           (0, index, 0, 0))
        value = jax.lax.dynamic_update_slice(cache["value"], v.astype(cache["value"].dtype),
                                             (0, index, 0, 0))
        visible = jax.lax.dynamic_update_slice(cache["visible"], jnp.ones((batch, 1), bool),
                                               (0, index))
        # One query step: "auto" keeps XLA here (a flash kernel gains nothing on one row).
        implementation = None if self.cfg.implementation == "auto" else self.cfg.implementation
        out = jax.nn.dot_product_attention(q, key, value, mask=visible[:, None, None, :],
                                           implementation=implementation)
        y = self.o_proj(out.reshape(batch, 1, -1), add=add)
        return y, {"key": key, "value": value, "visible": visible, "length": index + 1,
                   "position": cache["position"] + 1}
