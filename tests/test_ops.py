"""The public op with the scan backend against the independent float64 NumPy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference
from numpy_reference import relative_error
from m2rnn_jax import m2rnn
from m2rnn_jax.ops import keep_mask as m2rnn_keep_mask

jax.config.update("jax_default_matmul_precision", "highest")


def random_inputs(rng, batch, seq_len, heads, key_dim, value_dim, with_state=True, segments=False):
    """heads = (Nq, Nk, Nv, Nw, Nf); forget values spread over (0.05, 0.99)."""
    nq, nk, nv, nw, nf = heads
    num_heads = max(heads)
    inputs = dict(
        query=rng.normal(size=(batch, seq_len, nq, key_dim)),
        key=rng.normal(size=(batch, seq_len, nk, key_dim)) / np.sqrt(key_dim),
        value=rng.normal(size=(batch, seq_len, nv, value_dim)),
        weight=rng.normal(size=(nw, value_dim, value_dim)) / np.sqrt(value_dim) + np.eye(value_dim),
        forget_input=rng.uniform(0.05, 0.99, size=(batch, seq_len, nf)),
        input_state=rng.normal(size=(batch, num_heads, key_dim, value_dim)) if with_state else None,
    )
    inputs = {k: None if v is None else v.astype(np.float32) for k, v in inputs.items()}
    segment_ids = None
    if segments:
        # Random document boundaries, several per row, different per row.
        starts = rng.random((batch, seq_len)) < 0.15
        starts[:, 0] = False
        segment_ids = np.cumsum(starts, axis=1).astype(np.int32)
    return inputs, segment_ids


CASES = [
    # (batch, seq_len, (Nq, Nk, Nv, Nw, Nf), K, V, initial state, segments, chunk)
    pytest.param(2, 37, (1, 1, 4, 4, 4), 8, 4, True, False, 8, id="paper-grouping-S-not-multiple"),
    pytest.param(1, 20, (2, 4, 4, 2, 1), 5, 3, False, False, 6, id="mixed-groups-odd-KV"),
    pytest.param(3, 29, (3, 3, 3, 3, 3), 7, 5, True, True, 4, id="segments-with-state"),
    pytest.param(2, 16, (1, 2, 2, 1, 2), 4, 6, False, True, 16, id="segments-one-chunk"),
]


@pytest.mark.parametrize("batch,seq_len,heads,key_dim,value_dim,with_state,segments,chunk", CASES)
@pytest.mark.parametrize("clip", [None, 0.05])
def test_scan_matches_float64_numpy(batch, seq_len, heads, key_dim, value_dim, with_state,
                                    segments, chunk, clip):
    rng = np.random.default_rng([seq_len, key_dim, int(clip is None)])
    inputs, segment_ids = random_inputs(rng, batch, seq_len, heads, key_dim, value_dim,
                                        with_state, segments)
    num_heads = max(heads)
    dy = rng.normal(size=(batch, seq_len, num_heads, value_dim))
    dh = rng.normal(size=(batch, num_heads, key_dim, value_dim))
    names = [n for n, x in inputs.items() if x is not None]

    def run(*arrays):
        kw = dict(zip(names, arrays))
        return m2rnn(**kw, gradient_clipping=clip, chunk_size=chunk, backend="scan",
                     segment_ids=None if segment_ids is None else jnp.asarray(segment_ids))

    (y, final), vjp = jax.vjp(run, *(inputs[n] for n in names))
    grads = dict(zip(names, vjp((jnp.asarray(dy, jnp.float32), jnp.asarray(dh, jnp.float32)))))

    y_ref, final_ref, _ = numpy_reference.forward(
        inputs["query"], inputs["key"], inputs["value"], inputs["weight"],
        inputs["forget_input"], inputs["input_state"], segment_ids)
    ref_grads = numpy_reference.backward(
        inputs["query"], inputs["key"], inputs["value"], inputs["weight"],
        inputs["forget_input"], dy, dh, inputs["input_state"], segment_ids, clip)
    assert y.shape == y_ref.shape and y.dtype == jnp.float32
    assert relative_error(y, y_ref) < 1e-4
    assert relative_error(final, final_ref) < 1e-4
    for name, ref in zip(("query", "key", "value", "weight", "forget_input", "input_state"),
                         ref_grads):
        if name in grads:
            assert grads[name].shape == inputs[name].shape
            assert relative_error(grads[name], ref) < 1e-4, name


def test_clipping_changes_gradients_and_matches_the_kernel_rule():
    """With a small clip the gradients differ from unclipped ones, and match the rule that
    clamps only the gradient arriving from later steps (not the total)."""
    rng = np.random.default_rng(7)
    inputs, _ = random_inputs(rng, 1, 24, (1, 1, 2, 2, 2), 6, 4, with_state=True)
    dy = rng.normal(size=(1, 24, 2, 4)) * 3
    dh = rng.normal(size=(1, 2, 6, 4)) * 3
    args = [inputs[n] for n in ("query", "key", "value", "weight", "forget_input", "input_state")]

    def grads(clip):
        def run(*a):
            return m2rnn(*a, gradient_clipping=clip, backend="scan", chunk_size=8)
        _, vjp = jax.vjp(run, *args)
        return vjp((jnp.asarray(dy, jnp.float32), jnp.asarray(dh, jnp.float32)))

    clipped, unclipped = grads(0.02), grads(None)
    assert relative_error(clipped[3], unclipped[3]) > 1e-2  # dW really changes
    kernel_rule = numpy_reference.backward(*args[:5], dy, dh, args[5], None, 0.02)
    assert relative_error(clipped[3], kernel_rule[3]) < 1e-4
    # The other rule (clamp the total state gradient) gives different gradients: a wrong rule fails.
    total_rule = _clip_total_state_gradient_dw(*args, dy, dh, 0.02)
    assert relative_error(total_rule, kernel_rule[3]) > 1e-2


def _clip_total_state_gradient_dw(q, k, v, w, f, h0, dy, dh, clip):
    """dW under the *other* rule: clamp the whole gradient of H_t (read-out included)."""
    num_heads = dy.shape[2]
    _, _, states = numpy_reference.forward(q, k, v, w, f, h0)
    dw = np.zeros_like(w, dtype=np.float64)
    for n in range(num_heads):
        g_later = dh[0, n].astype(np.float64)
        for t in range(q.shape[1] - 1, -1, -1):
            h_prev = states[0, t, n]
            wn = w[n * w.shape[0] // num_heads].astype(np.float64)
            z = np.tanh(h_prev @ wn + np.outer(k[0, t, 0], v[0, t, n]))
            g = np.clip(g_later + np.outer(q[0, t, 0], dy[0, t, n]), -clip, clip)
            du = (1 - f[0, t, n]) * g * (1 - z * z)
            dw[n * w.shape[0] // num_heads] += h_prev.T @ du
            g_later = f[0, t, n] * g + du @ wn.T
    return dw


def test_bf16_inputs_short_sequence_close_to_float32():
    rng = np.random.default_rng(3)
    inputs, _ = random_inputs(rng, 2, 64, (1, 1, 4, 4, 4), 16, 8)
    bf16 = {k: jnp.asarray(v, jnp.bfloat16) for k, v in inputs.items()}
    # Same (bf16-rounded) values in float32: only the bf16 path's own rounding may differ.
    y32, h32 = m2rnn(**{k: v.astype(jnp.float32) for k, v in bf16.items()}, backend="scan")
    y16, h16 = m2rnn(**bf16, backend="scan")
    assert y16.dtype == jnp.bfloat16 and h16.dtype == jnp.float32
    assert relative_error(y16, y32) < 1e-2
    assert relative_error(h16, h32) < 1e-4  # the state is carried in float32


def test_chunked_backward_memory_at_400m_layer_shape():
    """B=2, S=4096, N=84, K=64, V=16: forward+backward temporaries stay under 1 GiB (autodiff of
    a plain scan would keep all S states: 2*4096*84*64*16*4 bytes = 2.6 GiB for H alone)."""
    batch, seq_len, num_heads, key_dim, value_dim = 2, 4096, 84, 64, 16
    shapes = dict(
        query=(batch, seq_len, 1, key_dim), key=(batch, seq_len, 1, key_dim),
        value=(batch, seq_len, num_heads, value_dim), weight=(num_heads, value_dim, value_dim),
        forget_input=(batch, seq_len, num_heads))
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes.values()]

    def loss(*a):
        y, h = m2rnn(*a, gradient_clipping=1.0, backend="scan")
        return jnp.sum(y.astype(jnp.float32)) + jnp.sum(h)

    compiled = jax.jit(jax.grad(loss, argnums=tuple(range(5)))).lower(*args).compile()
    stats = compiled.memory_analysis()
    temp_gib = stats.temp_size_in_bytes / 2**30
    print(f"scan fwd+bwd temporaries at 2x4096x84: {temp_gib:.3f} GiB")
    assert 0 < temp_gib < 1.0


@pytest.mark.parametrize("change,message", [
    (dict(query=np.zeros((2, 8, 1, 4, 1))), "query must have shape"),
    (dict(key=np.zeros((2, 8, 1, 5))), "key must have shape"),
    (dict(value=np.zeros((2, 8, 3, 3))), "does not divide N"),
    (dict(weight=np.zeros((4, 3, 2))), "weight must have shape"),
    (dict(forget_input=np.zeros((2, 7, 4))), "forget_input must have shape"),
    (dict(forget_input=np.full((2, 8, 4), 1.5)), "forget_input must lie in"),
    (dict(input_state=np.zeros((2, 4, 4, 2))), "input_state must have shape"),
    (dict(query=np.zeros((2, 8, 1, 4), np.int32)), "query must have a floating dtype"),
    (dict(gradient_clipping=-1.0), "gradient_clipping"),
    (dict(segment_ids=np.zeros((2, 7), np.int32)), "segment_ids must have shape"),
    (dict(segment_ids=np.zeros((2, 8), np.float32)), "segment_ids must have an integer dtype"),
    (dict(backend="cuda"), "backend must be one of"),
])
def test_bad_inputs_raise_clear_errors(change, message):
    args = dict(query=np.ones((2, 8, 1, 4), np.float32), key=np.ones((2, 8, 1, 4), np.float32),
                value=np.ones((2, 8, 4, 3), np.float32), weight=np.ones((4, 3, 3), np.float32),
                forget_input=np.full((2, 8, 4), 0.5, np.float32))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        m2rnn(**args)


def test_jit_and_auto_backend_on_cpu_match_scan():
    rng = np.random.default_rng(11)
    inputs, segment_ids = random_inputs(rng, 2, 19, (1, 1, 2, 2, 2), 4, 4, segments=True)
    eager = m2rnn(**inputs, segment_ids=jnp.asarray(segment_ids), backend="scan")
    jitted = jax.jit(lambda i, s: m2rnn(**i, segment_ids=s))(inputs, jnp.asarray(segment_ids))
    for a, b in zip(eager, jitted):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["grouped-segments-with-state", "odd-shapes-no-state"])
def test_state_noise_of_zero_matches_float64_numpy(case):
    """The noisy recurrence's own path (a scan differentiated by JAX, the clipping rule as a
    clamp on the carried state's cotangent) at std 0: values and gradients as the float64
    reference, clipping active."""
    from m2rnn_jax import reference
    batch, seq_len, heads, key_dim, value_dim, with_state, segments = {
        "grouped-segments-with-state": (2, 13, (1, 1, 2, 2, 2), 4, 3, True, True),
        "odd-shapes-no-state": (1, 9, (2, 1, 2, 2, 1), 5, 3, False, False)}[case]
    rng = np.random.default_rng(len(case))
    inputs, segment_ids = random_inputs(rng, batch, seq_len, heads, key_dim, value_dim,
                                        with_state, segments)
    n = max(heads)
    dy = rng.normal(size=(batch, seq_len, n, value_dim))
    dh = rng.normal(size=(batch, n, key_dim, value_dim))
    keep = None if segment_ids is None else m2rnn_keep_mask(jnp.asarray(segment_ids))
    h0 = inputs["input_state"]
    h0 = jnp.zeros((batch, n, key_dim, value_dim)) if h0 is None else h0
    names = ("query", "key", "value", "weight", "forget_input")

    def run(*arrays):
        return reference.noisy_forward(*arrays, keep, noise_key=jax.random.key(0),
                                       noise_std=0.0, gradient_clipping=0.05)

    (y, final), vjp = jax.vjp(run, *(inputs[x] for x in names), h0)
    grads = vjp((jnp.asarray(dy, jnp.float32), jnp.asarray(dh, jnp.float32)))
    args = [inputs[x] for x in names]
    y_ref, final_ref, _ = numpy_reference.forward(*args, inputs["input_state"], segment_ids)
    ref_grads = numpy_reference.backward(*args, dy, dh, inputs["input_state"], segment_ids, 0.05)
    assert relative_error(y, y_ref) < 1e-4 and relative_error(final, final_ref) < 1e-4
    for name, got, want in zip(names + ("input_state",), grads, ref_grads):
        assert relative_error(got, want) < 1e-4, name


def test_state_noise_is_added_to_the_state_after_every_step():
    """With std > 0 the op's output is the recurrence whose state gets std·ε_t after step t
    (ε from the key, as the docstring says), checked by a NumPy loop; the same key gives the
    same output, another key another; std 0 is the noiseless op."""
    rng = np.random.default_rng(5)
    inputs, _ = random_inputs(rng, 2, 7, (1, 1, 2, 2, 2), 3, 4, with_state=True)
    args = [inputs[x] for x in ("query", "key", "value", "weight", "forget_input",
                                "input_state")]
    key, std = jax.random.key(11), 0.3
    y, final = m2rnn(*args, backend="scan", state_noise=(key, std))
    eps = [np.asarray(jax.random.normal(k, (2, 2, 3, 4))) for k in jax.random.split(key, 7)]
    q, k, v, w, f, h = (np.asarray(x, np.float64) for x in args)
    for t in range(7):
        z = np.tanh(np.einsum("bnkv,nvw->bnkw", h, w)
                    + k[:, t, 0, None, :, None] * v[:, t, :, None, :])
        ft = f[:, t, :, None, None]
        h = ft * h + (1 - ft) * z + std * eps[t]
        assert relative_error(y[:, t], np.einsum("bnkv,bk->bnv", h, q[:, t, 0])) < 1e-5, t
    assert relative_error(final, h) < 1e-5
    again, _ = m2rnn(*args, backend="scan", state_noise=(key, std))
    np.testing.assert_array_equal(np.asarray(again), np.asarray(y))
    other, _ = m2rnn(*args, backend="scan", state_noise=(jax.random.key(12), std))
    assert relative_error(other, y) > 1e-2
    clean, _ = m2rnn(*args, backend="scan")
    zero, _ = m2rnn(*args, backend="scan", state_noise=(key, 0.0))
    np.testing.assert_array_equal(np.asarray(zero), np.asarray(clean))
    for bad, match in (((key,), "pair"), ((key, -1.0), "non-negative"),
                       ((np.zeros(3), 0.1), "PRNG key")):
        with pytest.raises(ValueError, match=match):
            m2rnn(*args, backend="scan", state_noise=bad)
