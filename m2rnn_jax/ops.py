"""The public M²RNN op: validate once, pad, pick a backend, differentiate through one custom_vjp.

Every backend (the ``lax.scan`` reference in ``m2rnn_jax.reference``, the Pallas kernels in
``pallas_kernels.m2rnn``) keeps the contract of ``pallas_kernels.m2rnn.contract``; this module
owns everything around them: argument checks, head-count bookkeeping, padding S to a multiple of
the chunk, segment resets, the gradient plumbing, and the choice of backend (one table below).
"""

import functools
import importlib
import math
import numbers

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

from m2rnn_jax.segments import keep_mask

# Backend name -> the module implementing it (imported on first use).
BACKEND_MODULES = {
    "scan": "m2rnn_jax.reference",
    "pallas_gpu": "pallas_kernels.m2rnn.gpu",
    "pallas_gpu_vector": "pallas_kernels.m2rnn.gpu_vector",
    "mosaic_gpu": "pallas_kernels.m2rnn.mosaic_gpu",
    "pallas_tpu": "pallas_kernels.m2rnn.tpu",
}
# What "auto" and "pallas" try on each platform, in order: the first backend whose ``supports``
# has no objection (the last of each list takes every input). Elsewhere "auto" runs the scan,
# as it does on a GPU where ``pallas_gpu`` would need more registers than a thread has
# (``gpu.scan_is_faster``).
KERNELS_BY_PLATFORM = {
    "gpu": ("mosaic_gpu", "pallas_gpu_vector", "pallas_gpu"),
    "tpu": ("pallas_tpu",),
}
BACKENDS = ("auto", "pallas", *BACKEND_MODULES)
# Where the values of the inputs are checked (the ``value_checks`` argument of ``m2rnn``).
VALUE_CHECKS = ("host", "checkify")


