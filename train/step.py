"""Sharded training state and the jitted train / eval steps.

The state is a plain pytree ``{"params", "opt_state", "step", "rng", "health"}`` (parameters
in the pure-dict form of the model's ``nnx.State``), so jit shardings, Orbax and optax all see
the same structure. Shardings come from the parameters' logical axes through
``train.sharding``.

``health`` is a small record the train step keeps on the device: the loop step, how many steps
had a non-finite loss or gradient norm, and the first of them. Nothing waits for it; the loop
reads it when the host syncs anyway (logging, evaluation, saving). It is not checkpointed (a
restored run starts it again with ``init_health``). With ``on_nonfinite = "skip"`` such a step,
or one whose update would make the state non-finite, leaves the rest of the state as it was
(``step`` included, so the learning-rate schedule waits too); with ``"stop"`` the step is
computed exactly as without the check.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from m2rnn_jax import HybridLM
from m2rnn_jax.parallel import MeshAxes
from m2rnn_jax.typed_config import ConfigError
from train import sharding
from train.data import model_inputs
from train.optimizer import make_optimizer


@dataclasses.dataclass
class Trainee:
    """Everything the loop needs about the model on a mesh (no arrays allocated yet)."""

    graphdef: object
    abstract_params: object  # nnx.State of abstract Params (logical axes, weight-decay flags)
    optimizer: optax.GradientTransformation
    schedule: object
    mesh: jax.sharding.Mesh
    state_shardings: dict
    train_step: object  # (state, batch) -> (state, metrics)
    eval_step: object  # (params, batch) -> (loss_sum, target_count)
    init_state: object  # () -> sharded initial state
    init_health: object  # (step) -> the state's health record for a run restored at that step
    state_is_finite: object  # (state) -> bool array: every float in the state is finite

    @property
    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(self.abstract_params)))

    def abstract_state(self):
        """The state's shapes, dtypes and shardings (an Orbax restore target)."""
        shapes = jax.eval_shape(self.init_state)
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings)


def abstract_model(model_config, *, remat=False, axes=MeshAxes()):
    """``(graphdef, abstract params State)`` without allocating parameters."""
    model = nnx.eval_shape(lambda: HybridLM(model_config, rngs=nnx.Rngs(0), remat=remat,
                                            axes=axes))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError(f"the trainer expects a model whose only state is nnx.Param, found "
                         f"{list(rest.flat_state())[:3]}")
    return graphdef, params


