"""The public op: the scan backend against the independent float64 NumPy loop, argument checks,
and the backend contract and table through which the op reaches every backend."""

import inspect
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_reference
from numpy_reference import relative_error
from m2rnn_jax import m2rnn, ops, reference
from m2rnn_jax.segments import keep_mask
from pallas_kernels.m2rnn.contract import Backend

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
    assert relative_error(h16, h32) < 1e-4  # the state is float32


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


def _parameters(fn, drop_self=False):
    """(name, kind, default) of each parameter: what a caller relies on."""
    params = list(inspect.signature(fn).parameters.values())[1 if drop_self else 0:]
    return [(p.name, p.kind, p.default) for p in params]


@pytest.mark.parametrize("name", list(ops.BACKEND_MODULES))
def test_every_backend_keeps_the_contract(name):
    """Each registered backend module has the contract's functions with its exact parameters
    (no backend-specific extras the op would have to know about) and a sensible default
    chunk; ``supports`` takes shapes and dtypes only."""
    module = ops.backend_module(name)
    assert isinstance(module, Backend), name
    for function in ("supports", "choose_chunk_size", "forward", "backward"):
        assert _parameters(getattr(module, function)) == _parameters(
            getattr(Backend, function), drop_self=True), (name, function)
    assert isinstance(module.DEFAULT_CHUNK_SIZE, int) and module.DEFAULT_CHUNK_SIZE >= 8
    assert module.choose_chunk_size(4096, None) == module.DEFAULT_CHUNK_SIZE
    spec = jax.ShapeDtypeStruct
    shapes = [spec((2, 8, 1, 1), jnp.float32), spec((2, 8, 1, 1), jnp.float32),
              spec((2, 8, 2, 4), jnp.float32), spec((2, 4, 4), jnp.float32),
              spec((2, 8, 2), jnp.float32), spec((2, 2, 1, 4), jnp.float32)]
    reason = module.supports(*shapes)
    assert reason is None or (isinstance(reason, str) and "\n" not in reason)


# The contract's chunk rule at S = 1000: each backend's chunk for a request (None: its default).
CHUNKS_AT_S_1000 = {
    "scan": {None: 64, 12: 12, 48: 48, 100: 100},
    "pallas_gpu": {None: 64, 12: 16, 48: 48, 100: 104},
    "pallas_gpu_vector": {None: 64, 12: 12, 48: 48, 100: 100},
    "mosaic_gpu": {None: 16, 12: 16, 48: 48, 100: 112},
    "pallas_tpu": {None: 32, 12: 16, 48: 64, 100: 128},
}


def test_the_chunk_tables_name_every_backend():
    assert set(CHUNKS_AT_S_1000) == set(ops.BACKEND_MODULES)
    assert set(ROUNDED_CHUNK_CASES) == set(ops.BACKEND_MODULES) - {"scan"}


@pytest.mark.parametrize("name", list(ops.BACKEND_MODULES))
def test_one_chunk_rule_for_every_backend(name):
    """Every positive request is honoured: capped at S and rounded up to a size the backend
    runs (a chunk it chose is one it keeps), never shorter than asked (or than S), never longer
    than S rounded up the same way."""
    module = ops.backend_module(name)
    table = CHUNKS_AT_S_1000[name]
    assert {request: module.choose_chunk_size(1000, request) for request in table} == table
    for seq_len in (1, 5, 13, 20, 40, 1000, 4096):
        longest = module.choose_chunk_size(seq_len, seq_len)
        assert seq_len <= longest < seq_len + 128
        for requested in (None, 1, 3, 8, 12, 31, 48, 64, 100, 300, 5000):
            chunk = module.choose_chunk_size(seq_len, requested)
            asked = min(module.DEFAULT_CHUNK_SIZE if requested is None else requested, seq_len)
            assert asked <= chunk <= longest, (seq_len, requested, chunk)
            assert module.choose_chunk_size(seq_len, chunk) == chunk, (seq_len, requested)


