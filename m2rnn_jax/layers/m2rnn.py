"""The M²RNN mixer layer (docs/math.md §3), as in the authors' training code.

``x (B, S, d_model)`` -> in_proj -> [q|k|v | forget logits | g] -> causal depthwise conv + SiLU on
q|k|v -> forget gate ``f = exp(-exp(A_log) · softplus(logit + dt_bias))`` (float32) -> the
``m2rnn`` op -> ``y + D ⊙ v`` -> ``y ⊙ silu(g)`` -> RMSNorm over N·V -> out_proj.

Two config options depart from this for experiments (the defaults are the layer above):
``transition_init`` (``W = I`` or random normal) and ``value_activation`` (``"identity"``: no
SiLU on v).

With a ``MeshAxes`` that splits anything, the full-sequence path runs the conv and the
recurrence under one ``shard_map`` (``m2rnn_jax.parallel``); everything around them is split by
XLA from the parameters' logical axes.
"""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from m2rnn_jax.layers.conv import causal_depthwise_conv, conv_cache, conv_decode_step
from m2rnn_jax.layers.linear import Linear
from m2rnn_jax.layers.norm import RMSNorm
from m2rnn_jax.layers.params import make_param, model_dtypes, out_proj_std
from m2rnn_jax.ops import m2rnn
from m2rnn_jax.parallel import MeshAxes
from m2rnn_jax.parallel.context import (activation_spec, causal_conv_in_shard, check_split,
                                        shard_map)
from m2rnn_jax.parallel.recurrence import m2rnn_in_shard, recurrence_head_axes
from pallas_kernels import platforms
from pallas_kernels.m2rnn import decode_step as fused_decode
from pallas_kernels.m2rnn.heads import expand_heads


def init_A_log(key, num_heads, low, high):
    """``A ~ U[low, high]``, ``A_log = log A`` (A floored at float32 tiny: finite log)."""
    a = jax.random.uniform(key, (num_heads,), jnp.float32, low, high)
    return jnp.log(jnp.maximum(a, np.finfo(np.float32).tiny))


def init_dt_bias(key, num_heads, dt_min, dt_max, dt_floor):
    """``dt = exp(U[log dt_min, log dt_max])`` floored at ``dt_floor``; -> softplus⁻¹(dt)."""
    u = jax.random.uniform(key, (num_heads,), jnp.float32)
    dt = jnp.exp(u * (np.log(dt_max) - np.log(dt_min)) + np.log(dt_min))
    dt = jnp.maximum(dt, dt_floor)
    return dt + jnp.log(-jnp.expm1(-dt))


def forget_gate(logits, A_log, dt_bias):
    """Mamba-style decay ``exp(-exp(A_log) · softplus(logits + dt_bias))`` in float32."""
    dt = jax.nn.softplus(logits.astype(jnp.float32) + dt_bias)
    return jnp.exp(-jnp.exp(A_log) * dt)


def init_transition(rngs, cfg):
    """The per-head transition ``W (Nw, V, V)`` in float32: ``I`` (docs/math.md §3) or, with
    ``transition_init = "normal"``, ``N(0, (transition_scale / sqrt(V))²)`` entries (only this
    init draws a key from ``rngs``)."""
    shape = (cfg.heads("w"), cfg.value_dim, cfg.value_dim)
    if cfg.transition_init == "identity":
        return jnp.broadcast_to(jnp.eye(cfg.value_dim, dtype=jnp.float32), shape)
    std = cfg.transition_scale / np.sqrt(cfg.value_dim)
    return std * jax.random.normal(rngs.params(), shape, jnp.float32)