def active_shares(model_config, abstract_params) -> list:
    """``(path, shape, share)`` of every parameter: the share of it one token uses. Routed
    experts' weights (those whose first logical axis is ``experts``: one slice per expert) have
    ``top_k / num_experts``, every other parameter 1."""
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(abstract_params))[0]
    specs = jax.tree.leaves(nnx.to_pure_dict(nnx.get_partition_spec(abstract_params)),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    moe = model_config.moe
    routed = moe.top_k / moe.num_experts if moe.enabled else 1.0
    return [(tuple(str(getattr(k, "key", k)) for k in path), leaf.shape,
             routed if tuple(spec)[:1] == ("experts",) else 1.0)
            for (path, leaf), spec in zip(flat, specs, strict=True)]


def parameter_counts(model_config) -> tuple[int, int]:
    """``(total, active per token)`` parameters of a model, without allocating it
    (``active_shares`` says what a token uses)."""
    shares = active_shares(model_config, abstract_model(model_config)[1])
    total = sum(math.prod(shape) for _, shape, _ in shares)
    active = sum(math.prod(shape) * share for _, shape, share in shares)
    return total, round(active)


def describe_parameters(model_config) -> str:
    """What ``m2rnn-train --dry-run`` prints: the model's shape and parameter counts."""
    total, active = parameter_counts(model_config)
    moe = model_config.moe
    routing = (f"; {moe.num_experts} experts, top-{moe.top_k} routing" if moe.enabled
               else "")
    return (f"model: {model_config.num_layers} layers {model_config.layer_pattern}, d_model "
            f"{model_config.d_model}, vocab {model_config.vocab_size}{routing}\n"
            f"parameters: {total:,} total ({_short(total)}), {active:,} active per token "
            f"({_short(active)})")


def _short(count) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


# Train metrics that only mixture-of-experts models have (``train_step`` says what they are).
MOE_METRICS = ("moe_aux_loss", "expert_load_max", "expert_load_min")


def token_cross_entropy(logits, targets):
    """Cross-entropy in nats per token from float32 ``logits (..., V)`` and integer ``targets``:
    ``logsumexp(logits) - logits[target]``, the target's logit picked by comparing against the
    vocabulary's indices rather than gathered. Its gradient is then one pass (softmax minus
    one-hot) where a gather's is a scatter into a zeroed logits-sized buffer plus a pass."""
    picked = jnp.sum(jnp.where(jnp.arange(logits.shape[-1]) == targets[..., None], logits, 0.0),
                     axis=-1)
    return jax.nn.logsumexp(logits, axis=-1) - picked


def loss_terms(graphdef, params, tokens, segment_ids):
    """``(summed cross-entropy in nats, number of targets, aux)`` over rows of ``seq_len + 1``
    tokens; ``aux`` is the model's ``HybridLM.forward`` dict (``{}`` without MoE blocks)."""
    inputs, input_segments, targets, mask = model_inputs(tokens, segment_ids)
    logits, aux = nnx.merge(graphdef, params).forward(inputs, segment_ids=input_segments)
    losses = token_cross_entropy(logits.astype(jnp.float32), targets)
    return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(mask), aux


def loss_sums(graphdef, params, tokens, segment_ids):
    """(summed cross-entropy in nats, number of targets) over rows of ``seq_len + 1`` tokens."""
    total, count, _ = loss_terms(graphdef, params, tokens, segment_ids)
    return total, count


def all_finite(tree):
    """A scalar bool: every floating-point leaf of ``tree`` is finite."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.bool_(True)


def health_at(step):
    """The health record of a run at ``step`` with no non-finite step seen."""
    return {"step": jnp.asarray(step, jnp.int32), "nonfinite": jnp.zeros((), jnp.int32),
            "first_nonfinite": jnp.full((), -1, jnp.int32)}


def record_health(health, finite):
    """``health`` after one more step, finite or not."""
    step = health["step"] + 1
    first = jnp.where((health["first_nonfinite"] < 0) & ~finite, step,
                      health["first_nonfinite"])
    return {"step": step, "nonfinite": health["nonfinite"] + (~finite).astype(jnp.int32),
            "first_nonfinite": first}


def build_trainee(config, mesh) -> Trainee:
    """Model, optimizer and jitted steps of a ``TrainConfig`` on ``mesh``."""
    axes = sharding.model_axes(mesh, context_microbatches=config.mesh.context_microbatches)
    ways = axes.batch_size
    if config.micro_batch_size % ways:
        raise ConfigError(
            f"data.batch_size = {config.data.batch_size} over optimizer.grad_accum_steps = "
            f"{config.optimizer.grad_accum_steps} gives micro-batches of "
            f"{config.micro_batch_size} rows, which the mesh's data x fsdp x expert = {ways} "
            f"devices do not divide")
    contexts = axes.size(axes.context)
    if config.data.seq_len % contexts:
        raise ConfigError(f"data.seq_len = {config.data.seq_len} must be divisible by "
                          f"mesh.context = {contexts}")
    history = config.model.m2rnn.conv_kernel - 1 if "M" in config.model.layer_pattern else 0
    if contexts > 1 and config.data.seq_len // contexts < history:
        raise ConfigError(f"data.seq_len / mesh.context = {config.data.seq_len // contexts} "
                          f"steps per shard is shorter than the conv window of "
                          f"{history} steps (model.m2rnn.conv_kernel - 1)")
    try:
        graphdef, abstract_params = abstract_model(config.model, remat=config.remat, axes=axes)
    except ValueError as err:  # a layer that the mesh cannot split (heads, experts)
        raise ConfigError(f"the model does not fit the mesh {dict(mesh.shape)}: {err} (head "
                          f"counts in model.m2rnn / model.attention must be 1 or multiples of "
                          f"mesh.tensor, model.moe.num_experts a multiple of mesh.expert)"
                          ) from None
    optimizer, schedule = make_optimizer(config.optimizer, abstract_params, config.steps)

    param_shardings = sharding.param_shardings(abstract_params, mesh)
    opt_shapes = jax.eval_shape(optimizer.init, nnx.to_pure_dict(abstract_params))
    replicated = sharding.replicated(mesh)
    # Optimizer moments follow their parameter's sharding; counters are replicated.
    opt_shardings = optax.tree_map_params(optimizer, lambda _, s: s, opt_shapes, param_shardings,
                                          transform_non_params=lambda _: replicated)
    state_shardings = {"params": param_shardings, "opt_state": opt_shardings,
                       "step": replicated, "rng": replicated,
                       "health": {key: replicated for key in health_at(0)}}

    model_config, seed, remat = config.model, config.seed, config.remat
    is_moe, aux_loss_weight = model_config.moe.enabled, model_config.moe.aux_loss_weight
    skip_nonfinite = config.on_nonfinite == "skip"

    def init_state(seed_value):
        model = HybridLM(model_config, rngs=nnx.Rngs(jax.random.key(seed_value)), remat=remat,
                         axes=axes)
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        return {"params": params, "opt_state": optimizer.init(params),
                "step": jnp.zeros((), jnp.int32),
                # Kept and checkpointed for stochastic layers; the current model has none.
                "rng": jax.random.key_data(jax.random.key(seed_value + 1)),
                "health": health_at(0)}

    accum = config.optimizer.grad_accum_steps
    # Batches arrive as (accum, micro_batch, seq_len + 1); the micro-batch axis is sharded.
    train_batch_sharding = {key: sharding.batch_sharding(mesh, 3, leading=1)
                            for key in ("tokens", "segment_ids")}
    eval_batch_sharding = {key: sharding.batch_sharding(mesh, 2)
                           for key in ("tokens", "segment_ids")}

    def train_step(state, batch):
        params = state["params"]
        _, _, _, mask = model_inputs(batch["tokens"], batch["segment_ids"])
        # Gradients of the token-mean over the whole batch, however it is split.
        num_targets = jnp.maximum(jnp.sum(mask), 1)

        def micro_loss(p, tokens, segment_ids):
            """The micro-batch's share of the objective, and of the logged terms."""
            total, _, aux = loss_terms(graphdef, p, tokens, segment_ids)
            terms = {"loss": total / num_targets}
            if not is_moe:
                return terms["loss"], terms
            # Each micro-batch's load-balancing loss is a mean over its own tokens.
            terms["moe_aux_loss"] = aux["moe_aux_loss"] / accum
            terms["expert_load"] = aux["expert_load"] / accum
            return terms["loss"] + aux_loss_weight * terms["moe_aux_loss"], terms

        grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
        if accum == 1:
            (_, terms), grads = grad_fn(params, batch["tokens"][0], batch["segment_ids"][0])
        else:
            def accumulate(totals, micro):
                (_, terms_i), grads_i = grad_fn(params, micro["tokens"], micro["segment_ids"])
                return jax.tree.map(jnp.add, totals, (terms_i, grads_i)), None

            zero_terms = {"loss": jnp.zeros((), jnp.float32)}
            if is_moe:  # every block of a MoE model has a MoE MLP
                zero_terms.update(moe_aux_loss=jnp.zeros((), jnp.float32),
                                  expert_load=jnp.zeros((model_config.num_layers,
                                                         model_config.moe.num_experts)))
            zeros = jax.tree.map(jnp.zeros_like, params)
            (terms, grads), _ = jax.lax.scan(accumulate, (zero_terms, zeros), batch)
        loss = terms["loss"]  # the cross-entropy alone, comparable across models
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                     "step": state["step"] + 1, "rng": state["rng"]}
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if skip_nonfinite:
            finite &= all_finite((new_state["params"], new_state["opt_state"]))
            new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state,
                                     {key: state[key] for key in new_state})
        new_state["health"] = record_health(state["health"], finite)
        metrics = {"loss": loss, "grad_norm": grad_norm,
                   "learning_rate": schedule(state["step"]), "targets": num_targets}
        if is_moe:
            # Per MoE layer, max and min over experts of load / mean load (1 = balanced),
            # averaged over layers; the loads are the whole batch's.
            load = terms["expert_load"]
            ratio = load / jnp.mean(load, axis=-1, keepdims=True)
            metrics.update(moe_aux_loss=terms["moe_aux_loss"],
                           expert_load_max=jnp.mean(jnp.max(ratio, axis=-1)),
                           expert_load_min=jnp.mean(jnp.min(ratio, axis=-1)))
        return new_state, metrics

    def eval_step(params, batch):
        return loss_sums(graphdef, params, batch["tokens"], batch["segment_ids"])

    jitted_train = jax.jit(train_step, in_shardings=(state_shardings, train_batch_sharding),
                           out_shardings=(state_shardings, replicated), donate_argnums=(0,))
    jitted_eval = jax.jit(eval_step, in_shardings=(param_shardings, eval_batch_sharding),
                          out_shardings=replicated)
    # The seed is a traced argument, not a constant, so that XLA has nothing to constant-fold in
    # the random initialisation (folding it makes the compilation slow on large models).
    jitted_init = functools.partial(jax.jit(init_state, out_shardings=state_shardings),
                                    jnp.asarray(seed, jnp.int32))
    jitted_health = jax.jit(health_at, out_shardings=state_shardings["health"])
    return Trainee(graphdef=graphdef, abstract_params=abstract_params, optimizer=optimizer,
                   schedule=schedule, mesh=mesh, state_shardings=state_shardings,
                   train_step=jitted_train, eval_step=jitted_eval, init_state=jitted_init,
                   init_health=lambda step: jitted_health(jnp.asarray(step, jnp.int32)),
                   state_is_finite=jax.jit(all_finite, in_shardings=(state_shardings,),
                                           out_shardings=replicated))


def put_batch(batch, trainee: Trainee, *, accum_steps=None):
    """Numpy rows -> global arrays sharded over (data, fsdp).

    Train (``accum_steps`` given): ``batch`` holds this process's rows, reshaped to
    ``(accum, micro, S+1)``. Eval: ``batch`` holds the whole batch on every process; each
    process contributes its own contiguous share (the loss sums do not depend on the order).
    """
    out = {}
    for key, rows in batch.items():
        if accum_steps is not None:
            rows = rows.reshape(accum_steps, -1, rows.shape[-1])
            target = sharding.batch_sharding(trainee.mesh, 3, leading=1)
        else:
            share = rows.shape[0] // jax.process_count()
            rows = rows[jax.process_index() * share:(jax.process_index() + 1) * share]
            target = sharding.batch_sharding(trainee.mesh, 2)
        out[key] = jax.make_array_from_process_local_data(target, rows)
    return out