# backend -> (K, V, dtype, tolerance against the scan on the same inputs)
ROUNDED_CHUNK_CASES = {
    "pallas_gpu": (4, 4, jnp.float32, 1e-4),
    "pallas_gpu_vector": (1, 4, jnp.float32, 1e-4),
    "mosaic_gpu": (64, 16, jnp.bfloat16, 1e-2),
    "pallas_tpu": (4, 4, jnp.float32, 1e-4),
}


@pytest.mark.parametrize("name", list(ROUNDED_CHUNK_CASES))
def test_a_rounded_chunk_request_gives_the_scans_results(name):
    """``chunk_size=12`` at S = 20 runs on every backend (rounded up to 16 where 12 is not a
    size the kernels run): y, the final state and every gradient match the scan's with the
    same request, segment resets and active clipping included."""
    key_dim, value_dim, dtype, tolerance = ROUNDED_CHUNK_CASES[name]
    inputs, segment_ids = random_inputs(np.random.default_rng(5), 1, 20, (1, 1, 2, 2, 2),
                                        key_dim, value_dim, segments=True)
    args = [jnp.asarray(x, dtype if n != "input_state" else jnp.float32)
            for n, x in inputs.items()]
    rng = np.random.default_rng(6)
    cotangents = (jnp.asarray(rng.normal(size=(1, 20, 2, value_dim)), dtype),
                  jnp.asarray(rng.normal(size=(1, 2, key_dim, value_dim)), jnp.float32))

    def outputs_and_grads(backend):
        def op(*xs):
            return m2rnn(*xs, 0.5, segment_ids=jnp.asarray(segment_ids), backend=backend,
                         chunk_size=12)

        out, vjp = jax.vjp(op, *args)
        return [*out, *vjp(cotangents)]

    got, want = outputs_and_grads(name), outputs_and_grads("scan")
    names = ("y", "state", "dq", "dk", "dv", "dw", "df", "dh0")
    errors = {n: relative_error(g, w) for n, g, w in zip(names, got, want)}
    assert all(g.shape == w.shape and g.dtype == w.dtype for g, w in zip(got, want))
    assert max(errors.values()) < tolerance, errors


def test_keep_mask_marks_document_starts():
    ids = jnp.asarray([[0, 0, 1, 1, 1, 2], [3, 4, 4, 4, 4, 4]], jnp.int32)
    np.testing.assert_array_equal(keep_mask(ids), [[1, 1, 0, 1, 1, 0], [1, 0, 1, 1, 1, 1]])
    assert keep_mask(ids).dtype == jnp.float32
    assert keep_mask(None) is None  # the op passes no mask to its backends
    np.testing.assert_array_equal(keep_mask(None, (2, 3)), np.ones((2, 3)))


def test_the_table_is_the_dispatch(monkeypatch):
    """Whatever module the table names for a backend is what the op runs: the chunk choice,
    the forward (without checkpoints outside differentiation, with them under it) and the
    backward, with the contract's arguments."""
    calls = []

    class Recording(types.ModuleType):
        DEFAULT_CHUNK_SIZE = 8

        def supports(self, q, k, v, w, f, h0):
            return None

        def choose_chunk_size(self, seq_len, requested):
            calls.append(("choose_chunk_size", seq_len, requested))
            return 8

        def forward(self, q, k, v, w, f, h0, keep, *, chunk_size, save_checkpoints):
            calls.append(("forward", q.shape[1], chunk_size, save_checkpoints, h0.dtype))
            return reference.forward(q, k, v, w, f, h0, keep, chunk_size=chunk_size,
                                     save_checkpoints=save_checkpoints)

        def backward(self, q, k, v, w, f, h0, keep, checkpoints, dy, dh_final, *,
                     gradient_clipping, chunk_size):
            calls.append(("backward", gradient_clipping, chunk_size))
            return reference.backward(q, k, v, w, f, h0, keep, checkpoints, dy, dh_final,
                                      gradient_clipping=gradient_clipping, chunk_size=chunk_size)

    monkeypatch.setitem(sys.modules, "recording_backend", Recording("recording_backend"))
    monkeypatch.setitem(ops.BACKEND_MODULES, "scan", "recording_backend")
    ops.backend_module.cache_clear()
    try:
        inputs, _ = random_inputs(np.random.default_rng(2), 1, 13, (1, 1, 2, 2, 2), 3, 4)
        args = [inputs[n] for n in ("query", "key", "value", "weight", "forget_input")]
        y, _ = m2rnn(*args, backend="scan")
        assert y.shape == (1, 13, 2, 4)
        jax.grad(lambda *a: jnp.sum(m2rnn(*a, None, 0.5, backend="scan")[0]))(*args)
    finally:
        ops.backend_module.cache_clear()
    assert calls == [("choose_chunk_size", 13, None), ("forward", 16, 8, False, jnp.float32),
                     ("choose_chunk_size", 13, None), ("forward", 16, 8, True, jnp.float32),
                     ("backward", 0.5, 8)]


