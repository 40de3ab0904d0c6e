"""Pallas kernels for the M²RNN recurrence, one module per backend of ``m2rnn_jax.ops.m2rnn``:
``mosaic_gpu`` (Mosaic GPU, Hopper, bfloat16 K = 64 V = 16), ``gpu`` (Triton lowering, any shape
and dtype), ``gpu_vector`` (Triton lowering, K = 1: batch rows as the tile's rows) and ``tpu``
(Mosaic TPU). Each keeps the contract written down in ``contract``; docs/kernels.md describes
their designs.
"""
