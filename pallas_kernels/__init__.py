"""Pallas kernels, importing nothing from ``m2rnn_jax``: ``m2rnn/`` holds the M²RNN recurrence's
backends behind one contract (``m2rnn/contract.py``) and its fused decode step;
``row_product`` the single-row products of batch-1 decoding. ``platforms`` decides where a
kernel lowers for real and where it runs in its interpreter; ``loops`` holds the int32 time
loop every kernel uses.
"""
