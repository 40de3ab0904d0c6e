"""The public M²RNN op: validate once, pad, pick a backend, differentiate through one custom_vjp.

Every backend (the ``lax.scan`` reference in ``m2rnn_jax.reference``, the Pallas kernels in
``pallas_kernels.m2rnn``) implements the same ``forward``/``backward`` pair on clean inputs; this
module owns everything around them: argument checks, head-count bookkeeping, padding S to a
multiple of the chunk, segment resets, and the gradient plumbing.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np

BACKENDS = ("auto", "scan", "pallas", "pallas_gpu", "pallas_gpu_vector", "mosaic_gpu",
            "pallas_tpu")

# Backend name -> module implementing forward/backward (imported on first use).
_BACKEND_MODULES = {
    "scan": "m2rnn_jax.reference",
    "pallas_gpu": "pallas_kernels.m2rnn.gpu",
    "pallas_gpu_vector": "pallas_kernels.m2rnn.gpu_vector",
    "mosaic_gpu": "pallas_kernels.m2rnn.mosaic_gpu",
    "pallas_tpu": "pallas_kernels.m2rnn.tpu",
}


def m2rnn(query, key, value, weight, forget_input, input_state=None, gradient_clipping=None, *,
          segment_ids=None, backend="auto", chunk_size=None, state_noise=None):
    """M²RNN recurrence over a batch of sequences (SPEC §1).

    Per head n (each tensor's group is ``n // (N / its head count)``)::

        Z_t = tanh(H_{t-1} W + k_t v_tᵀ);  H_t = f_t H_{t-1} + (1 - f_t) Z_t;  y_t = H_tᵀ q_t

    Args:
      query: ``(B, S, Nq, K)``.
      key: ``(B, S, Nk, K)``.
      value: ``(B, S, Nv, V)``.
      weight: ``(Nw, V, V)`` transition weights.
      forget_input: ``(B, S, Nf)`` forget gate values in [0, 1].
      input_state: optional ``(B, N, K, V)`` initial state (zeros when ``None``).
      gradient_clipping: optional ``c > 0``; in the backward pass the state gradient arriving
        from later steps is clamped to ``[-c, c]`` before each step's read-out gradient is added.
        The gradient returned for ``input_state`` is not clamped.
      segment_ids: optional ``(B, S)`` integer document ids of packed rows; the state restarts
        from zero where the id changes (the first document starts from ``input_state``).
      backend: one of ``"auto"`` (Pallas kernel on GPU/TPU, scan on CPU), ``"scan"``,
        ``"pallas"`` (the kernel for the current platform), ``"pallas_gpu"`` (Triton lowering,
        any shape and dtype), ``"pallas_gpu_vector"`` (Triton lowering, K = 1: a block of
        batch rows per program), ``"mosaic_gpu"`` (Mosaic GPU, Hopper, bfloat16, K=64, V=16:
        the fastest where it applies), ``"pallas_tpu"``. On a GPU ``"auto"`` and ``"pallas"``
        pick ``mosaic_gpu`` for inputs it supports (Hopper), else ``pallas_gpu_vector`` when
        K = 1, else ``pallas_gpu``.
      chunk_size: steps per chunk (state checkpoint interval); ``None`` takes the backend's.
      state_noise: optional ``(key, std)``, a training-time regulariser: ``std``·N(0, 1) noise
        drawn from the PRNG ``key`` is added to every state entry after every step. The
        recurrence then runs as a plain ``lax.scan`` differentiated by JAX
        (``reference.noisy_forward``: same clipping rule, memory growing as S) whatever
        ``backend`` says. ``std = 0`` is the same as ``None``.

    Returns:
      ``(y, final_state)``: ``y (B, S, N, V)`` in ``value``'s dtype and the float32 final
      state ``(B, N, K, V)``.
    """
    num_heads = _validate(query, key, value, weight, forget_input, input_state,
                          gradient_clipping, segment_ids)
    noise_std = _validate_state_noise(state_noise)
    name = resolve_backend(backend, query, key, value, weight, forget_input)
    batch, seq_len, _, key_dim = query.shape
    value_dim = value.shape[-1]
    module = _backend_module(name)
    chunk = module.choose_chunk_size(seq_len, chunk_size) if hasattr(module, "choose_chunk_size") \
        else min(chunk_size or module.DEFAULT_CHUNK_SIZE, seq_len)
    if not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk!r}")

    if input_state is None:
        h0 = jnp.zeros((batch, num_heads, key_dim, value_dim), jnp.float32)
    else:
        h0 = input_state.astype(jnp.float32)
    keep = None if segment_ids is None else keep_mask(segment_ids)
    clip = None if gradient_clipping is None else float(gradient_clipping)
    if noise_std:
        return _backend_module("scan").noisy_forward(
            query, key, value, weight, forget_input, h0, keep, noise_key=state_noise[0],
            noise_std=noise_std, gradient_clipping=clip)

    pad = -seq_len % chunk
    q, k, v, f = query, key, value, forget_input
    if pad:
        # Padded steps have f = 1, so they carry the state through unchanged.
        q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
        f = jnp.pad(f, ((0, 0), (0, pad), (0, 0)), constant_values=1)
        if keep is not None:
            keep = jnp.pad(keep, ((0, 0), (0, pad)), constant_values=1)
    y, final_state = _recurrence(name, chunk, clip, q, k, v, weight, f, h0, keep)
    return y[:, :seq_len], final_state


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _recurrence(backend, chunk_size, gradient_clipping, q, k, v, w, f, h0, keep):
    y, h_final, _ = _backend_module(backend).forward(
        q, k, v, w, f, h0, keep, chunk_size=chunk_size, save_checkpoints=False)
    return y, h_final


def _recurrence_fwd(backend, chunk_size, gradient_clipping, q, k, v, w, f, h0, keep):
    y, h_final, checkpoints = _backend_module(backend).forward(
        q, k, v, w, f, h0, keep, chunk_size=chunk_size, save_checkpoints=True)
    return (y, h_final), (q, k, v, w, f, h0, keep, checkpoints)


def _recurrence_bwd(backend, chunk_size, gradient_clipping, residuals, cotangents):
    dy, dh_final = cotangents
    keep = residuals[6]
    grads = _backend_module(backend).backward(
        *residuals, dy, dh_final, gradient_clipping=gradient_clipping, chunk_size=chunk_size)
    return (*grads, None if keep is None else jnp.zeros_like(keep))


_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


def keep_mask(segment_ids):
    """1.0 where step t continues step t-1's document, 0.0 where a new document starts."""
    same = segment_ids[:, 1:] == segment_ids[:, :-1]
    first = jnp.ones((segment_ids.shape[0], 1), bool)
    return jnp.concatenate([first, same], axis=1).astype(jnp.float32)


def resolve_backend(backend, query, key, value, weight, forget_input):
    """The backend ``m2rnn`` runs for these (valid) arguments: ``"auto"``/``"pallas"`` resolved
    for the platform; on a GPU the Mosaic kernels where they support the inputs (Hopper), the
    vector-state kernels where K = 1."""
    name = _platform_backend(backend)
    if name == "pallas_gpu" and backend in ("auto", "pallas"):
        num_heads = max(query.shape[2], key.shape[2], value.shape[2], forget_input.shape[2],
                        weight.shape[0])
        state_shape = jax.ShapeDtypeStruct(
            (query.shape[0], num_heads, query.shape[-1], value.shape[-1]), jnp.float32)
        if _backend_module("mosaic_gpu").supports(query, key, value, weight, forget_input,
                                                  state_shape):
            return "mosaic_gpu"
        if _backend_module("pallas_gpu_vector").supports(query, key, value, weight,
                                                         forget_input):
            return "pallas_gpu_vector"
    return name


def _platform_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    platform = jax.default_backend()
    if backend == "auto":
        if platform in ("gpu", "tpu"):
            return f"pallas_{platform}"
        return "scan"
    if backend == "pallas":
        if platform not in ("gpu", "tpu"):
            raise ValueError(
                f"backend='pallas' picks the kernel of the current platform, but JAX runs on "
                f"{platform!r}; use 'pallas_gpu' or 'pallas_tpu' (interpret mode) or 'scan'")
        return f"pallas_{platform}"
    return backend


@functools.cache
def _backend_module(name):
    try:
        return importlib.import_module(_BACKEND_MODULES[name])
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


def _validate_state_noise(state_noise):
    """``state_noise`` -> its std as a float (0.0 for ``None``)."""
    if state_noise is None:
        return 0.0
    if not isinstance(state_noise, tuple) or len(state_noise) != 2:
        raise ValueError(f"state_noise must be None or a (key, std) pair, got {state_noise!r}")
    key, std = state_noise
    if isinstance(std, jax.core.Tracer) or not np.isscalar(std) or not float(std) >= 0:
        raise ValueError(f"state_noise's std must be a non-negative Python number, got {std!r}")
    if not (hasattr(key, "dtype") and (jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
                                       or key.shape == (2,))):
        raise ValueError(f"state_noise's key must be a JAX PRNG key, got {key!r}")
    return float(std)


def _shape_error(arg, expected, got):
    return ValueError(f"{arg} must have shape {expected}, got {tuple(got)}")


def _validate(query, key, value, weight, forget_input, input_state, gradient_clipping,
              segment_ids):
    """Checks every argument; returns N, the number of heads."""
    arrays = {"query": query, "key": key, "value": value, "weight": weight,
              "forget_input": forget_input}
    if input_state is not None:
        arrays["input_state"] = input_state
    for arg, x in arrays.items():
        if not hasattr(x, "shape") or not hasattr(x, "dtype"):
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

    if gradient_clipping is not None:
        if isinstance(gradient_clipping, jax.core.Tracer) or not np.isscalar(gradient_clipping) \
                or not float(gradient_clipping) > 0:
            raise ValueError(f"gradient_clipping must be None or a positive Python number, "
                             f"got {gradient_clipping!r}")
    if segment_ids is not None:
        if not hasattr(segment_ids, "shape") or tuple(segment_ids.shape) != (batch, seq_len):
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
