"""The contract every backend of the M²RNN op keeps (``m2rnn_jax.ops`` is the only caller).

A backend is a module with the attributes of ``Backend`` below: the scan reference
(``m2rnn_jax.reference``) and the kernels of this package (``gpu``, ``gpu_vector``,
``mosaic_gpu``, ``tpu``; docs/kernels.md describes each). The op validates the arguments once,
pads S, builds ``h0`` and ``keep``, and differentiates through one ``custom_vjp`` whose forward
and backward are the backend's, so a backend only computes.

What the op guarantees to ``forward`` and ``backward``:

* ``q (B, S, Nq, K)``, ``k (B, S, Nk, K)``, ``v (B, S, Nv, V)``, ``w (Nw, V, V)``,
  ``f (B, S, Nf)`` in the caller's floating dtypes, shapes consistent, every head count dividing
  ``N = h0.shape[1]`` (head ``n`` reads group ``n // (N / N_x)``, docs/math.md §1).
* ``S`` is a multiple of ``chunk_size``, which is what this backend's ``choose_chunk_size``
  returned (the chunk rule below). The op pads S with steps that change nothing (``f = 1``,
  ``keep = 1``, zero q/k/v) and drops them from the outputs.
* ``h0``: float32 ``(B, N, K, V)``, zeros when the caller gave no initial state.
* ``keep``: ``None``, or float32 ``(B, S)`` with 0 where a new document starts (the state is
  reset to zero before that step) and 1 elsewhere.
* ``gradient_clipping``: ``None`` or a finite positive Python float; the rule is docs/math.md
  §2 (clamp the state gradient arriving from later steps, not ``dh0``).
* ``jax_enable_x64`` may be on: the inputs keep the dtypes above, and a backend's own index
  arithmetic stays int32 (``loops.fori_loop`` for its time loops).
* ``checkpoints``, ``dy``, ``dh_final`` in ``backward``: this backend's own forward's
  checkpoints (``save_checkpoints=True``, same ``chunk_size``) and the cotangents of ``y``
  (``v``'s dtype) and of the final state (float32).

What a backend returns: ``forward`` -> ``(y (B, S, N, V) in v's dtype, h_final float32
(B, N, K, V), checkpoints or None)``, the checkpoints only when ``save_checkpoints`` (their
layout is the backend's business; memory grows as S / chunk_size); ``backward`` -> ``(dq, dk,
dv, dw, df, dh0)`` in the dtypes of ``q, k, v, w, f`` and float32 ``dh0``.

The chunk rule, one for every backend. The chunk size is the state checkpoint interval only: it
does not change the function computed. The op validates the caller's ``chunk_size`` once
(``None`` or a positive int) and passes it to the backend's ``choose_chunk_size``, which applies
``fit_chunk_size``: the request (``DEFAULT_CHUNK_SIZE`` when ``None``), capped at S, rounded up
to the next size the backend's kernels run (any size for the scan and ``pallas_gpu_vector``, a
multiple of 8 for ``pallas_gpu`` and ``mosaic_gpu``, 8, 16, 32, 64 or a multiple of 128 for
``pallas_tpu``). So every backend honours every request the op accepts, with a chunk at least
as long as the request (or S) and never longer than S rounded up the same way.
"""

from collections.abc import Callable
from typing import Protocol, runtime_checkable


def fit_chunk_size(seq_len: int, requested: int | None, *, default: int,
                   runs: Callable[[int], bool] | None = None) -> int:
    """The chunk rule (module docstring): ``requested`` (``default`` when ``None``; else a
    positive int, as the op validated) capped at ``seq_len``, rounded up to the next size that
    ``runs`` accepts (any size when ``runs`` is ``None``)."""
    chunk = min(default if requested is None else requested, seq_len)
    if runs is not None:
        while not runs(chunk):  # the next size a backend runs is less than one tile away
            chunk += 1
    return chunk


def check_chunk_size(backend: str, seq_len: int, chunk_size,
                     runs: Callable[[int], bool] | None = None) -> None:
    """Raises ``ValueError`` unless ``chunk_size`` is an int that ``runs`` accepts (any
    positive int when ``runs`` is ``None``) and divides ``seq_len``: what a backend's
    ``forward`` and ``backward`` ask of their ``chunk_size`` (``choose_chunk_size`` gives
    one)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1 \
            or (runs is not None and not runs(chunk_size)) or seq_len % chunk_size:
        raise ValueError(f"chunk_size {chunk_size!r} is not a size the {backend} kernels run "
                         f"dividing S = {seq_len}; choose_chunk_size gives one")


@runtime_checkable
class Backend(Protocol):
    """The module-level functions and constant of an M²RNN backend."""

    DEFAULT_CHUNK_SIZE: int

    def supports(self, q, k, v, w, f, h0) -> str | None:
        """``None`` when this backend runs these inputs on this machine (what ``backend="auto"``
        asks), else the reason in one line. Arrays or ``jax.ShapeDtypeStruct``s: only shapes
        and dtypes are read; ``h0`` is the float32 ``(B, N, K, V)`` initial state."""

    def choose_chunk_size(self, seq_len: int, requested: int | None) -> int:
        """The chunk (checkpoint interval) for ``seq_len`` steps by the chunk rule (module
        docstring): ``fit_chunk_size`` with this backend's default and sizes. ``requested`` is
        ``None`` or a positive Python int (the op checked it); every such request is
        honoured."""

    def forward(self, q, k, v, w, f, h0, keep, *, chunk_size, save_checkpoints):
        """``(y, h_final, checkpoints or None)``; see the module docstring."""

    def backward(self, q, k, v, w, f, h0, keep, checkpoints, dy, dh_final, *,
                 gradient_clipping, chunk_size):
        """``(dq, dk, dv, dw, df, dh0)``; see the module docstring."""

    # Optional, outside the protocol: ``scan_is_faster(q, v) -> bool``, True where the scan
    # outruns this backend on inputs of these shapes; ``backend="auto"`` then runs the scan
    # (``gpu``: states whose backward needs more registers than a thread has).
