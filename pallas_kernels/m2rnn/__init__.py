"""Pallas kernels for the M²RNN recurrence: ``mosaic_gpu`` (Mosaic GPU, Hopper, bf16 K=64 V=16),
``gpu`` (Triton lowering, any shape and dtype) and ``tpu`` (Mosaic TPU).

Each module implements the backend interface of ``m2rnn_jax.reference`` (``forward``/``backward``
on validated, padded inputs); ``m2rnn_jax.ops`` dispatches to them.
"""
