"""Pallas kernels for the M²RNN recurrence: ``mosaic_gpu`` (Mosaic GPU, Hopper, bf16 K=64 V=16),
``gpu`` (Triton lowering, any shape and dtype), ``gpu_vector`` (Triton lowering, K = 1: batch
rows as the tile's rows) and ``tpu`` (Mosaic TPU).

Each module implements the backend interface of ``m2rnn_jax.reference`` (``forward``/``backward``
on validated, padded inputs); ``m2rnn_jax.ops`` dispatches to them.
"""