def m2rnn(query, key, value, weight, forget_input, input_state=None, gradient_clipping=None, *,
          segment_ids=None, backend="auto", chunk_size=None, value_checks="host"):
    """M²RNN recurrence over a batch of sequences (docs/math.md §1).

    Per head n (each tensor's group is ``n // (N / its head count)``)::

        Z_t = tanh(H_{t-1} W + k_t v_tᵀ);  H_t = f_t H_{t-1} + (1 - f_t) Z_t;  y_t = H_tᵀ q_t

    Args:
      query: ``(B, S, Nq, K)``.
      key: ``(B, S, Nk, K)``.
      value: ``(B, S, Nv, V)``.
      weight: ``(Nw, V, V)`` transition weights.
      forget_input: ``(B, S, Nf)`` forget gate values in [0, 1].
      input_state: optional ``(B, N, K, V)`` initial state (zeros when ``None``).
      gradient_clipping: ``None`` or a finite real number ``c > 0`` (an int or float, not a bool,
        a string or an array); in the backward pass the state gradient arriving from later steps
        is clamped to ``[-c, c]`` before each step's read-out gradient is added (docs/math.md
        §2). The gradient returned for ``input_state`` is not clamped.
      segment_ids: optional ``(B, S)`` integer document ids of packed rows; the state restarts
        from zero where the id changes (the first document starts from ``input_state``).
      backend: one of ``"auto"`` (Pallas kernel on GPU/TPU, scan on CPU), ``"scan"``,
        ``"pallas"`` (the kernel for the current platform), ``"pallas_gpu"`` (Triton lowering,
        any shape and dtype), ``"pallas_gpu_vector"`` (Triton lowering, K = 1: a block of
        batch rows per program), ``"mosaic_gpu"`` (Mosaic GPU, Hopper, bfloat16, K=64, V=16:
        the fastest where it applies), ``"pallas_tpu"``. On a GPU ``"auto"`` and ``"pallas"``
        pick ``mosaic_gpu`` for inputs it supports (Hopper), else ``pallas_gpu_vector`` when
        K = 1, else ``pallas_gpu``; but ``"auto"`` runs the scan where K and V (padded to
        powers of two >= 16) need more registers than ``pallas_gpu`` has, e.g. 64×64 (measured
        there in float32: the scan 14× faster forward+backward) or 16×128.
      chunk_size: steps per chunk (state checkpoint interval), a positive int (not a bool);
        ``None`` takes the backend's default. Every backend runs every request: capped at S and
        rounded up to a size its kernels run (the chunk rule of
        ``pallas_kernels.m2rnn.contract``); the function computed does not depend on it.
      value_checks: where the *values* of the inputs are checked (docs/kernels.md, "What the op
        checks, and where"). ``"host"`` (the default, free): ``forget_input`` in [0, 1], only
        when it is a NumPy or CPU array the op can read at once; under ``jit``, ``grad`` or
        ``vmap`` no value is checked, and NaN or infinite inputs flow through to ``y``, the
        state and the gradients. ``"checkify"``: the op also emits ``jax.experimental.checkify``
        checks that ``forget_input`` lies in [0, 1] and that every floating input is finite,
        which run under ``jit``; the caller wraps the function in ``checkify.checkify``
        (``err, out = checkify.checkify(jax.jit(loss))(...)``; ``err.throw()`` raises the first
        failure, naming the argument). Outside ``checkify`` a jitted function with these checks
        fails to trace; eagerly, a failing check raises at once.

    Shapes, dtypes and the types of the arguments are always checked, when the op is traced:
    ``TypeError`` for an argument of the wrong type, ``ValueError`` for a wrong shape or value.

    Returns:
      ``(y, final_state)``: ``y (B, S, N, V)`` in ``value``'s dtype and the float32 final
      state ``(B, N, K, V)``.
    """
    num_heads = _validate(query, key, value, weight, forget_input, input_state, segment_ids)
    clip, chunk_size = _check_options(gradient_clipping, chunk_size, value_checks)
    if value_checks == "checkify":
        _checkify_values(query, key, value, weight, forget_input, input_state)
    name = resolve_backend(backend, query, key, value, weight, forget_input)
    batch, seq_len, _, key_dim = query.shape
    value_dim = value.shape[-1]
    chunk = backend_module(name).choose_chunk_size(seq_len, chunk_size)

    if input_state is None:
        h0 = jnp.zeros((batch, num_heads, key_dim, value_dim), jnp.float32)
    else:
        h0 = input_state.astype(jnp.float32)
    keep = keep_mask(segment_ids)

    pad = -seq_len % chunk
    q, k, v, f = query, key, value, forget_input
    if pad:
        # Padded steps have f = 1: they leave the state unchanged.
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        f = jnp.pad(f, ((0, 0), (0, pad), (0, 0)), constant_values=1)
        if keep is not None:
            keep = jnp.pad(keep, ((0, 0), (0, pad)), constant_values=1)
    y, final_state = _recurrence(name, chunk, clip, q, k, v, weight, f, h0, keep)
    return y[:, :seq_len], final_state


# The backends' forward and backward run as jitted calls: a model with many M²RNN layers of one
# shape then traces and lowers each kernel once and calls it from every layer (lowering a
# Mosaic GPU kernel takes about a second, and a deep model has dozens of calls).
@functools.partial(jax.jit, static_argnames=("backend", "chunk_size", "save_checkpoints"))
def _backend_forward(q, k, v, w, f, h0, keep, *, backend, chunk_size, save_checkpoints):
    return backend_module(backend).forward(q, k, v, w, f, h0, keep, chunk_size=chunk_size,
                                           save_checkpoints=save_checkpoints)


@functools.partial(jax.jit, static_argnames=("backend", "chunk_size", "gradient_clipping"))
def _backend_backward(*args, backend, chunk_size, gradient_clipping):
    return backend_module(backend).backward(*args, gradient_clipping=gradient_clipping,
                                            chunk_size=chunk_size)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _recurrence(backend, chunk_size, gradient_clipping, q, k, v, w, f, h0, keep):
    y, h_final, _ = _backend_forward(q, k, v, w, f, h0, keep, backend=backend,
                                     chunk_size=chunk_size, save_checkpoints=False)
    return y, h_final


def _recurrence_fwd(backend, chunk_size, gradient_clipping, q, k, v, w, f, h0, keep):
    y, h_final, checkpoints = _backend_forward(q, k, v, w, f, h0, keep, backend=backend,
                                               chunk_size=chunk_size, save_checkpoints=True)
    return (y, h_final), (q, k, v, w, f, h0, keep, checkpoints)


