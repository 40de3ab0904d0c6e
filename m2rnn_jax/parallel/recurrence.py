"""The M²RNN recurrence split over rows, heads and the sequence, under ``jax.shard_map``.

XLA cannot split the op (a sequential scan or a Pallas call): left to GSPMD it would gather its
inputs onto every device. Here each device runs the op on its own block instead:

* rows (``axes.batch``) and heads (``axes.tensor``) are independent: one op call per shard. A
  tensor with a head count divisible by the tensor axis is split; a tensor with one head (the
  paper's query and key) is replicated, and its gradient is summed over the tensor shards.
* steps (``axes.context``) are not: shard c starts from the final state of shard c - 1
  (``ppermute``), or from zeros where its first step starts a new document (its first segment id
  differs from the last one of shard c - 1), or from the given initial state on shard 0.
  Run naively, shard c would wait for all shards before it. Instead the local rows are cut into
  M micro-batches and pipelined: at tick t shard c runs micro-batch t - c and hands its final
  state to shard c + 1, so after C - 1 ticks all shards are busy; M + C - 1 ticks in all, an
  idle fraction of (C - 1)/(M + C - 1) (``pipeline_idle_fraction``). In the ticks outside its
  M, a shard recomputes a clamped micro-batch whose results are dropped (every device runs the
  same program), so they cost time, not correctness. Memory: the backward keeps the op's
  residuals (inputs, chunk checkpoints) of every tick, (M + C - 1)/M times an unsplit op's.

The backward pass needs nothing of its own: JAX differentiates ``ppermute`` into the reverse
``ppermute``, so each shard's input-state gradient flows back to the shard before it, and the
reverse scan over ticks runs the same pipeline backwards.
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from m2rnn_jax.ops import m2rnn
from m2rnn_jax.parallel.context import (activation_spec, check_split, context_size,
                                        forward_perm, head_axis, shard_map)


def microbatch_count(local_rows: int, requested: int) -> int:
    """Micro-batches the pipeline cuts ``local_rows`` rows into: the largest divisor of
    ``local_rows`` not above ``requested`` (so at most one per row)."""
    top = max(1, min(requested, local_rows))
    return max(count for count in range(1, top + 1) if local_rows % count == 0)


def pipeline_idle_fraction(microbatches: int, context_shards: int) -> float:
    """Share of the pipeline's ticks a context shard waits, ``(C - 1) / (M + C - 1)``: shard c
    idles for c ticks at the start and C - 1 - c at the end of ``M + C - 1``."""
    if microbatches < 1 or context_shards < 1:
        raise ValueError(f"microbatches and context_shards must be positive, got "
                         f"{microbatches} and {context_shards}")
    return (context_shards - 1) / (microbatches + context_shards - 1)


def pipeline_idle_fraction_for(axes, batch: int) -> float:
    """``pipeline_idle_fraction`` of a global batch of ``batch`` rows split over ``axes`` (0
    without a context axis)."""
    rows = max(1, batch // axes.batch_size)
    return pipeline_idle_fraction(microbatch_count(rows, axes.pipeline_microbatches),
                                  context_size(axes))


def m2rnn_in_shard(q, k, v, w, f, input_state=None, gradient_clipping=None, *,
                   segment_ids=None, axes, backend="auto", chunk_size=None):
    """The ``m2rnn`` op on one shard's block, inside ``shard_map`` over ``axes.mesh``.

    Arguments as the op's, local: ``q (b, s, nq, K)`` ... ``input_state (b, n, K, V)`` (read on
    context shard 0 only), ``segment_ids (b, s)``. Returns ``(y (b, s, n, V), final_state)``,
    the state after this shard's last step (the sequence's final state on the last shard).

    Gradient clipping needs no special care: the op clamps the state gradient arriving at its
    last step (its ``final_state`` cotangent), which here is the next shard's input-state
    gradient, itself returned unclamped; that is exactly what the unsplit op clamps between
    these two steps. Where a shard's first step starts a document, its input state is zeroed
    here, which zeroes the gradient sent back, as the unsplit op's reset does.
    """
    op = dict(backend=backend, chunk_size=chunk_size)
    shards = context_size(axes)
    if shards == 1:
        return m2rnn(q, k, v, w, f, input_state, gradient_clipping, segment_ids=segment_ids,
                     **op)

    shard = jax.lax.axis_index(axes.context)
    perm = forward_perm(axes)
    rows, _, _, key_dim = q.shape
    value_dim = v.shape[-1]
    num_heads = max(q.shape[2], k.shape[2], v.shape[2], f.shape[2], w.shape[0])
    count = microbatch_count(rows, axes.pipeline_microbatches)
    per_batch = rows // count
    state_shape = (per_batch, num_heads, key_dim, value_dim)

    # Per row: does this shard's first step continue the previous shard's document?
    continues = jnp.ones((rows,), bool)
    if segment_ids is not None:
        previous_last = jax.lax.ppermute(segment_ids[:, -1], axes.context, perm)
        continues = (shard == 0) | (segment_ids[:, 0] == previous_last)
    first_state = (jnp.zeros((rows,) + state_shape[1:], jnp.float32) if input_state is None
                   else input_state.astype(jnp.float32))

    def micro(x):
        return None if x is None else x.reshape((count, per_batch) + x.shape[1:])

    inputs = tuple(map(micro, (q, k, v, f, segment_ids, continues, first_state)))

    def tick(received, step):
        index = jnp.clip(step - shard, 0, count - 1)
        q_m, k_m, v_m, f_m, ids_m, continues_m, first_m = (
            None if x is None else jax.lax.dynamic_index_in_dim(x, index, keepdims=False)
            for x in inputs)
        state = jnp.where(shard == 0, first_m, received)
        state = jnp.where(continues_m[:, None, None, None], state, 0.0)
        y, final = m2rnn(q_m, k_m, v_m, w, f_m, state, gradient_clipping, segment_ids=ids_m,
                         **op)
        return jax.lax.ppermute(final, axes.context, perm), (y, final)

    ticks = jnp.arange(count + shards - 1)
    _, (ys, finals) = jax.lax.scan(tick, jnp.zeros(state_shape, jnp.float32), ticks)
    # Shard c ran micro-batch m at tick m + c.
    ys, finals = (jax.lax.dynamic_slice_in_dim(x, shard, count, axis=0) for x in (ys, finals))
    return (ys.reshape((rows,) + ys.shape[2:]), finals.reshape((rows,) + finals.shape[2:]))


def recurrence_head_axes(axes, head_counts):
    """``{name: mesh axis or None}`` for the op's tensors from their head counts
    (``{"query": Nq, ...}``; ``"state"`` gets N's); see ``context.head_axis``."""
    out = {name: head_axis(axes, count, name) for name, count in head_counts.items()}
    out["state"] = head_axis(axes, max(head_counts.values()), "the state")
    return out


def sharded_m2rnn(q, k, v, w, f, input_state=None, gradient_clipping=None, *, segment_ids=None,
                  axes, backend="auto", chunk_size=None):
    """``m2rnn_jax.ops.m2rnn`` on global arrays, split over ``axes`` (the module docstring
    says how); the same arguments and results, equal to the unsplit op's."""
    batch, seq_len = q.shape[:2]
    check_split(axes, batch, seq_len, "sharded_m2rnn")
    head = recurrence_head_axes(axes, {"query": q.shape[2], "key": k.shape[2],
                                       "value": v.shape[2], "forget_input": f.shape[2],
                                       "weight": w.shape[0]})
    args = {"q": q, "k": k, "v": v, "w": w, "f": f, "input_state": input_state,
            "segment_ids": segment_ids}
    specs = {"q": activation_spec(axes, head["query"], None),
             "k": activation_spec(axes, head["key"], None),
             "v": activation_spec(axes, head["value"], None),
             "w": PartitionSpec(head["weight"], None, None),
             "f": activation_spec(axes, head["forget_input"]),
             "input_state": PartitionSpec(axes.batch_spec(), head["state"], None, None),
             "segment_ids": activation_spec(axes)}
    present = {name: value for name, value in args.items() if value is not None}

    def body(present):
        y, final = m2rnn_in_shard(
            present["q"], present["k"], present["v"], present["w"], present["f"],
            present.get("input_state"), gradient_clipping,
            segment_ids=present.get("segment_ids"), axes=axes, backend=backend,
            chunk_size=chunk_size)
        return y, final[:, None]

    out_specs = (activation_spec(axes, head["state"], None),
                 activation_spec(axes, head["state"], None, None))
    y, finals = shard_map(body, axes, ({name: specs[name] for name in present},),
                          out_specs)(present)
    # finals (B, C, N, K, V): each context shard's last state; the sequence's is the last one.
    return y, finals[:, -1]