class M2RNN(nnx.Module):
    """Mixer ``M``. ``__call__(x (B, S, d_model), segment_ids=None) -> (B, S, d_model)``."""

    takes_normed_row = True  # its input reaches Linear layers only (registry: NormedRow)
    decode_step_adds = True  # decode_step(x, cache, add) returns add + y (registry)

    def __init__(self, config, *, rngs: nnx.Rngs, axes: MeshAxes = MeshAxes()):
        """``config`` is a ``ModelConfig``; the layer reads ``config.m2rnn``."""
        cfg = config.m2rnn
        self.cfg = cfg
        self.axes = axes
        self._head_axes()  # a head count the tensor axis cannot split fails here, not in training
        dtype, param_dtype = model_dtypes(config)
        self.dtype = dtype
        n, v_dim = cfg.num_heads, cfg.value_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.in_proj = Linear(config.d_model, cfg.in_proj_width, ("embed", "mixer"),
                              std=config.init_std, use_bias=cfg.add_bias, **kw)
        bound = 1.0 / np.sqrt(cfg.conv_kernel)  # PyTorch's conv1d default for a depthwise conv
        self.conv_weight = make_param(
            jax.random.uniform(rngs.params(), (cfg.conv_kernel, cfg.conv_width), jnp.float32,
                               -bound, bound).astype(param_dtype), ("conv", "mixer"))
        self.conv_bias = (make_param(jnp.zeros((cfg.conv_width,), param_dtype), ("mixer",),
                                     weight_decay=False) if cfg.add_bias else None)
        num_f = cfg.heads("f")
        # The decay parameters stay float32 whatever param_dtype is (docs/math.md §3).
        self.A_log = make_param(init_A_log(rngs.params(), num_f, cfg.A_init_min, cfg.A_init_max),
                                ("heads",), weight_decay=False)
        self.dt_bias = make_param(
            init_dt_bias(rngs.params(), num_f, cfg.dt_init_min, cfg.dt_init_max,
                         cfg.dt_init_floor), ("heads",), weight_decay=False)
        self.W = make_param(init_transition(rngs, cfg).astype(param_dtype),
                            ("heads", "head_dim", "head_dim"))
        self.D = (make_param(jnp.ones((n, v_dim), param_dtype), ("heads", "head_dim"),
                             weight_decay=False) if cfg.use_residual else None)
        self.out_norm = RMSNorm(cfg.output_width, eps=config.norm_eps, dtype=dtype,
                                param_dtype=param_dtype)
        self.out_proj = Linear(cfg.output_width, config.d_model, ("mixer", "embed"),
                               std=out_proj_std(config), **kw)

    def _forget_columns(self):
        """Where the forget logits sit among in_proj's columns ``[q|k|v | f | g]``."""
        return self.cfg.conv_width, self.cfg.conv_width + self.cfg.heads("f")

    def _split(self, projected):
        qkv, f_logits, g = jnp.split(projected, self._forget_columns(), axis=-1)
        return qkv, f_logits, g

    def _project(self, x):
        """``_split(in_proj(x))`` as two products, the forget logits' columns apart. The kernel
        reads f time-minor; sliced from one product, f makes XLA lay the whole projection out
        that way, adding transposes around the conv and in the backward pass."""
        first, last = self._forget_columns()
        rest = self.in_proj(x, columns=(slice(0, first), slice(last, None)))
        f_logits = self.in_proj(x, columns=(slice(first, last),))
        return rest[..., :first], f_logits, rest[..., first:]

    def _heads(self, qkv):
        """Conv output ``(..., conv_width)`` -> q ``(..., Nq, K)``, k, v ``(..., Nv, V)``."""
        cfg = self.cfg
        nq, nk, nv = cfg.heads("q"), cfg.heads("k"), cfg.heads("v")
        q, k, v = jnp.split(qkv, np.cumsum([nq * cfg.key_dim, nk * cfg.key_dim]), axis=-1)
        lead = qkv.shape[:-1]
        return (q.reshape(lead + (nq, cfg.key_dim)), k.reshape(lead + (nk, cfg.key_dim)),
                v.reshape(lead + (nv, cfg.value_dim)))

    def _activate(self, q, k, v):
        """SiLU after the conv on q and k, and on v unless ``value_activation = "identity"``."""
        if self.cfg.value_activation == "silu":
            v = jax.nn.silu(v)
        return jax.nn.silu(q), jax.nn.silu(k), v

    def _output(self, y, v, g, add=None):
        """Read-out ``y (..., N, V)`` -> residual, gate, norm, out_proj (+ ``add``) ->
        ``(..., d_model)``."""
        cfg = self.cfg
        n = cfg.num_heads
        if self.D is not None:
            y = y + self.D[...].astype(y.dtype) * expand_heads(v, n, axis=-2).astype(y.dtype)
        g = g.reshape(g.shape[:-1] + (cfg.heads("g"), cfg.value_dim))
        gated = y * jax.nn.silu(expand_heads(g, n, axis=-2)).astype(y.dtype)
        return self._project_out(gated, add)

    def _project_out(self, gated, add=None):
        """Gated read-out ``(..., N, V)`` -> norm, out_proj (+ ``add``) -> ``(..., d_model)``."""
        gated = gated.reshape(gated.shape[:-2] + (self.cfg.output_width,))
        return self.out_proj(self.out_norm.for_product(gated), add=add)

    def __call__(self, x, segment_ids=None):
        return self.prefill(x, segment_ids)[0]

    def prefill(self, x, segment_ids=None, max_len=None, initial_state=None):
        """Full-sequence path: ``(out (B, S, d_model), cache)``.

        The cache (the same size at every length; ``max_len`` only picks the path) holds the
        float32 matrix state ``(B, N, K, V)`` after the last step and the conv ring
        (``conv_cache``): the last ``conv_kernel - 1`` pre-conv q|k|v inputs of each row's last
        document.

        With ``self.axes`` splitting anything and no ``max_len`` (training), the conv and the
        recurrence run split (``_prefill_split``); with ``max_len`` (generation) the path below
        runs as is, under whatever sharding XLA gives it.
        """
        if max_len is None and self.axes.splits_anything:
            return self._prefill_split(x, segment_ids, initial_state)
        qkv_in, f_logits, g = self._project(x)
        conv_bias = None if self.conv_bias is None else self.conv_bias[...]
        qkv = causal_depthwise_conv(qkv_in, self.conv_weight[...], conv_bias, segment_ids)
        q, k, v = self._activate(*self._heads(qkv))
        f = forget_gate(f_logits, self.A_log[...], self.dt_bias[...])
        # W in the compute dtype like every other weight (bf16 training: bf16 W, which also lets
        # backend="auto" pick the Mosaic kernels on Hopper GPUs).
        y, state = m2rnn(q, k, v, self.W[...].astype(v.dtype), f, initial_state,
                         self.cfg.gradient_clipping,
                         segment_ids=segment_ids, backend=self.cfg.backend,
                         chunk_size=self.cfg.chunk_size)
        cache = {"state": state, **conv_cache(qkv_in, segment_ids, self.cfg.conv_kernel)}
        return self._output(y, v, g), cache

    def _prefill_split(self, x, segment_ids, initial_state):
        """``prefill`` with the conv and the recurrence under one ``shard_map`` over
        ``self.axes``: rows over the batch axes, heads over the tensor axis, steps over the
        context axis (``m2rnn_jax.parallel.recurrence``).

        Communication: the fused in-projection's output is split by XLA along its channels
        (logical axis ``mixer``), which do not line up with heads; entering the ``shard_map``
        with head-aligned q, k, v and f reshards it once over the tensor axis (a gather of the
        replicated single-head q and k, a re-split of the rest; nothing without a tensor axis).
        Inside: one ``ppermute`` of the conv's ``conv_kernel - 1``-step halo and its segment
        ids, one of the last segment ids, and the pipelined state ``ppermute`` of the
        recurrence (``B·N·K·V`` float32 values per context boundary). ``y`` and ``v`` leave
        split as they entered; the gate, norm and out-projection are XLA's again.
        """
        cfg, axes = self.cfg, self.axes
        batch, seq_len = x.shape[:2]
        check_split(axes, batch, seq_len, "M2RNN")
        # Over a tensor axis the projection's columns are split across devices: one product,
        # since the column blocks of two would not line up with the shards.
        qkv_in, f_logits, g = (self._project(x) if axes.tensor is None else
                               self._split(self.in_proj(x)))
        f = forget_gate(f_logits, self.A_log[...], self.dt_bias[...])
        q_in, k_in, v_in = self._heads(qkv_in)
        conv_weights = self._heads(self.conv_weight[...])  # (taps, heads, dim) each
        conv_biases = (None,) * 3 if self.conv_bias is None else self._heads(self.conv_bias[...])
        head = self._head_axes()
        q_axis, k_axis, v_axis = head["query"], head["key"], head["value"]
        args = {"inputs": (q_in, k_in, v_in), "conv_weights": conv_weights,
                "f": f, "w": self.W[...].astype(v_in.dtype), "input_state": initial_state,
                "segment_ids": segment_ids}
        specs = {"inputs": tuple(activation_spec(axes, a, None) for a in (q_axis, k_axis, v_axis)),
                 "conv_weights": tuple(PartitionSpec(None, a, None)
                                       for a in (q_axis, k_axis, v_axis)),
                 "f": activation_spec(axes, head["forget_input"]),
                 "w": PartitionSpec(head["weight"], None, None),
                 "input_state": PartitionSpec(axes.batch_spec(), head["state"], None, None),
                 "segment_ids": activation_spec(axes)}
        if conv_biases[0] is not None:
            args["conv_biases"] = conv_biases
            specs["conv_biases"] = tuple(PartitionSpec(a, None) for a in (q_axis, k_axis, v_axis))
        present = {name: value for name, value in args.items() if value is not None}

        def body(local):
            ids = local.get("segment_ids")
            # One conv (and one halo exchange) over the local q|k|v channels.
            pieces = local["inputs"]
            lead = pieces[0].shape[:2]
            flat = jnp.concatenate([p.reshape(lead + (-1,)) for p in pieces], axis=-1)
            weight = jnp.concatenate([w.reshape(w.shape[0], -1) for w in local["conv_weights"]],
                                     axis=-1)
            bias = (None if "conv_biases" not in local else
                    jnp.concatenate([b.reshape(-1) for b in local["conv_biases"]]))
            conv = causal_conv_in_shard(flat, weight, bias, ids, axes)
            widths = [p.shape[2] * p.shape[3] for p in pieces]
            q, k, v = (c.reshape(lead + p.shape[2:]) for c, p in zip(
                jnp.split(conv, np.cumsum(widths[:-1]), axis=-1), pieces))
            q, k, v = self._activate(q, k, v)
            y, state = m2rnn_in_shard(q, k, v, local["w"], local["f"], local.get("input_state"),
                                      cfg.gradient_clipping, segment_ids=ids, axes=axes,
                                      backend=cfg.backend, chunk_size=cfg.chunk_size)
            return y, v, state[:, None]

        out_specs = (activation_spec(axes, head["state"], None),
                     activation_spec(axes, v_axis, None),
                     activation_spec(axes, head["state"], None, None))
        y, v, states = shard_map(body, axes, ({name: specs[name] for name in present},),
                                 out_specs)(present)
        # states (B, C, N, K, V): the state after each context shard; the last is the row's.
        cache = {"state": states[:, -1], **conv_cache(qkv_in, segment_ids, cfg.conv_kernel)}
        return self._output(y, v, g), cache

    def _head_axes(self):
        """The mesh axis (or None) that splits each input of the op's heads; a ValueError for
        a head count the tensor axis cannot split."""
        cfg = self.cfg
        return recurrence_head_axes(self.axes, {
            "query": cfg.heads("q"), "key": cfg.heads("k"), "value": cfg.heads("v"),
            "forget_input": cfg.heads("f"), "weight": cfg.heads("w")})

    def _decodes_fused(self):
        """Whether ``decode_step`` runs the fused kernel (``m2rnn.decode_kernel``): for "auto",
        where the GPU kernels compile for real (on a GPU, or for one under
        ``platforms.lowered_for("gpu")``), on one device's layout, for a K and V it supports."""
        cfg = self.cfg
        if cfg.decode_kernel == "xla":
            return False
        reason = fused_decode.supports(cfg.key_dim, cfg.value_dim)
        if cfg.decode_kernel == "fused":
            if reason is not None:
                raise ValueError(f"m2rnn.decode_kernel = 'fused': the kernel {reason}")
            return True
        return (reason is None and not platforms.interpret("gpu")
                and not self.axes.splits_anything)

    def _fused_step(self, projected, cache):
        """The fused kernel's ``(gated (B, N, V), state, ring)`` for the float32 in-projection
        ``projected (B, 1, P)``: one kernel from the conv to the gated read-out (at batch 1 each
        kernel's fixed cost counts). It takes the product whole (a slice or a convert would be
        a kernel)."""
        cfg = self.cfg
        conv_bias = None if self.conv_bias is None else self.conv_bias[...]
        return fused_decode.decode_step(
            projected[:, 0], cache["conv"], cache["conv_step"], self.conv_weight[...],
            conv_bias, self.A_log[...], self.dt_bias[...], self.W[...],
            None if self.D is None else self.D[...], cache["state"],
            qkv_heads=(cfg.heads("q"), cfg.heads("k"), cfg.heads("v")),
            gate_heads=cfg.heads("g"), dtype=self.dtype,
            value_silu=cfg.value_activation == "silu")

    def decode_step(self, x, cache, add=None):
        """One token per row: ``x (B, 1, d_model)`` -> ``(y (B, 1, d_model), cache)``."""
        # The product (and bias) in float32, rounded once to the compute dtype on either path.
        projected = self.in_proj(x, out_dtype=jnp.float32)
        if self._decodes_fused():
            gated, state, ring = self._fused_step(projected, cache)
            return self._project_out(gated[:, None], add), {
                "state": state, "conv": ring, "conv_step": cache["conv_step"] + 1}
        qkv_in, f_logits, g = self._split(projected.astype(self.dtype))
        conv_bias = None if self.conv_bias is None else self.conv_bias[...]
        qkv, conv = conv_decode_step(qkv_in, cache, self.conv_weight[...], conv_bias)
        q, k, v = self._activate(*self._heads(qkv.astype(qkv_in.dtype)))
        f = forget_gate(f_logits, self.A_log[...], self.dt_bias[...])
        # One step of the same op through the portable backend: a kernel launch per token
        # would cost more than the step itself.
        y, state = m2rnn(q, k, v, self.W[...].astype(v.dtype), f, cache["state"], backend="scan")
        return self._output(y, v, g, add), {"state": state, **conv}
