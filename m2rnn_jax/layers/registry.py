"""Layer-pattern letters -> mixer classes.

A mixer constructor has the signature ``cls(config: ModelConfig, *, rngs: nnx.Rngs, axes)``
(``axes`` a ``m2rnn_jax.parallel.MeshAxes``: the mesh axes that split the batch, heads,
sequence and experts; a constructor without ``axes`` is built without it and its layer is split
by XLA alone) and reads
its own sub-config (``config.m2rnn``, ``config.attention``, ``config.gated_deltanet``,
``config.mamba2``, ...), plus ``config.d_model``, ``config.compute_dtype`` /
``config.param_dtype`` (see ``params.model_dtypes``), ``config.init_std`` and
``params.out_proj_std(config)`` for projections into the residual stream. Its instances are
called as ``mixer(x (B, S, d_model), segment_ids=None) -> (B, S, d_model)`` in the compute
dtype, never mixing packed documents (``segment_ids (B, S)`` int) and never looking ahead. Every
parameter is made with ``params.make_param`` (logical axes + weight-decay flag).

For generation a mixer also provides (otherwise ``HybridLM.prefill`` raises
``NotImplementedError`` naming it):

* ``prefill(x (B, S, d_model), segment_ids, max_len) -> (y, cache)``: the full-sequence path
  plus a cache (a pytree of arrays) for continuing each row's last document; ``max_len`` is the
  total number of steps the cache must hold (prompt + new tokens);
* ``decode_step(x (B, 1, d_model), cache) -> (y (B, 1, d_model), cache)`` with the cache's
  shapes unchanged (it runs under ``jax.jit``). A cache entry named ``conv_step`` is the
  ``layers.conv`` ring's counter of tokens decoded: every layer's counts alike, so the
  ``Generator``'s loop carries one for all and sets each layer's before its step.

A mixer class whose input reaches ``Linear`` layers only may set ``takes_normed_row = True``:
given a single row (decoding at batch 1) it then receives a ``linear.NormedRow``, its input norm
left for those layers to fold into their products (one kernel fewer per token). One whose
``decode_step(x, cache, add=None)`` returns ``add + y`` (the block's residual, added by its
output projection: one kernel fewer per token) sets ``decode_step_adds = True``.

Built-in letters: ``M`` (M²RNN) and ``A`` (attention). ``D`` and ``S`` are imported lazily from
``m2rnn_jax.layers.gated_deltanet`` / ``m2rnn_jax.layers.mamba2``, which call
``register_mixer`` when imported.
"""

import functools
import importlib
import inspect

from m2rnn_jax.layers.attention import Attention
from m2rnn_jax.layers.m2rnn import M2RNN

_MIXERS = {"M": M2RNN, "A": Attention}
# Letters whose module registers them on import (kept lazy so that a missing or broken baseline
# module does not stop models without that letter from building).
_LAZY_MODULES = {"D": "m2rnn_jax.layers.gated_deltanet", "S": "m2rnn_jax.layers.mamba2"}


def register_mixer(letter: str, constructor, *, replace: bool = False):
    """Makes ``letter`` in a layer pattern build ``constructor(config, rngs=rngs, axes=axes)``."""
    if not (isinstance(letter, str) and len(letter) == 1 and letter.isalpha()):
        raise ValueError(f"mixer letter must be one alphabetic character, got {letter!r}")
    if letter in _MIXERS and _MIXERS[letter] is not constructor and not replace:
        raise ValueError(f"mixer letter {letter!r} is already registered to "
                         f"{_MIXERS[letter].__name__}; pass replace=True to override")
    _MIXERS[letter] = constructor


def mixer_class(letter: str):
    """The constructor registered for ``letter`` (importing its module if it is lazy)."""
    if letter not in _MIXERS and letter in _LAZY_MODULES:
        importlib.import_module(_LAZY_MODULES[letter])
    if letter not in _MIXERS:
        raise ValueError(f"layer_pattern letter {letter!r} has no registered mixer; known: "
                         f"{sorted(set(_MIXERS) | set(_LAZY_MODULES))}")
    return _MIXERS[letter]


def build_mixer(letter: str, config, *, rngs, axes):
    """The mixer of ``letter`` for ``config``. ``axes`` goes to constructors that take it (the
    built-in mixers); one written before ``axes`` existed is built without it and left to XLA's
    sharding."""
    constructor = mixer_class(letter)
    if _takes_axes(constructor):
        return constructor(config, rngs=rngs, axes=axes)
    return constructor(config, rngs=rngs)


@functools.cache
def _takes_axes(constructor) -> bool:
    # A class's own __init__: nnx's metaclass makes every Module class look like (*args, **kw).
    target = constructor.__init__ if inspect.isclass(constructor) else constructor
    parameters = inspect.signature(target).parameters.values()
    return any(p.name == "axes" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def registered_letters():
    return sorted(set(_MIXERS) | set(_LAZY_MODULES))
