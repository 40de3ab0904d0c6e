"""Word problems over a finite group: deterministic, seeded batches in NumPy, or drawn on the
device with ``jax.random`` inside a jitted training loop (``device_word_problems``).

Each token is a group element (an index into ``group.elements``), drawn uniformly. The target
at position ``t`` is the running product ``x_1 · x_2 · … · x_t`` (``groups`` documents the
order: apply ``x_1`` first), so every position is a state-tracking query and a model must
hold the whole prefix in its state.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from m2rnn_experiments.state_tracking.groups import PermutationGroup

LENGTH_SAMPLING = ("fixed", "uniform")


@dataclasses.dataclass(frozen=True)
class WordProblemBatch:
    """``tokens``, ``targets`` (B, L) int32; ``mask`` (B, L) float32, 1 where a target counts."""

    tokens: np.ndarray
    targets: np.ndarray
    mask: np.ndarray


def prefix_products(group: PermutationGroup, tokens: np.ndarray) -> np.ndarray:
    """``(B, L)`` element indices -> ``(B, L)`` indices of the running products."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (batch, length), got {tokens.shape}")
    if tokens.size and (tokens.min() < 0 or tokens.max() >= group.order):
        raise ValueError(f"tokens must be element indices in [0, {group.order}) of "
                         f"{group.name}, got values in [{tokens.min()}, {tokens.max()}]")
    targets = np.empty(tokens.shape, np.int32)
    state = np.zeros(tokens.shape[0], np.int32)  # the identity
    for t in range(tokens.shape[1]):
        state = group.table[state, tokens[:, t]]
        targets[:, t] = state
    return targets


def sample_word_problems(group: PermutationGroup, rng: np.random.Generator, batch_size: int,
                         length: int, length_sampling: str = "fixed",
                         scored_length: int | None = None) -> WordProblemBatch:
    """A batch of uniformly random words with their prefix products.

    ``length_sampling="fixed"``: every row has ``scored_length`` (default ``length``) scored
    positions. ``"uniform"``: row ``b`` is scored on its first ``l_b ~ U{1, …, scored_length}``
    positions only. Unscored positions are padding for a causal model, masked out of the loss
    (the arrays keep ``length`` columns, so a curriculum does not change shapes).
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"length must be a positive integer, got {length!r}")
    if length_sampling not in LENGTH_SAMPLING:
        raise ValueError(f"length_sampling must be one of {LENGTH_SAMPLING}, "
                         f"got {length_sampling!r}")
    if scored_length is None:
        scored_length = length
    elif not isinstance(scored_length, (int, np.integer)) or not 1 <= scored_length <= length:
        raise ValueError(f"scored_length must be an integer in [1, {length}], "
                         f"got {scored_length!r}")
    tokens = rng.integers(0, group.order, size=(batch_size, length), dtype=np.int32)
    targets = prefix_products(group, tokens)
    if length_sampling == "fixed":
        lengths = np.full((batch_size, 1), scored_length)
    else:
        lengths = rng.integers(1, scored_length + 1, size=(batch_size, 1))
    mask = (np.arange(length)[None, :] < lengths).astype(np.float32)
    return WordProblemBatch(tokens=tokens, targets=targets, mask=mask)


# Root of the device words' keys; each training step's key folds in (seed, step).
DEVICE_WORDS_KEY = 0x5EED


def device_word_problems(table, seed, step, batch_size: int, length: int, width: int | None = None,
                         scored_length=None, length_sampling: str = "fixed"):
    """The training words of ``(seed, step)`` drawn with ``jax.random``, jit-compatible:
    ``(tokens, targets, mask)`` of shape ``(batch_size, width)`` as ``sample_word_problems``
    gives them (int32, int32, float32), for the group of Cayley table ``table`` (a jnp array).

    ``seed``, ``step`` and ``scored_length`` may be traced. The key depends only on
    ``(seed, step)``, and every word is drawn at the full ``length`` and cut to its first
    ``width`` (default ``length``) positions, so a step's words do not depend on how steps are
    grouped into calls or on the width a call runs at. The prefix products come from
    ``table`` by an associative scan (group multiplication is associative). A different
    stream from the NumPy generator's."""
    width = length if width is None else width
    if not 1 <= width <= length:
        raise ValueError(f"width must be in [1, {length}], got {width}")
    if length_sampling not in LENGTH_SAMPLING:
        raise ValueError(f"length_sampling must be one of {LENGTH_SAMPLING}, "
                         f"got {length_sampling!r}")
    scored_length = length if scored_length is None else scored_length
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(DEVICE_WORDS_KEY), seed), step)
    token_key, length_key = jax.random.split(key)
    tokens = jax.random.randint(token_key, (batch_size, length), 0, table.shape[0],
                                jnp.int32)[:, :width]
    targets = jax.lax.associative_scan(lambda a, b: table[a, b], tokens, axis=1)
    if length_sampling == "fixed":
        lengths = jnp.full((batch_size, 1), scored_length)
    else:
        lengths = jax.random.randint(length_key, (batch_size, 1), 1, scored_length + 1)
    mask = (jnp.arange(width)[None, :] < lengths).astype(jnp.float32)
    return tokens, targets.astype(jnp.int32), mask


def curriculum_length(step: int, start_length: int, final_length: int, steps: int) -> int:
    """Scored length at ``step`` of a length curriculum: grows geometrically from
    ``start_length`` to ``final_length`` over ``steps`` steps, then stays there."""
    if steps <= 0 or step >= steps or start_length >= final_length:
        return final_length
    grown = start_length * (final_length / start_length) ** (step / steps)
    return max(start_length, min(final_length, int(grown)))


def gated_curriculum_length(scored_length: int, train_accuracy: float, threshold: float,
                            final_length: int) -> int:
    """Accuracy-gated length curriculum: the scored length doubles (up to ``final_length``) once
    the training accuracy at the current length reaches ``threshold``."""
    if train_accuracy >= threshold:
        return min(2 * scored_length, final_length)
    return scored_length


def eval_word_problems(group: PermutationGroup, seed: int, num_sequences: int,
                       length: int) -> WordProblemBatch:
    """The fixed evaluation set for one length: the same words for every model and run."""
    rng = np.random.default_rng([seed, length])
    return sample_word_problems(group, rng, num_sequences, length)
