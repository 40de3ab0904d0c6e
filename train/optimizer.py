"""AdamW with warmup + cosine, global-norm clipping and a weight-decay mask from the model."""

import optax
from flax import nnx

from m2rnn_jax import decay_mask


def learning_rate_schedule(config, total_steps: int):
    """Linear warmup from 0 to ``learning_rate``, then cosine down to ``lr · min_lr_ratio``."""
    length = config.schedule_steps or total_steps
    warmup = min(config.warmup_steps, max(length - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(length, warmup + 1), end_value=config.learning_rate * config.min_lr_ratio)


def make_optimizer(config, params_state, total_steps: int):
    """``(optax transformation, schedule)`` for parameters ``params_state`` (an ``nnx.State``).

    The transformation works on the pure-dict form of the parameters
    (``nnx.to_pure_dict(params_state)``); parameters whose ``weight_decay`` metadata is
    False (norm scales, biases, ``A_log``, ``dt_bias``, ``D``) get no weight decay.
    """
    schedule = learning_rate_schedule(config, total_steps)
    mask = nnx.to_pure_dict(decay_mask(params_state))
    parts = []
    if config.clip_grad_norm is not None:
        parts.append(optax.clip_by_global_norm(config.clip_grad_norm))
    parts.append(optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                             weight_decay=config.weight_decay, mask=mask))
    return optax.chain(*parts), schedule
