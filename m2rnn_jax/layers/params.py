"""Parameters with logical sharding axes and a weight-decay flag, declared once per parameter.

Every parameter of every layer is an ``nnx.Param`` made by ``make_param``, which records

* ``out_sharding``: one logical axis name per dimension, drawn from ``LOGICAL_AXES``; the
  training system maps these names to mesh axes in one table (e.g. with
  ``flax.linen.logical_axis_rules(rules)`` around ``nnx.get_partition_spec(state)``, or by
  reading ``logical_axes(state)``);
* ``weight_decay``: ``False`` for norm scales, biases, ``A_log``, ``dt_bias`` and ``D``
  (``no_decay_mask`` / ``decay_mask`` turn this into an optax mask).

Eager sharding is switched off for these parameters: logical names are not mesh axes, so the
model can be built with or without a mesh and sharded afterwards by the trainer.
"""

import jax
import jax.numpy as jnp
from flax import nnx

# The logical axis vocabulary (dimension -> meaning):
LOGICAL_AXES = (
    "vocab",     # vocabulary (embedding rows, LM-head columns)
    "embed",     # d_model
    "mlp",       # MLP hidden width
    "mixer",     # flattened in-projection output / out-projection input of a mixer (heads × dims)
    "heads",     # per-head parameters (M²RNN W, A_log, dt_bias, D's head axis)
    "head_dim",  # small per-head dims (never sharded)
    "state",     # recurrent-state dims (never sharded)
    "conv",      # conv kernel taps
    "norm",      # norm scales
    "experts",   # the expert index of a mixture-of-experts MLP's weights
    "expert_mlp",  # an expert's hidden width (small; not split)
)


def make_param(value, axes, *, weight_decay=True):
    """An ``nnx.Param`` holding ``value`` with one logical axis name per dimension."""
    axes = tuple(axes)
    if len(axes) != value.ndim:
        raise ValueError(f"axes {axes} must name each of the {value.ndim} dims of shape "
                         f"{value.shape}")
    unknown = [a for a in axes if a not in LOGICAL_AXES]
    if unknown:
        raise ValueError(f"unknown logical axes {unknown}; known: {LOGICAL_AXES}")
    return nnx.Param(value, out_sharding=axes, eager_sharding=False, weight_decay=weight_decay)


def normal(key, shape, std, dtype):
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _is_variable(x):
    return isinstance(x, nnx.Variable)


def decay_mask(state):
    """Pytree of bool matching ``state`` (an ``nnx.State`` of Params): True = apply weight decay.

    Usable as ``optax.add_decayed_weights(wd, mask=decay_mask(nnx.state(model, nnx.Param)))``
    after turning the State into the same structure the optimizer sees (``nnx.to_pure_dict``
    of both, or keep both as State).
    """
    return jax.tree.map(lambda v: bool(v.get_metadata().get("weight_decay", True)), state,
                        is_leaf=_is_variable)


def no_decay_mask(state):
    """Pytree of bool matching ``state``: True for parameters excluded from weight decay."""
    return jax.tree.map(lambda v: not v.get_metadata().get("weight_decay", True), state,
                        is_leaf=_is_variable)


def logical_axes(state):
    """Pytree of tuples of logical axis names matching ``state`` (None for unannotated)."""
    return jax.tree.map(lambda v: v.get_metadata().get("out_sharding"), state,
                        is_leaf=_is_variable)


def model_dtypes(config):
    """``(compute dtype, param dtype)`` of a ``ModelConfig``."""
    return jnp.dtype(config.compute_dtype), jnp.dtype(config.param_dtype)


def out_proj_std(config):
    """Init std of projections that write into the residual stream (depth-scaled, GPT-2 style)."""
    if config.depth_scaled_init:
        return config.init_std / (2 * config.num_layers) ** 0.5
    return config.init_std
