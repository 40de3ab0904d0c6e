"""Loss against position beyond the training length: does a model trained on rows of ``L``
bytes keep predicting well (or better, with more context) up to ``length_factor × L``?

Each evaluated document is read from its first byte as one contiguous window of
``length + 1`` tokens, without segment ids (one document per row, so no state is reset), and
``HybridLM.__call__`` gives the loss of every next-byte prediction: position ``p`` is the
prediction of byte ``p + 1`` from bytes ``0..p``. The mean over documents is taken per
position, then per bucket of positions.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from m2rnn_jax.typed_config import ConfigError
from train.checkpointing import restore_for_inference
from train.data import expand_paths, read_bytes


def long_windows(documents, length: int, count: int) -> np.ndarray:
    """``(n, length + 1)`` int32: the first ``length + 1`` tokens of up to ``count`` documents
    that long, spread evenly over ``documents`` (in their order)."""
    eligible = [doc for doc in documents if doc.size >= length + 1]
    if not eligible:
        longest = max((doc.size for doc in documents), default=0)
        raise ConfigError(f"long_context: no validation document has {length + 1} bytes (the "
                          f"longest has {longest}); lower long_context.length_factor or "
                          f"train.data.seq_len")
    picked = np.unique(np.linspace(0, len(eligible) - 1, min(count, len(eligible)))
                       .round().astype(int))
    return np.stack([eligible[i][:length + 1] for i in picked]).astype(np.int32)


def position_losses(model, windows: np.ndarray, batch_size: int) -> np.ndarray:
    """Mean next-token loss (nats, float64) at each position ``0..length-1`` over ``windows``
    (``(n, length + 1)`` tokens), from ``model(tokens)`` with no segment ids."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def losses(state, tokens):
        logits = nnx.merge(graphdef, state)(tokens[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), tokens[:, 1:])

    total = np.zeros(windows.shape[1] - 1, np.float64)
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        rows = len(batch)
        if rows < batch_size:  # one compiled shape: pad with copies, drop their losses
            batch = np.concatenate([batch, np.repeat(batch[-1:], batch_size - rows, axis=0)])
        total += np.asarray(losses(state, jnp.asarray(batch)), np.float64)[:rows].sum(axis=0)
    return total / len(windows)


def bucket_means(values: np.ndarray, bucket_size: int):
    """``(starts, means)``: the mean of ``values`` over positions ``[s, s + bucket_size)``
    (the last bucket may be shorter)."""
    starts = np.arange(0, len(values), bucket_size)
    means = np.array([values[s:s + bucket_size].mean() for s in starts])
    return starts, means


def validation_documents(folder) -> list:
    """The documents of a corpus's validation folder, in path order."""
    return [read_bytes(path) for path in expand_paths([str(folder)], "long_context")]


def evaluate_run(run_dir, documents, *, train_length: int, length_factor: int, count: int,
                 bucket_size: int, batch_size: int) -> dict:
    """Per-bucket loss (bits per byte) of the newest checkpoint in ``run_dir`` on windows of
    ``length_factor × train_length`` bytes, with the means within and beyond the training
    length."""
    _, model = restore_for_inference(run_dir)
    length = length_factor * train_length
    windows = long_windows(documents, length, count)
    bits = position_losses(model, windows, batch_size) / np.log(2)
    starts, means = bucket_means(bits, bucket_size)
    return {"length": length, "documents": int(len(windows)), "bucket_size": bucket_size,
            "bucket_starts": starts.tolist(), "bits": means.tolist(),
            "bits_within_train_length": float(bits[:train_length].mean()),
            "bits_beyond_train_length": float(bits[train_length:].mean())}
