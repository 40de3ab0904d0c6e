"""Sequence (context) and head (tensor) parallelism placed by the layers: the short causal conv
and softmax attention over a split sequence, and the spec helpers shared with the recurrence
(``recurrence.py``).

Every function comes in two forms: ``*_in_shard`` runs inside a ``jax.shard_map`` over
``axes.mesh`` (manual over all its axes) on the local blocks and places the collectives itself;
``sharded_*`` wraps it in its own ``shard_map`` for callers holding global arrays. Rows are
split over ``axes.batch``, heads over ``axes.tensor`` and steps over ``axes.context``; an axis
of ``None`` is not split.

The shard_maps run with ``check_vma=False``, so that the op's Pallas kernels inside need no
varying-axis annotations. JAX then sums each input's gradient over the mesh axes its spec
leaves out (e.g. over ``tensor`` for a single query head every tensor shard reads), which is
what the computations here need; the tests compare every gradient with the unsplit one.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from m2rnn_jax.layers.conv import causal_depthwise_conv


def head_axis(axes, count, what):
    """The mesh axis that splits ``count`` heads of ``what``: ``axes.tensor`` when its size
    divides ``count``; ``None`` (replicated) without a tensor axis or for a single head.

    Raises ``ValueError`` for any other count: the split would cut a head group.
    """
    ways = axes.size(axes.tensor)
    if ways == 1 or count == 1:
        return None
    if count % ways == 0:
        return axes.tensor
    raise ValueError(f"{what} has {count} heads, which the tensor axis {axes.tensor!r} of size "
                     f"{ways} does not split (a head count must be 1 or a multiple of {ways})")


def context_size(axes) -> int:
    """Shards along the sequence (1 without a context axis)."""
    return axes.size(axes.context)


def check_split(axes, batch, seq_len, what):
    """One-line ``ValueError`` unless the batch axes divide ``batch`` and the context axis
    divides ``seq_len``."""
    if batch % axes.batch_size:
        raise ValueError(f"{what}: batch {batch} is not divisible by the batch axes "
                         f"{axes.batch} ({axes.batch_size} shards)")
    if seq_len % context_size(axes):
        raise ValueError(f"{what}: sequence length {seq_len} is not divisible by the context "
                         f"axis {axes.context!r} ({context_size(axes)} shards)")


def activation_spec(axes, *rest):
    """``PartitionSpec`` of a ``(B, S, ...)`` activation: rows, steps, then ``rest``."""
    return PartitionSpec(axes.batch_spec(), axes.context, *rest)


def forward_perm(axes):
    """``ppermute`` pairs that send each context shard's block to the next one (the last one
    sends nothing; the first receives zeros)."""
    count = context_size(axes)
    return [(shard, shard + 1) for shard in range(count - 1)]


def shard_map(body, axes, in_specs, out_specs):
    """``jax.shard_map`` over ``axes.mesh``, manual over all its axes (see the module note on
    ``check_vma``)."""
    return jax.shard_map(body, mesh=axes.mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)


# --- the causal depthwise conv --------------------------------------------------------------

def causal_conv_in_shard(x, weight, bias, segment_ids, axes):
    """``causal_depthwise_conv`` of one context shard's steps, inside ``shard_map``.

    ``x (b, s, C)`` local, ``weight (K, C)``, ``bias (C,)`` or ``None``, ``segment_ids (b, s)``
    or ``None``. The previous shard's last ``K - 1`` inputs and their segment ids arrive by one
    ``ppermute`` (zeros on shard 0, which is what the unsplit conv pads with), so the result
    equals the unsplit conv's steps of this shard. Needs ``s >= K - 1``.
    """
    history = weight.shape[0] - 1
    if context_size(axes) == 1 or history == 0:
        return causal_depthwise_conv(x, weight, bias, segment_ids)
    if x.shape[1] < history:
        raise ValueError(f"a context shard has {x.shape[1]} steps, fewer than the conv's "
                         f"{history} steps of history; use fewer context shards or longer rows")
    perm = forward_perm(axes)
    halo = jax.lax.ppermute(x[:, -history:], axes.context, perm)
    extended = jnp.concatenate([halo, x], axis=1)
    extended_ids = None
    if segment_ids is not None:
        # On shard 0 the halo holds zeros, so whatever ids it carries add nothing.
        halo_ids = jax.lax.ppermute(segment_ids[:, -history:], axes.context, perm)
        extended_ids = jnp.concatenate([halo_ids, segment_ids], axis=1)
    return causal_depthwise_conv(extended, weight, bias, extended_ids)[:, history:]


def sharded_causal_conv(x, weight, bias=None, segment_ids=None, *, axes):
    """``causal_depthwise_conv`` of global ``x (B, S, C)`` split over ``axes`` (channels over
    ``axes.tensor`` when it divides C); equals the unsplit conv."""
    batch, seq_len, channels = x.shape
    check_split(axes, batch, seq_len, "sharded_causal_conv")
    ways = axes.size(axes.tensor)
    channel_axis = axes.tensor if ways > 1 and channels % ways == 0 else None
    args = {"x": x, "weight": weight, "bias": bias, "segment_ids": segment_ids}
    specs = {"x": activation_spec(axes, channel_axis),
             "weight": PartitionSpec(None, channel_axis), "bias": PartitionSpec(channel_axis),
             "segment_ids": activation_spec(axes)}
    present = {name: value for name, value in args.items() if value is not None}

    def body(present):
        values = {name: present.get(name) for name in args}
        return causal_conv_in_shard(values["x"], values["weight"], values["bias"],
                                    values["segment_ids"], axes)

    return shard_map(body, axes, ({name: specs[name] for name in present},),
                     activation_spec(axes, channel_axis))(present)


# --- attention -------------------------------------------------------------------------------

def attention_head_axes(axes, num_heads, kv_heads):
    """``(query head axis, key/value head axis)``: both ``axes.tensor`` when it divides both
    counts; queries only when it divides ``num_heads`` alone (every tensor shard then holds
    all key/value heads); neither otherwise (heads replicated, computed on every shard)."""
    ways = axes.size(axes.tensor)
    if ways == 1 or num_heads % ways:
        return None, None
    return axes.tensor, (axes.tensor if kv_heads % ways == 0 else None)


def attention_in_shard(q, k, v, segment_ids, axes, *, kv_split=True, implementation=None):
    """Causal attention of one shard's queries over the whole sequence, inside ``shard_map``.

    ``q (b, s, h, D)``, ``k``, ``v (b, s, hkv, D)`` are this shard's steps (and heads);
    ``segment_ids (b, s)`` or ``None``. Keys, values and segment ids are all-gathered over the
    context axis; the mask (causal, same document) comes from global step indices. With
    ``kv_split=False`` the local ``k``/``v`` hold all ``hkv`` heads while ``q`` holds this
    tensor shard's slice of the ``h`` query heads; the matching key/value heads are picked here.
    """
    shards = context_size(axes)
    if not kv_split:
        k, v = (_kv_for_local_queries(x, q.shape[2], axes) for x in (k, v))
    if shards == 1:
        mask = None if segment_ids is None else \
            (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True,
                                            implementation=implementation)
    local_len = q.shape[1]
    k, v = (jax.lax.all_gather(x, axes.context, axis=1, tiled=True) for x in (k, v))
    query_steps = jax.lax.axis_index(axes.context) * local_len + jnp.arange(local_len)
    key_steps = jnp.arange(local_len * shards)
    mask = (key_steps[None, :] <= query_steps[:, None])[None, None]  # (1, 1, s, S)
    if segment_ids is not None:
        all_ids = jax.lax.all_gather(segment_ids, axes.context, axis=1, tiled=True)
        mask = mask & (segment_ids[:, :, None] == all_ids[:, None, :])[:, None]
    # The causal structure is offset by the shard's first step, which is_causal (aligned at
    # step 0) cannot express: the boolean mask carries it.
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)


def _kv_for_local_queries(x, local_heads, axes):
    """All ``hkv`` key/value heads -> those of this tensor shard's ``local_heads`` query heads,
    one per query head (query head i reads key/value head ``i // (h / hkv)``)."""
    total = local_heads * axes.size(axes.tensor)
    expanded = jnp.repeat(x, total // x.shape[2], axis=2)
    start = jax.lax.axis_index(axes.tensor) * local_heads
    return jax.lax.dynamic_slice_in_dim(expanded, start, local_heads, axis=2)


def sharded_attention(q, k, v, segment_ids=None, *, axes, implementation=None):
    """Causal softmax attention (grouped key/value heads, packed documents) of global
    ``q (B, S, h, D)``, ``k``, ``v (B, S, hkv, D)`` split over ``axes``; equals
    ``jax.nn.dot_product_attention(q, k, v, mask=same document, is_causal=True)``.

    Each context shard all-gathers the keys, values and segment ids of the whole sequence and
    attends with its own queries under a mask from global step indices. Chosen over a ring
    (blocks passed shard to shard, partial softmaxes merged) because it is one collective per
    tensor, which XLA schedules and overlaps itself, keeps the attention a single fused call
    (cuDNN or XLA), and is exact with no online-softmax merging. Its costs: per device the keys
    and values of all S steps (``2·b·S·hkv·D`` values; grouped key/value heads keep this small)
    and a ``(s, S)`` score block per head instead of ``(s, s)`` blocks one at a time; per layer,
    ``(C - 1)/C`` of the keys and values cross the context axis (forward all-gather, backward
    reduce-scatter of their gradients), the same bytes a ring moves; and the causal skip of a
    flash kernel is lost (the mask is explicit), while the dense XLA path computes the full
    score matrix anyway, spread evenly over the shards. A ring wins when S·hkv·D per device no
    longer fits or the all-gather cannot be hidden behind the projections.

    RoPE, when used, is applied before (positions from the whole ``segment_ids``).
    """
    batch, seq_len, num_heads, _ = q.shape
    kv_heads = k.shape[2]
    check_split(axes, batch, seq_len, "sharded_attention")
    q_axis, kv_axis = attention_head_axes(axes, num_heads, kv_heads)
    kv_split = kv_axis is not None or q_axis is None
    args = {"q": q, "k": k, "v": v, "segment_ids": segment_ids}
    specs = {"q": activation_spec(axes, q_axis, None), "k": activation_spec(axes, kv_axis, None),
             "v": activation_spec(axes, kv_axis, None), "segment_ids": activation_spec(axes)}
    present = {name: value for name, value in args.items() if value is not None}

    def body(present):
        return attention_in_shard(present["q"], present["k"], present["v"],
                                  present.get("segment_ids"), axes, kv_split=kv_split,
                                  implementation=implementation)

    return shard_map(body, axes, ({name: specs[name] for name in present},),
                     activation_spec(axes, q_axis, None))(present)