def test_auto_picks_by_platform_and_support(monkeypatch):
    """``"auto"``: on a GPU the Mosaic kernels where ``supports`` accepts the inputs (only on a
    Hopper GPU), else the vector-state kernels for K = 1, else the Triton kernels, or the scan
    where they would need more registers than a thread has; the TPU kernels on a TPU; the scan
    elsewhere, where ``"pallas"`` is an error."""
    spec = jax.ShapeDtypeStruct

    def shapes(key_dim, value_dim, dtype):
        return [spec((2, 8, 1, key_dim), dtype), spec((2, 8, 1, key_dim), dtype),
                spec((2, 8, 3, value_dim), dtype), spec((3, value_dim, value_dim), dtype),
                spec((2, 8, 3), dtype)]

    paper = shapes(64, 16, jnp.bfloat16)
    assert ops.resolve_backend("auto", *paper) == "scan"  # on this CPU
    with pytest.raises(ValueError, match="backend='pallas'"):
        ops.resolve_backend("pallas", *paper)
    monkeypatch.setattr(ops.jax, "default_backend", lambda: "tpu")
    assert ops.resolve_backend("auto", *paper) == "pallas_tpu"
    monkeypatch.setattr(ops.jax, "default_backend", lambda: "gpu")
    assert ops.resolve_backend("auto", *paper) == "pallas_gpu"  # no Hopper GPU here
    assert ops.resolve_backend("pallas", *shapes(1, 16, jnp.float32)) == "pallas_gpu_vector"
    assert ops.resolve_backend("auto", *shapes(64, 16, jnp.float32)) == "pallas_gpu"
    # States whose backward needs more registers than a thread has (K and V padded to powers of
    # two >= 16): "auto" runs the scan, "pallas" still the kernels.
    for key_dim, value_dim in ((64, 32), (16, 64)):
        assert ops.resolve_backend("auto", *shapes(key_dim, value_dim, jnp.float32)) \
            == "pallas_gpu"
    for key_dim, value_dim in ((64, 64), (33, 40), (128, 32), (16, 128)):
        for dtype in (jnp.float32, jnp.bfloat16):
            assert ops.resolve_backend("auto", *shapes(key_dim, value_dim, dtype)) == "scan"
            assert ops.resolve_backend("pallas", *shapes(key_dim, value_dim, dtype)) \
                == "pallas_gpu"
    assert ops.resolve_backend("auto", *shapes(1, 256, jnp.float32)) == "pallas_gpu_vector"
    hopper = types.SimpleNamespace(platform="gpu", compute_capability="9.0",
                                   device_kind="NVIDIA H200")
    monkeypatch.setattr(jax, "devices", lambda: [hopper])
    assert ops.resolve_backend("auto", *paper) == "mosaic_gpu"
    assert ops.resolve_backend("auto", *shapes(64, 16, jnp.float32)) == "pallas_gpu"
    assert ops.resolve_backend("auto", *shapes(64, 64, jnp.bfloat16)) == "scan"
    assert ops.resolve_backend("mosaic_gpu", *shapes(1, 16, jnp.float32)) == "mosaic_gpu"
