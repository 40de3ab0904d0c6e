"""Mixture-of-experts MLP: a float32 top-k router over SwiGLU experts, run as grouped matmuls.

``MoE(config, rngs=..., axes=MeshAxes())(x (..., d_model)) -> (y (..., d_model), stats)``,
with ``config.moe`` (``MoEConfig``) giving E = ``num_experts``, k = ``top_k``, the expert width
and an optional shared expert. ``stats = {"aux_loss": scalar, "load": (E,)}`` (float32).

Routing. The router is a linear map d_model -> E computed in float32 (weights and inputs cast
up, full-precision matmul); ``softmax`` gives probabilities p, and each token goes to its k most
probable experts. Their weights are the k probabilities rescaled to sum to 1 (Mixtral style,
so a token's output has the scale of one expert's, whatever k) when
``moe.normalize_top_k`` (the default), else the probabilities as they are. With top_k = 1 and
rescaling the weight is always 1: the router then learns only from the balancing loss, which is
why the switch exists.

Balancing. The Switch/GShard auxiliary loss ``aux_loss = E · Σ_e f_e · P_e``, where f_e is the
fraction of the batch's token-slots (tokens × k) routed to expert e and P_e the mean router
probability of e over the batch's tokens. It is 1 when routing is uniform and grows as it
concentrates; gradients reach the router through P_e only (f_e is a count). We use it rather
than the auxiliary-loss-free bias method because it is stateless (the bias method keeps a
per-expert bias updated outside the gradient step, which the optimizer, checkpoint and
gradient-accumulation paths would all have to carry) and its strength is one documented
coefficient; the caller weights it (``moe.aux_loss_weight``). ``load`` is f (sums to 1).

Dropless. Every token reaches all k of its experts; there is no capacity, so the dropped
fraction is 0 by construction and is not reported.

Experts. Token-slots are sorted by expert and each expert's rows are multiplied by its own
weights with ``jax.lax.ragged_dot`` (group sizes = rows per expert), once for gate and up and
once for down; outputs go back to slot order, are scaled by the routing weights (in float32) and
summed over each token's k slots. The shared expert (``moe.shared_expert_hidden_dim`` > 0) is a
dense SwiGLU every token passes through, added to the routed output.

``ragged_dot`` documents its result only for the rows inside the groups (the first
``sum(group_sizes)``). Where fewer rows are grouped (expert parallelism, below), the rows past
the groups are zeroed both going in and coming out of every grouped matmul, so that neither the
output nor any gradient depends on what the op returns there.

Split tokens. When ``axes`` splits the tokens (batch axes or the context axis) or the experts,
routing, statistics and routed experts run under ``jax.shard_map``, the tokens split as the
residual stream ``(B, S, d_model)`` is: left to XLA, the global sort and top-k over a split
batch would be computed on gathered copies of all tokens on every device. Each device routes
its own tokens; the statistics are summed over the token axes (E numbers), so they are the
whole batch's. Axes that split neither (tensor) hold replicas of the computation. The shared
expert stays outside the ``shard_map`` (XLA splits it like any dense layer). ``MeshAxes()``
(the default) adds no ``shard_map``.

Expert parallelism (``axes.expert`` set): experts split over that axis, E / n per device. Each
device all-gathers its expert group's tokens with their routing (expert ids and weights) over
the axis, runs its local experts on the token-slots routed to them (the other slots sort past
the local groups), and a ``psum_scatter`` sums the partial outputs and hands each device back
the rows of its own tokens: exact and dropless without knowing the routing in advance. We chose
this over an all-to-all for its simplicity and because it moves less data while n < k. Traffic
per device and layer, for T local tokens and n devices on the axis: the all-gather receives
(n-1)·T rows of d_model (plus (n-1)·T·k ids and weights), the reduce-scatter sends (n-1)·T rows
of d_model in the compute dtype; an all-to-all dispatch and its return would move about
k·T·(n-1)/n rows each (equal at n = k). The grouped-matmul buffers hold all n·T·k gathered
slots, any of which may be routed here. When the expert axis does not split the batch, the
tokens are already the same on every device of it: no all-gather, and a ``psum`` combines the
outputs. Each slice of the other token axes exchanges within its own expert group.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from m2rnn_jax.config import MLPConfig
from m2rnn_jax.layers.mlp import SwiGLU
from m2rnn_jax.layers.params import make_param, model_dtypes, normal, out_proj_std
from m2rnn_jax.parallel import MeshAxes


class MoE(nnx.Module):
    """Router, E routed SwiGLU experts and an optional shared expert (see the module docs)."""

    def __init__(self, config, *, rngs: nnx.Rngs, axes: MeshAxes = MeshAxes()):
        """``config`` is a ``ModelConfig`` whose ``moe.num_experts`` > 0."""
        moe = config.moe
        if moe.num_experts < 1:
            raise ValueError(f"MoE needs moe.num_experts >= 1, got {moe.num_experts}")
        if axes.expert is not None and moe.num_experts % axes.size(axes.expert):
            raise ValueError(f"moe.num_experts = {moe.num_experts} must be divisible by the "
                             f"{axes.size(axes.expert)} devices of mesh axis {axes.expert!r}")
        self.dtype, param_dtype = model_dtypes(config)
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.normalize_top_k = moe.normalize_top_k
        self.axes = axes
        d, hidden, experts = config.d_model, moe.expert_hidden_dim, moe.num_experts
        self.router = make_param(normal(rngs.params(), (d, experts), config.init_std,
                                        param_dtype), ("embed", "experts"))
        in_axes, out_axes = ("experts", "embed", "expert_mlp"), ("experts", "expert_mlp", "embed")
        self.gate = make_param(normal(rngs.params(), (experts, d, hidden), config.init_std,
                                      param_dtype), in_axes)
        self.up = make_param(normal(rngs.params(), (experts, d, hidden), config.init_std,
                                    param_dtype), in_axes)
        self.down = make_param(normal(rngs.params(), (experts, hidden, d), out_proj_std(config),
                                      param_dtype), out_axes)
        shared = moe.shared_expert_hidden_dim
        self.shared = (SwiGLU(dataclasses.replace(config, mlp=MLPConfig(hidden_dim=shared)),
                              rngs=rngs) if shared else None)

    def __call__(self, x):
        """``x (..., d_model)`` -> ``(y (..., d_model) in the compute dtype, stats)``."""
        axes = self.axes
        params = (self.router[...], self.gate[...], self.up[...], self.down[...])
        options = dict(top_k=self.top_k, normalize=self.normalize_top_k, dtype=self.dtype)
        if axes.batch or axes.context or axes.expert:
            y, stats = _split_moe(x, params, axes, **options)
        else:
            y, stats = _moe(x, *params, **options)
        if self.shared is not None:
            y = y + self.shared(x).astype(y.dtype)
        return y, stats


def route(tokens, router, top_k, *, normalize=True):
    """Float32 top-k routing of ``tokens (T, d)`` with ``router (d, E)``.

    Returns ``(expert_ids (T, k) int32, weights (T, k) float32, probs (T, E) float32)``.
    """
    logits = jnp.matmul(tokens.astype(jnp.float32), router.astype(jnp.float32),
                        precision=jax.lax.Precision.HIGHEST)
    probs = jax.nn.softmax(logits, axis=-1)
    weights, expert_ids = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return expert_ids.astype(jnp.int32), weights, probs


def _moe(x, router, gate, up, down, *, top_k, normalize, dtype, token_axes=(),
         num_token_shards=1, expert_axis=None, gather=False):
    """Routing, balance statistics and the routed experts on the tokens held here.

    Unsplit by default. Under ``shard_map``: ``token_axes`` split the tokens
    (``num_token_shards`` ways), and ``expert_axis`` splits the experts, with ``gather`` when
    it splits the tokens too (see the module docs).
    """
    d, num_experts_here = x.shape[-1], gate.shape[0]
    tokens = x.reshape(-1, d)
    expert_ids, weights, probs = route(tokens, router, top_k, normalize=normalize)
    num_experts = router.shape[-1]
    counts = jnp.bincount(expert_ids.reshape(-1), length=num_experts).astype(jnp.float32)
    prob_sums = jnp.sum(probs, axis=0)
    if token_axes:
        counts, prob_sums = jax.lax.psum((counts, prob_sums), token_axes)
    num_tokens = tokens.shape[0] * num_token_shards
    load = counts / (num_tokens * top_k)
    stats = {"aux_loss": num_experts * jnp.sum(load * prob_sums / num_tokens), "load": load}

    first_expert = 0
    if expert_axis is not None:
        if gather:
            tokens, expert_ids, weights = (jax.lax.all_gather(a, expert_axis, tiled=True)
                                           for a in (tokens, expert_ids, weights))
        first_expert = jax.lax.axis_index(expert_axis) * num_experts_here
    y = routed_experts(tokens, expert_ids, weights, gate, up, down, first_expert=first_expert,
                       num_experts=num_experts, dtype=dtype)
    if expert_axis is not None:
        y = (jax.lax.psum_scatter(y, expert_axis, scatter_dimension=0, tiled=True) if gather
             else jax.lax.psum(y, expert_axis))
    return y.reshape(x.shape[:-1] + (d,)), stats


def _split_moe(x, params, axes: MeshAxes, **options):
    """``_moe`` under ``jax.shard_map``: tokens split as the residual stream ``(B, S, d)`` is
    (batch axes, context), experts over ``axes.expert`` (see the module docs)."""
    if x.ndim != 3:
        raise ValueError(f"a split MoE takes the residual stream (B, S, d_model), got shape "
                         f"{x.shape}")
    token_axes = tuple(axes.batch) + ((axes.context,) if axes.context else ())
    token_spec = PartitionSpec(axes.batch_spec(), axes.context, None)
    expert_spec = PartitionSpec(axes.expert, None, None)
    body = functools.partial(
        _moe, token_axes=token_axes, expert_axis=axes.expert,
        num_token_shards=math.prod(axes.size(a) for a in token_axes),
        gather=axes.expert is not None and axes.expert in axes.batch, **options)
    return jax.shard_map(
        body, mesh=axes.mesh,
        in_specs=(token_spec, PartitionSpec(), expert_spec, expert_spec, expert_spec),
        out_specs=(token_spec, {"aux_loss": PartitionSpec(), "load": PartitionSpec()}),
    )(x, *params)


def routed_experts(x, expert_ids, weights, gate, up, down, *, first_expert=0,
                   num_experts=None, dtype=None):
    """``Σ_j weights[..., j] · expert_{expert_ids[..., j]}(x)`` over the experts held here.

    ``x (..., d)``, ``expert_ids`` and ``weights (..., k)``; ``gate``, ``up (E_here, d, h)`` and
    ``down (E_here, h, d)`` are experts ``first_expert`` .. ``first_expert + E_here - 1`` (a
    traced ``first_expert`` is fine) of ``num_experts`` (default ``E_here``: all of them); slots
    routed elsewhere contribute 0. Matmuls run in ``dtype`` (default: ``x``'s), the weighted sum
    over slots in float32; the result is in ``dtype``.
    """
    dtype = jnp.dtype(dtype or x.dtype)
    lead, d = x.shape[:-1], x.shape[-1]
    k = expert_ids.shape[-1]
    tokens = x.reshape(-1, d)
    num_slots = tokens.shape[0] * k
    num_here = gate.shape[0]
    here = expert_ids.reshape(-1) - first_expert
    # Slots of other experts get the key num_here, so they sort after every local group.
    key = jnp.where((here >= 0) & (here < num_here), here, num_here)
    # Stable sort of (key, slot index). Not jnp.argsort: under shard_map (jax 0.11.2) its
    # result is typed as the same on every device even when the keys differ, and a gather by
    # it then gets the gradient of a replicated value (summed over devices) - wrong here.
    _, order = jax.lax.sort((key, jnp.arange(num_slots, dtype=key.dtype)), num_keys=1,
                            is_stable=True)
    group_sizes = jnp.bincount(key, length=num_here + 1)[:num_here].astype(jnp.int32)
    # With every expert here, the groups cover every row and nothing needs masking.
    grouped_rows = (None if num_experts in (None, num_here) else
                    (jnp.arange(num_slots) < jnp.sum(group_sizes))[:, None])

    def grouped_matmul(lhs, rhs):
        if grouped_rows is None:
            return jax.lax.ragged_dot(lhs, rhs.astype(dtype), group_sizes)
        # Rows past the groups are zeroed in and out: ragged_dot leaves them unspecified.
        out = jax.lax.ragged_dot(jnp.where(grouped_rows, lhs, 0), rhs.astype(dtype),
                                 group_sizes)
        return jnp.where(grouped_rows, out, 0)

    rows = tokens[order // k].astype(dtype)
    hidden = jax.nn.silu(grouped_matmul(rows, gate)) * grouped_matmul(rows, up)
    out_sorted = grouped_matmul(hidden, down)
    # Back to slot order (token-major, k slots per token), then the weighted sum over slots.
    position = jnp.zeros_like(order).at[order].set(jnp.arange(num_slots, dtype=order.dtype))
    out = out_sorted[position].reshape(-1, k, d).astype(jnp.float32)
    # Elementwise (not a dot), so that it stays float32 on hardware that rounds f32 matmuls.
    y = jnp.sum(out * weights.reshape(-1, k, 1).astype(jnp.float32), axis=1)
    return y.astype(dtype).reshape(*lead, d)
