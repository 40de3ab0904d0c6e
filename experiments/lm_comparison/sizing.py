"""Sizes of the compared models: layer patterns, exact parameter counts, equal-size matching
and the bytes of the state each layer carries while generating.

``hybrid_pattern(depth, letter)`` places attention as the paper's hybrids do (every 8th layer
from the 5th: layers 4, 12, 20, … counted from 0) and ``letter`` everywhere else.

``match_width(config, key, target)`` searches one integer width of a model (``mlp.hidden_dim``,
``mamba2.num_heads``, …) for the parameter count closest to ``target``: the count is that of
``nnx.eval_shape`` (as the trainer builds the model) and grows with the width, so a first guess
from the slope and a walk to where the count crosses the target find the two widths around
it; the closer wins (the smaller on a tie). Deterministic, and the same on every machine.

``layer_state_bytes(config, letter, seq_len)`` is what one layer keeps per sequence to go on
generating: M²RNN ``N·K·V`` float32 states, Gated DeltaNet ``heads·K·V`` and Mamba-2
``heads·head_dim·state_dim`` (float32), each plus its causal conv's ring of ``conv_kernel``
inputs in the compute dtype (``m2rnn_jax.layers.conv.conv_cache``; its 4-byte step counter
left out); attention the keys and values of ``seq_len`` steps in the compute dtype.
"""

import functools

import jax
import numpy as np
from flax import nnx

from m2rnn_jax.config import ModelConfig
from m2rnn_jax.typed_config import ConfigError, from_dict, to_dict
from train.step import abstract_model

ATTENTION = "A"
RECURRENT_LETTERS = ("M", "D", "S")
FLOAT32_BYTES = 4


def hybrid_pattern(depth: int, letter: str, *, first: int = 4, every: int = 8) -> str:
    """``letter`` at every layer but ``first, first + every, …`` (attention)."""
    if depth < 1 or every < 1 or first < 0:
        raise ValueError(f"need depth >= 1, every >= 1, first >= 0; got {depth}, {every}, "
                         f"{first}")
    return "".join(ATTENTION if i >= first and (i - first) % every == 0 else letter
                   for i in range(depth))


def swap_layer(pattern: str, index: int, letter: str) -> str:
    """``pattern`` with layer ``index`` (a recurrent layer) replaced by ``letter``."""
    if not 0 <= index < len(pattern) or pattern[index] == ATTENTION:
        raise ValueError(f"layer {index} of {pattern!r} is not a recurrent layer")
    return pattern[:index] + letter + pattern[index + 1:]


@functools.lru_cache(maxsize=512)
def count_params(config: ModelConfig) -> int:
    """Exact parameter count of the model, from its abstract shapes (nothing allocated)."""
    _, params = abstract_model(config)
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.to_pure_dict(params))))


def with_value(config: ModelConfig, key: str, value) -> ModelConfig:
    """``config`` with the dotted ``key`` (e.g. ``mlp.hidden_dim``) set to ``value``."""
    data = to_dict(config)
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.get(part)
        if not isinstance(node, dict):
            raise ConfigError(f"matching key {key!r} does not name a model setting")
    if parts[-1] not in node or not isinstance(node[parts[-1]], int):
        raise ConfigError(f"matching key {key!r} does not name an integer model setting")
    node[parts[-1]] = value
    return from_dict(ModelConfig, data)


def get_value(config: ModelConfig, key: str):
    value = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def match_width(config: ModelConfig, key: str, target: int, *,
                step: int = 1) -> tuple[ModelConfig, int]:
    """``(config with key = w, its parameter count)`` for the multiple ``w`` of ``step`` whose
    count is closest to ``target`` (the smaller on a tie); ``ConfigError`` when even
    ``w = step`` is too large or the setting does not change the count."""
    if step < 1:
        raise ConfigError(f"matching step must be >= 1, got {step}")

    def count(multiple):
        return count_params(with_value(config, key, multiple * step))

    # A guess from the slope between the current width and the next (exact when the count is
    # affine in the width, as for the MLP), then a walk to where the count crosses the target;
    # the count grows with the width, so the walk ends.
    first = max(1, get_value(config, key) // step)
    slope = count(first + 1) - count(first)
    if slope <= 0:
        raise ConfigError(f"{key} does not change the parameter count; it cannot match sizes")
    guess = max(1, first + round((target - count(first)) / slope))
    if count(guess) < target:
        while count(guess + 1) < target:
            guess += 1
        low, high = guess, guess + 1
    else:
        while guess > 1 and count(guess - 1) >= target:
            guess -= 1
        low, high = guess - 1, guess
    if low < 1:
        if count(high) > target:
            raise ConfigError(f"cannot match {target:,} parameters by {key}: already "
                              f"{count(high):,} at {key} = {high * step}")
        low = high
    best = min((low, high), key=lambda m: (abs(count(m) - target), m))
    best_config = with_value(config, key, best * step)
    return best_config, count_params(best_config)


def _itemsize(dtype_name: str) -> int:
    return np.dtype(jax.numpy.dtype(dtype_name)).itemsize


def layer_state_bytes(config: ModelConfig, letter: str, seq_len: int) -> int:
    """Bytes one layer of ``letter`` keeps per sequence for generation (module docstring)."""
    compute = _itemsize(config.compute_dtype)
    if letter == "M":
        cfg = config.m2rnn
        state = cfg.num_heads * cfg.key_dim * cfg.value_dim * FLOAT32_BYTES
        return state + cfg.conv_kernel * cfg.conv_width * compute
    if letter == "D":
        cfg = config.gated_deltanet
        state = cfg.num_heads * cfg.key_dim * cfg.value_dim * FLOAT32_BYTES
        conv_width = cfg.num_heads * (2 * cfg.key_dim + cfg.value_dim)
        return state + cfg.conv_kernel * conv_width * compute
    if letter == "S":
        cfg = config.mamba2
        state = cfg.num_heads * cfg.head_dim * cfg.state_dim * FLOAT32_BYTES
        conv_width = cfg.num_heads * cfg.head_dim + 2 * cfg.num_groups * cfg.state_dim
        return state + cfg.conv_kernel * conv_width * compute
    if letter == ATTENTION:
        return 2 * config.attention.kv_heads * config.attention_head_dim * seq_len * compute
    raise ValueError(f"no state size known for layer letter {letter!r}")


def state_bytes(config: ModelConfig, seq_len: int) -> dict:
    """Per letter of the pattern: bytes per layer; plus totals over the recurrent layers and
    over the attention layers (their KV caches at ``seq_len``)."""
    letters = dict.fromkeys(config.layer_pattern)
    per_layer = {letter: layer_state_bytes(config, letter, seq_len) for letter in letters}
    recurrent = sum(per_layer[c] for c in config.layer_pattern if c != ATTENTION)
    kv_cache = sum(per_layer[c] for c in config.layer_pattern if c == ATTENTION)
    return {"per_layer": per_layer, "recurrent_total": recurrent, "kv_cache_total": kv_cache}
