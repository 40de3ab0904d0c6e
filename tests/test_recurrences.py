"""The baselines' recurrence ops (``m2rnn_jax.recurrences``): the chunked op against its scan and
both against float64 NumPy loops, with packed documents and an initial state; gradients of the
op against the scan's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m2rnn_jax.recurrences import (diagonal_ssm, diagonal_ssm_scan, gated_delta_rule,
                                   gated_delta_rule_scan)

BATCH, SEQ_LEN = 2, 13
# Row 0: documents of 5 + 8 steps; row 1: 4 + 3 + 6. With chunks of 4 or 5, documents start
# both inside a chunk and on a chunk's first step.
SEGMENT_IDS = np.array([[0] * 5 + [1] * 8, [2] * 4 + [3] * 3 + [4] * 6], np.int32)
CHUNK_SIZES = (4, 5, 64)  # divides S, does not, and longer than S


def starts_document(segment_ids, b, t):
    return segment_ids is not None and t > 0 and segment_ids[b, t] != segment_ids[b, t - 1]


def gated_delta_numpy(q, k, v, log_alpha, beta, segment_ids, initial_state):
    """Per row, head and step with the explicit transition matrix α (I - β k kᵀ)."""
    q, k, v, log_alpha, beta = (np.asarray(a, np.float64) for a in (q, k, v, log_alpha, beta))
    batch, seq_len, heads, key_dim = q.shape
    o = np.zeros(v.shape)
    final = np.zeros((batch, heads, key_dim, v.shape[-1]))
    for b in range(batch):
        for h in range(heads):
            state = np.asarray(initial_state[b, h], np.float64)
            for t in range(seq_len):
                if starts_document(segment_ids, b, t):
                    state = np.zeros_like(state)
                kt = k[b, t, h]
                transition = np.exp(log_alpha[b, t, h]) * (
                    np.eye(key_dim) - beta[b, t, h] * np.outer(kt, kt))
                state = transition @ state + beta[b, t, h] * np.outer(kt, v[b, t, h])
                o[b, t, h] = state.T @ q[b, t, h]
            final[b, h] = state
    return o, final


def diagonal_ssm_numpy(x, dt, log_decay, B, C, segment_ids, initial_state):
    """Per row, head and step: ``S = a S + dt B xᵀ``, ``y = Sᵀ C``."""
    x, dt, log_decay, B, C = (np.asarray(a, np.float64) for a in (x, dt, log_decay, B, C))
    batch, seq_len, heads, head_dim = x.shape
    y = np.zeros(x.shape)
    final = np.zeros((batch, heads, B.shape[-1], head_dim))
    for b in range(batch):
        for h in range(heads):
            state = np.asarray(initial_state[b, h], np.float64)
            for t in range(seq_len):
                if starts_document(segment_ids, b, t):
                    state = np.zeros_like(state)
                state = np.exp(log_decay[b, t, h]) * state \
                    + dt[b, t, h] * np.outer(B[b, t, h], x[b, t, h])
                y[b, t, h] = state.T @ C[b, t, h]
            final[b, h] = state
    return y, final


def gated_delta_inputs(seed, heads=2, key_dim=4, value_dim=3):
    rng = np.random.default_rng(seed)
    shape = (BATCH, SEQ_LEN, heads)
    q = rng.standard_normal(shape + (key_dim,))
    k = rng.standard_normal(shape + (key_dim,))
    k /= np.linalg.norm(k, axis=-1, keepdims=True)  # as the layer feeds it: bounded states
    v = rng.standard_normal(shape + (value_dim,))
    log_alpha = -rng.uniform(0.0, 3.0, shape)  # strong and weak decays
    beta = rng.uniform(0.0, 1.0, shape)
    h0 = rng.standard_normal((BATCH, heads, key_dim, value_dim))
    return tuple(a.astype(np.float32) for a in (q, k, v, log_alpha, beta)), h0.astype(np.float32)


def diagonal_ssm_inputs(seed, heads=3, head_dim=4, state_dim=5):
    rng = np.random.default_rng(seed)
    shape = (BATCH, SEQ_LEN, heads)
    x = rng.standard_normal(shape + (head_dim,))
    dt = rng.uniform(0.01, 2.0, shape)
    log_decay = -rng.uniform(0.0, 3.0, shape)
    B = rng.standard_normal(shape + (state_dim,))
    C = rng.standard_normal(shape + (state_dim,))
    h0 = rng.standard_normal((BATCH, heads, state_dim, head_dim))
    return tuple(a.astype(np.float32) for a in (x, dt, log_decay, B, C)), h0.astype(np.float32)


CASES = {
    "gated_delta": (gated_delta_rule, gated_delta_rule_scan, gated_delta_numpy,
                    gated_delta_inputs),
    "diagonal_ssm": (diagonal_ssm, diagonal_ssm_scan, diagonal_ssm_numpy, diagonal_ssm_inputs),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("packed", [False, True])
def test_op_and_scan_match_float64_numpy(name, packed):
    op, scan, numpy_loop, make_inputs = CASES[name]
    args, h0 = make_inputs(seed=1 if packed else 2)
    segment_ids = SEGMENT_IDS if packed else None
    want_out, want_final = numpy_loop(*args, segment_ids, h0)
    assert np.abs(want_out).max() > 0.1 and np.abs(want_final).max() > 0.1
    seg = None if segment_ids is None else jnp.asarray(segment_ids)
    got = [jax.jit(scan)(*args, segment_ids=seg, initial_state=h0)]
    got += [jax.jit(op, static_argnames="chunk_size")(*args, segment_ids=seg, initial_state=h0,
                                                      chunk_size=chunk)
            for chunk in CHUNK_SIZES]
    for out, final in got:
        assert out.dtype == jnp.float32 and final.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out), want_out, rtol=1e-4, atol=2e-5)
        np.testing.assert_allclose(np.asarray(final), want_final, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_zero_initial_state_is_the_default(name):
    op, scan, _, make_inputs = CASES[name]
    args, h0 = make_inputs(seed=3)
    seg = jnp.asarray(SEGMENT_IDS)
    zeros = np.zeros_like(h0)
    for fn in (scan, lambda *a, **kw: op(*a, chunk_size=5, **kw)):
        default = jax.jit(lambda *a: fn(*a, segment_ids=seg))(*args)
        explicit = jax.jit(lambda *a: fn(*a, segment_ids=seg, initial_state=zeros))(*args)
        for a, b in zip(default, explicit):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", sorted(CASES))
def test_op_gradients_match_the_scan(name):
    """Gradients of a random linear function of (outputs, final state) with respect to every
    input and the initial state."""
    op, scan, _, make_inputs = CASES[name]
    args, h0 = make_inputs(seed=4)
    seg = jnp.asarray(SEGMENT_IDS)
    rng = np.random.default_rng(5)
    out_shape = jax.eval_shape(lambda *a: scan(*a, segment_ids=seg, initial_state=h0), *args)
    weights = [rng.standard_normal(s.shape).astype(np.float32) for s in out_shape]

    def loss(fn):
        def f(args, h0):
            out, final = fn(*args, segment_ids=seg, initial_state=h0)
            return jnp.sum(out * weights[0]) + jnp.sum(final * weights[1])
        return jax.jit(jax.grad(f, argnums=(0, 1)))

    want = loss(scan)(args, h0)
    got = loss(lambda *a, **kw: op(*a, chunk_size=5, **kw))(args, h0)
    for path, g, w in zip(range(len(args) + 1), jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.abs(np.asarray(w)).max() > 1e-3, path
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-4,
                                   err_msg=f"gradient of input {path}")


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_shapes_name_the_argument(name):
    op, scan, _, make_inputs = CASES[name]
    args, h0 = make_inputs(seed=6)
    second = "k" if name == "gated_delta" else "dt"
    bad = (args[0], args[1][:, :-1]) + args[2:]
    for fn in (op, scan):
        with pytest.raises(ValueError, match=rf"\b{second} must have shape"):
            fn(*bad)
        with pytest.raises(ValueError, match="segment_ids must have shape"):
            fn(*args, segment_ids=jnp.zeros((BATCH, SEQ_LEN + 1), jnp.int32))
        with pytest.raises(ValueError, match="initial_state must have shape"):
            fn(*args, initial_state=h0[:, :1])
