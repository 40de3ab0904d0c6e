"""Pallas kernels for the M²RNN recurrence: ``gpu`` (Triton lowering) and ``tpu`` (Mosaic TPU).

Each module implements the backend interface of ``m2rnn_jax.reference`` (``forward``/``backward``
on validated, padded inputs); ``m2rnn_jax.ops`` dispatches to them.
"""