def _recurrence_bwd(backend, chunk_size, gradient_clipping, residuals, cotangents):
    dy, dh_final = cotangents
    keep = residuals[6]
    grads = _backend_backward(*residuals, dy, dh_final, backend=backend, chunk_size=chunk_size,
                              gradient_clipping=gradient_clipping)
    return (*grads, None if keep is None else jnp.zeros_like(keep))


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def resolve_backend(backend, query, key, value, weight, forget_input):
    """The backend ``m2rnn`` runs for these (valid) arguments: ``"auto"`` and ``"pallas"`` take
    the first of ``KERNELS_BY_PLATFORM[platform]`` whose ``supports`` has no objection (on a GPU:
    the Mosaic kernels where they support the inputs on this GPU, the vector-state kernels where
    K = 1, else the Triton kernels); ``"auto"`` runs the scan on other platforms and instead of
    Triton kernels slower than it (``scan_is_faster``: a state such as 64×64)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, one of {BACKENDS}, got {backend!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend not in ("auto", "pallas"):
        return backend
    platform = jax.default_backend()
    if platform not in KERNELS_BY_PLATFORM:
        if backend == "pallas":
            raise ValueError(
                f"backend='pallas' picks the kernel of the current platform, but JAX runs on "
                f"{platform!r}; use 'pallas_gpu' or 'pallas_tpu' (interpret mode) or 'scan'")
        return "scan"
    num_heads = max(query.shape[2], key.shape[2], value.shape[2], forget_input.shape[2],
                    weight.shape[0])
    state = jax.ShapeDtypeStruct(
        (query.shape[0], num_heads, query.shape[-1], value.shape[-1]), jnp.float32)
    reasons = {}
    for name in KERNELS_BY_PLATFORM[platform]:
        reasons[name] = backend_module(name).supports(query, key, value, weight, forget_input,
                                                      state)
        if reasons[name] is None:
            # A backend may say the scan outruns it here (contract.Backend: optional).
            scan_is_faster = getattr(backend_module(name), "scan_is_faster", None)
            if backend == "auto" and scan_is_faster is not None and scan_is_faster(query, value):
                return "scan"
            return name
    raise ValueError(f"no {platform} kernel supports these inputs: {reasons}")


@functools.cache
def backend_module(name):
    """The module of backend ``name`` (a key of ``BACKEND_MODULES``)."""
    try:
        return importlib.import_module(BACKEND_MODULES[name])
    except ModuleNotFoundError as err:
        raise NotImplementedError(f"the {name!r} backend is not available: {err}") from err


def values_on_host(x):
    """True when reading ``x``'s values is cheap: a NumPy array or a concrete CPU array (traced
    values are unknown, and reading a device array would stall the accelerator)."""
    if isinstance(x, np.ndarray):
        return True
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        return all(d.platform == "cpu" for d in x.devices())
    return False


def _shape_error(arg, expected, got):
    return ValueError(f"{arg} must have shape {expected}, got {tuple(got)}")


def _validate(query, key, value, weight, forget_input, input_state, segment_ids):
    """Checks the arrays' types, shapes and dtypes (and forget values on the host); returns N,
    the number of heads."""
    arrays = {"query": query, "key": key, "value": value, "weight": weight,
              "forget_input": forget_input}
    if input_state is not None:
        arrays["input_state"] = input_state
    for arg, x in arrays.items():
        if not isinstance(x, (jax.Array, np.ndarray)):
            raise TypeError(f"{arg} must be an array, got {type(x).__name__}")
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"{arg} must have a floating dtype, got {x.dtype}")
    expected_rank = {"query": ("(B, S, Nq, K)", 4), "key": ("(B, S, Nk, K)", 4),
                     "value": ("(B, S, Nv, V)", 4), "weight": ("(Nw, V, V)", 3),
                     "forget_input": ("(B, S, Nf)", 3)}
    for arg, (expected, rank) in expected_rank.items():
        if arrays[arg].ndim != rank:
            raise _shape_error(arg, expected, arrays[arg].shape)

    batch, seq_len, nq, key_dim = query.shape
    value_dim = value.shape[-1]
    heads = {"query": nq, "key": key.shape[2], "value": value.shape[2], "weight": weight.shape[0],
             "forget_input": forget_input.shape[2]}
    num_heads = max(heads.values())
    if seq_len < 1 or batch < 1 or key_dim < 1 or value_dim < 1 or min(heads.values()) < 1:
        raise ValueError(f"query {query.shape} and value {value.shape} must have non-empty axes")
    for arg, n in heads.items():
        if num_heads % n:
            raise ValueError(f"{arg} has {n} heads, which does not divide N = {num_heads} "
                             f"(head counts {heads})")
    checks = {
        "key": (key.shape, (batch, seq_len, heads["key"], key_dim), "(B, S, Nk, K)"),
        "value": (value.shape, (batch, seq_len, heads["value"], value_dim), "(B, S, Nv, V)"),
        "weight": (weight.shape, (heads["weight"], value_dim, value_dim), "(Nw, V, V)"),
        "forget_input": (forget_input.shape, (batch, seq_len, heads["forget_input"]),
                         "(B, S, Nf)"),
    }
    if input_state is not None:
        checks["input_state"] = (input_state.shape, (batch, num_heads, key_dim, value_dim),
                                 "(B, N, K, V)")
    for arg, (got, want, names) in checks.items():
        if tuple(got) != want:
            raise _shape_error(arg, f"{names} = {want}", got)

    if segment_ids is not None:
        if not isinstance(segment_ids, (jax.Array, np.ndarray)) \
                or tuple(segment_ids.shape) != (batch, seq_len):
            raise _shape_error("segment_ids", f"(B, S) = {(batch, seq_len)}",
                               getattr(segment_ids, "shape", ()))
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must have an integer dtype, got {segment_ids.dtype}")
    if values_on_host(forget_input):
        f = np.asarray(forget_input, np.float32)
        if f.size and not (np.all(f >= 0) and np.all(f <= 1)):
            raise ValueError(f"forget_input must lie in [0, 1]; got values in "
                             f"[{np.nanmin(f):.4g}, {np.nanmax(f):.4g}]"
                             + (" (NaN present)" if np.isnan(f).any() else ""))
    return num_heads


def _check_options(gradient_clipping, chunk_size, value_checks):
    """Types and values of the op's static options (``resolve_backend`` checks ``backend``);
    returns ``gradient_clipping`` as a float or None and ``chunk_size`` as an int or None."""
    if gradient_clipping is not None:
        if isinstance(gradient_clipping, bool) or not isinstance(gradient_clipping, numbers.Real):
            raise TypeError(f"gradient_clipping must be None or a real number (int or float), "
                            f"got {type(gradient_clipping).__name__} {gradient_clipping!r}")
        gradient_clipping = float(gradient_clipping)
        if not (math.isfinite(gradient_clipping) and gradient_clipping > 0):
            raise ValueError(f"gradient_clipping must be a finite number > 0, "
                             f"got {gradient_clipping!r}")
    if chunk_size is not None:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
            raise TypeError(f"chunk_size must be None or an int, "
                            f"got {type(chunk_size).__name__} {chunk_size!r}")
        chunk_size = int(chunk_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    if not isinstance(value_checks, str):
        raise TypeError(f"value_checks must be a string, one of {VALUE_CHECKS}, "
                        f"got {value_checks!r}")
    if value_checks not in VALUE_CHECKS:
        raise ValueError(f"value_checks must be one of {VALUE_CHECKS}, got {value_checks!r}")
    return gradient_clipping, chunk_size


def _checkify_values(query, key, value, weight, forget_input, input_state):
    """``checkify.check``s of the inputs' values, which run under ``jit`` when the caller
    functionalizes them with ``checkify.checkify`` (``value_checks="checkify"``)."""
    f = forget_input.astype(jnp.float32)
    # NaN fails both comparisons: a NaN forget value is reported here too.
    checkify.check(jnp.all((f >= 0) & (f <= 1)),
                   "m2rnn: forget_input must lie in [0, 1]; got values in [{low}, {high}]",
                   low=jnp.min(f), high=jnp.max(f))
    arrays = {"query": query, "key": key, "value": value, "weight": weight,
              "input_state": input_state}
    for arg, x in arrays.items():
        if x is not None:
            bad = jnp.sum(~jnp.isfinite(x))
            checkify.check(bad == 0, f"m2rnn: {arg} has {{count}} non-finite values (NaN or inf)",
                           count=bad)
