"""Mixture-of-experts MLP: the grouped-matmul layer against a dense loop over experts (outputs,
balancing loss, loads, gradients); the expert-parallel layer on simulated meshes against the
unsplit one; the model's router statistics; the train step's MoE terms and metrics; config
errors."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from m2rnn_jax import HybridLM, ModelConfig
from m2rnn_jax.config import MoEConfig
from m2rnn_jax.layers.moe import MoE
from m2rnn_jax.parallel import MeshAxes
from m2rnn_jax.typed_config import ConfigError, from_dict, load_yaml
from train import sharding, step, trainer
from train.config import MeshConfig, TrainConfig

HIGHEST = jax.lax.Precision.HIGHEST
D_MODEL = 16


def moe_model_config(*, num_experts=8, top_k=2, shared=0, normalize=True, **model):
    settings = dict(vocab_size=64, d_model=D_MODEL, layer_pattern="A",
                    attention={"num_heads": 2}, compute_dtype="float32",
                    moe={"num_experts": num_experts, "top_k": top_k, "expert_hidden_dim": 8,
                         "shared_expert_hidden_dim": shared, "normalize_top_k": normalize})
    settings.update(model)
    return from_dict(ModelConfig, settings)


def randomize(module, seed):
    """Fresh O(1)-scale parameters (scaled by fan-in), so that routing and outputs vary."""
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(nnx.to_pure_dict(state))
    rng = np.random.default_rng(seed)
    new = [jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(leaf.shape[-2]), jnp.float32)
           for leaf in leaves]
    nnx.replace_by_pure_dict(state, jax.tree.unflatten(treedef, new))
    nnx.update(module, state)
    return module


def dense_reference(layer, x, top_k, normalize):
    """The MoE written as a loop over experts, each applied densely to every token and weighted
    by the token's routing weight for it (0 when not chosen); float32 at HIGHEST precision."""
    mm = lambda a, b: jnp.matmul(a, b, precision=HIGHEST)
    router, gate, up, down = (layer.router[...], layer.gate[...], layer.up[...],
                              layer.down[...])
    num_experts = router.shape[1]
    tokens = x.reshape(-1, x.shape[-1])
    probs = jax.nn.softmax(mm(tokens, router), axis=-1)
    rank = jnp.argsort(jnp.argsort(-jax.lax.stop_gradient(probs), axis=-1), axis=-1)
    chosen = rank < top_k
    combine = jnp.where(chosen, probs, 0.0)
    if normalize:
        combine = combine / jnp.sum(combine, axis=-1, keepdims=True)
    y = jnp.zeros_like(tokens)
    for e in range(num_experts):
        hidden = jax.nn.silu(mm(tokens, gate[e])) * mm(tokens, up[e])
        y = y + combine[:, e:e + 1] * mm(hidden, down[e])
    if layer.shared is not None:
        shared = layer.shared
        y = y + mm(jax.nn.silu(mm(tokens, shared.gate.kernel[...]))
                   * mm(tokens, shared.up.kernel[...]), shared.down.kernel[...])
    load = jnp.mean(chosen.astype(jnp.float32), axis=0) / top_k
    aux_loss = num_experts * jnp.sum(load * jnp.mean(probs, axis=0))
    return y.reshape(x.shape), {"aux_loss": aux_loss, "load": load}


CASES = [(1, 0, True), (2, 12, True), (3, 0, False), (1, 12, False)]


@pytest.mark.parametrize("top_k,shared,normalize", CASES)
def test_layer_matches_a_dense_loop_over_experts(top_k, shared, normalize):
    config = moe_model_config(top_k=top_k, shared=shared, normalize=normalize)
    layer = randomize(MoE(config, rngs=nnx.Rngs(0)), seed=top_k + shared)
    x = jnp.asarray(np.random.default_rng(10 + top_k).normal(size=(3, 7, D_MODEL)), jnp.float32)
    y, stats = layer(x)
    want_y, want_stats = dense_reference(layer, x, top_k, normalize)
    assert y.shape == x.shape and y.dtype == jnp.float32
    np.testing.assert_allclose(y, want_y, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(stats["load"], want_stats["load"], rtol=1e-6)
    np.testing.assert_allclose(stats["aux_loss"], want_stats["aux_loss"], rtol=1e-5)
    assert abs(float(jnp.sum(stats["load"])) - 1) < 1e-6
    assert float(jnp.max(stats["load"])) < 1  # several experts used: the test can tell them apart


@pytest.mark.parametrize("top_k,shared,normalize", CASES[1:3])
def test_gradients_through_the_grouped_matmuls_match_the_dense_loop(top_k, shared, normalize):
    config = moe_model_config(top_k=top_k, shared=shared, normalize=normalize)
    layer = randomize(MoE(config, rngs=nnx.Rngs(0)), seed=7)
    x = jnp.asarray(np.random.default_rng(11).normal(size=(2, 9, D_MODEL)), jnp.float32)
    target = jnp.asarray(np.random.default_rng(12).normal(size=x.shape), jnp.float32)

    def loss(layer, x, reference):
        y, stats = dense_reference(layer, x, top_k, normalize) if reference else layer(x)
        return jnp.sum((y - target) ** 2) + 3.0 * stats["aux_loss"]

    got = nnx.grad(loss, argnums=(0, 1))(layer, x, False)
    want = nnx.grad(loss, argnums=(0, 1))(layer, x, True)
    got_params, want_params = (nnx.to_pure_dict(g[0]) for g in (got, want))
    for (path, value), got_value in zip(jax.tree_util.tree_leaves_with_path(want_params),
                                        jax.tree.leaves(got_params), strict=True):
        assert float(jnp.max(jnp.abs(value))) > 0, path  # every parameter is reached
        np.testing.assert_allclose(got_value, value, rtol=1e-4, atol=1e-5, err_msg=str(path))
    np.testing.assert_allclose(got[1], want[1], rtol=1e-4, atol=1e-5)


LAYOUTS = {
    "data2_expert4": lambda: sharding.model_axes(
        sharding.make_mesh(MeshConfig(data=2, expert=4))),
    "data2_expert2_context2": lambda: sharding.model_axes(
        sharding.make_mesh(MeshConfig(data=2, expert=2, context=2))),
    "data8_no_expert_axis": lambda: sharding.model_axes(sharding.make_mesh(MeshConfig(data=8))),
    # The expert axis splits only the experts; the tokens are the same on its devices.
    "expert_axis_outside_batch": lambda: MeshAxes(
        mesh=sharding.make_mesh(MeshConfig(data=2, expert=4)), batch=("data",),
        expert="expert"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_split_layer_matches_the_unsplit_layer(layout):
    axes = LAYOUTS[layout]()
    config = moe_model_config(num_experts=8, top_k=3, shared=12)
    plain = randomize(MoE(config, rngs=nnx.Rngs(0)), seed=3)
    split = MoE(config, rngs=nnx.Rngs(0), axes=axes)
    nnx.update(split, nnx.state(plain, nnx.Param))
    # Parameters laid out as the trainer lays them out (experts over the expert axis).
    state = nnx.state(split, nnx.Param)
    placed = jax.device_put(nnx.to_pure_dict(state), sharding.param_shardings(state, axes.mesh))
    nnx.replace_by_pure_dict(state, placed)
    nnx.update(split, state)

    x = jnp.asarray(np.random.default_rng(5).normal(size=(8, 6, D_MODEL)), jnp.float32)
    x_split = jax.device_put(x, NamedSharding(axes.mesh, PartitionSpec(axes.batch_spec(),
                                                                       axes.context)))

    def loss(layer, x):
        y, stats = layer(x)
        return jnp.sum(jnp.sin(y)) + stats["aux_loss"], (y, stats)

    run = nnx.jit(nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    (want_loss, (want_y, want_stats)), want_grads = run(plain, x)
    (got_loss, (got_y, got_stats)), got_grads = run(split, x_split)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_stats["load"], want_stats["load"], rtol=1e-6)
    np.testing.assert_allclose(got_stats["aux_loss"], want_stats["aux_loss"], rtol=1e-6)
    np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
    for got, want in zip(jax.tree.leaves(nnx.to_pure_dict(got_grads[0])),
                         jax.tree.leaves(nnx.to_pure_dict(want_grads[0])), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got_grads[1], want_grads[1], rtol=1e-4, atol=1e-6)


def test_expert_count_must_divide_over_the_expert_axis():
    axes = sharding.model_axes(sharding.make_mesh(MeshConfig(data=2, expert=4)))
    with pytest.raises(ValueError, match="moe.num_experts = 6 must be divisible"):
        MoE(moe_model_config(num_experts=6), rngs=nnx.Rngs(0), axes=axes)


def test_model_forward_returns_router_statistics():
    config = moe_model_config(num_experts=4, top_k=2, shared=8, layer_pattern="AAA")
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, size=(2, 10)), jnp.int32)
    model = HybridLM(config, rngs=nnx.Rngs(1))
    remat = HybridLM(config, rngs=nnx.Rngs(1), remat=True)

    @nnx.jit
    def run(model, remat, tokens):
        prefill_logits, caches = model.prefill(tokens[:, :-1], max_len=10)
        return {"forward": model.forward(tokens), "call": model(tokens),
                "remat": remat.forward(tokens), "prefill": prefill_logits,
                "decode": model.decode_step(tokens[:, -1], caches)[0]}

    out = run(model, remat, tokens)
    logits, aux = out["forward"]
    assert sorted(aux) == ["expert_load", "moe_aux_loss"]
    assert aux["expert_load"].shape == (3, 4) and aux["moe_aux_loss"].shape == ()
    np.testing.assert_allclose(jnp.sum(aux["expert_load"], axis=1), 1.0, rtol=1e-6)
    assert float(aux["moe_aux_loss"]) >= 3 * (1 - 1e-6)  # each layer's loss is >= 1
    np.testing.assert_array_equal(out["call"], logits)
    # Remat recomputes the same blocks.
    np.testing.assert_allclose(out["remat"][0], logits, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["remat"][1]["moe_aux_loss"], aux["moe_aux_loss"], rtol=1e-6)
    # Generation uses the MoE blocks too: prefill then one decode step give the full pass.
    np.testing.assert_allclose(out["prefill"], logits[:, :-1], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(out["decode"], logits[:, -1], rtol=1e-4, atol=1e-5)

    dense_config = from_dict(ModelConfig, {"vocab_size": 64, "d_model": D_MODEL,
                                           "layer_pattern": "A", "attention": {"num_heads": 2},
                                           "mlp": {"hidden_dim": 8}})
    dense = HybridLM(dense_config, rngs=nnx.Rngs(0))
    assert nnx.eval_shape(lambda m: m.forward(tokens)[1], dense) == {}


@pytest.fixture(scope="module")
def build_once():
    """The trainer and the step test share one compiled trainee per (config, mesh)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "build_trainee", functools.cache(step.build_trainee))
        yield trainer.build_trainee


def tiny_train_config(corpus_dir, *, accum=2, aux_loss_weight=100.0, num_experts=4):
    return from_dict(TrainConfig, {
        "steps": 2, "seed": 0,
        "model": {"vocab_size": 256, "d_model": D_MODEL, "layer_pattern": "AA",
                  "attention": {"num_heads": 2}, "compute_dtype": "float32",
                  "moe": {"num_experts": num_experts, "top_k": 2, "expert_hidden_dim": 8,
                          "aux_loss_weight": aux_loss_weight}},
        "optimizer": {"learning_rate": 1e-3, "grad_accum_steps": accum},
        "data": {"source": "text", "paths": [str(corpus_dir)], "validation_fraction": 0.25,
                 "seq_len": 8, "batch_size": 4, "eval_rows": 4},
        "mesh": {"data": 1}, "checkpoint": {"every_steps": 0, "async_save": False},
        "logging": {"eval_every": 0, "log_every": 1, "progress_bar": False, "plot": False}})


def one_device_mesh():
    return sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1])


def test_train_step_adds_the_weighted_balancing_loss_and_logs_moe_metrics(corpus_dir,
                                                                         build_once):
    config = tiny_train_config(corpus_dir)
    trainee = build_once(config, one_device_mesh())
    state = trainee.init_state()
    params = state["params"]
    rows = np.random.default_rng(0).integers(0, 256, size=(4, 9)).astype(np.int32)
    segments = np.ones_like(rows)

    # By hand: two micro-batches of 2 rows; the objective is the token-mean cross-entropy plus
    # the weight times the micro-batches' mean balancing loss.
    targets = 4 * 8  # rows × next-token targets per row

    def objective(params):
        cross_entropy, aux_loss, loads = 0.0, 0.0, 0.0
        for micro in (slice(0, 2), slice(2, 4)):
            total, _, aux = step.loss_terms(trainee.graphdef, params, rows[micro],
                                            segments[micro])
            cross_entropy += total / targets
            aux_loss += aux["moe_aux_loss"] / 2
            loads += aux["expert_load"] / 2
        return cross_entropy + 100.0 * aux_loss, (cross_entropy, aux_loss, loads)

    both_grads = jax.jit(lambda p: (jax.grad(objective, has_aux=True)(p),
                                    jax.grad(lambda q: objective(q)[1][0])(p)))
    (grads, (cross_entropy, aux_loss, loads)), ce_grads = both_grads(params)
    batch = step.put_batch({"tokens": rows, "segment_ids": segments}, trainee, accum_steps=2)
    _, metrics = jax.device_get(trainee.train_step(state, batch))  # donates state
    assert float(aux_loss) >= 2 * (1 - 1e-6)  # two MoE layers, each >= 1
    np.testing.assert_allclose(metrics["loss"], cross_entropy, rtol=1e-5)
    np.testing.assert_allclose(metrics["moe_aux_loss"], aux_loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-4)
    ratios = np.asarray(loads) * 4  # load / mean load over 4 experts
    np.testing.assert_allclose(metrics["expert_load_max"], ratios.max(axis=1).mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["expert_load_min"], ratios.min(axis=1).mean(), rtol=1e-5)
    # The balancing term is a visible part of the gradient at this weight.
    assert abs(float(optax.tree.norm(ce_grads)) - float(metrics["grad_norm"])) > 1e-3


def test_moe_metrics_reach_metrics_jsonl(corpus_dir, tmp_path, build_once):
    trainer.train(tiny_train_config(corpus_dir), tmp_path, devices=jax.devices()[:1],
                  log=lambda *_: None)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_records = [r for r in records if r["kind"] == "train"]
    assert len(train_records) == 2
    for record in train_records:
        assert set(step.MOE_METRICS) <= set(record), record
        assert record["expert_load_max"] >= 1 >= record["expert_load_min"]


def test_dense_train_step_has_no_moe_metrics(corpus_dir):
    trainee = step.build_trainee(tiny_train_config(corpus_dir, num_experts=0),
                                 one_device_mesh())
    batch = {key: jax.ShapeDtypeStruct((2, 2, 9), jnp.int32) for key in ("tokens", "segment_ids")}
    _, metrics = jax.eval_shape(trainee.train_step, trainee.abstract_state(), batch)
    assert set(metrics) == {"loss", "grad_norm", "learning_rate", "targets"}


@pytest.mark.parametrize("moe,message", [
    ({"num_experts": 4, "top_k": 5}, "moe.top_k = 5 must not exceed moe.num_experts = 4"),
    ({"num_experts": -1}, "moe.num_experts must be 0"),
    ({"num_experts": 4, "top_k": 0}, "moe.top_k must be a positive integer"),
    ({"num_experts": 8, "expert_hidden_dim": 0}, "moe.expert_hidden_dim must be a positive"),
    ({"num_experts": 8, "shared_expert_hidden_dim": -8}, "moe.shared_expert_hidden_dim must"),
    ({"num_experts": 8, "aux_loss_weight": -0.1}, "moe.aux_loss_weight must be a finite"),
    ({"num_experts": 8, "aux_loss_weight": float("nan")}, "moe.aux_loss_weight must be a"),
    ({"num_experts": 8, "normalize_top_k": 1}, "moe.normalize_top_k must be bool"),
    ({"num_experts": 4, "capacity": 2}, "unknown config key in moe: moe.capacity"),
    ({"num_experts": 4.5}, "moe.num_experts must be int"),
])
def test_config_errors_name_the_key(moe, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        from_dict(ModelConfig, {"moe": moe})


def test_moe_config_loads_from_yaml_and_defaults_to_dense(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text("d_model: 32\nmoe:\n  num_experts: 8\n  top_k: 2\n  expert_hidden_dim: 16\n"
                    "  shared_expert_hidden_dim: 64\n  aux_loss_weight: 1e-2\n")
    config = load_yaml(ModelConfig, path)
    assert config.moe == MoEConfig(num_experts=8, top_k=2, expert_hidden_dim=16,
                                   shared_expert_hidden_dim=64, aux_loss_weight=0.01)
    assert ModelConfig().moe.num_experts == 0 and not ModelConfig().moe.enabled


@pytest.mark.parametrize("platform, backend", [("cuda", "mosaic_gpu"), ("tpu", "pallas_tpu")])
def test_moe_hybrid_gradient_lowers_for_gpu_and_tpu(monkeypatch, platform, backend):
    """The MoE hybrid's gradient (grouped matmuls, router, the M²RNN kernels) lowers for both
    accelerators on a machine that has neither: the kernels' real lowerings, not interpret mode."""
    from pallas_kernels import platforms

    monkeypatch.setattr(platforms, "interpret", lambda _: False)
    config = from_dict(ModelConfig, {
        "vocab_size": 256, "d_model": 64, "layer_pattern": "MAM", "compute_dtype": "bfloat16",
        "m2rnn": {"num_heads": 2, "key_dim": 64, "value_dim": 16, "backend": backend},
        "attention": {"num_heads": 4},
        "moe": {"num_experts": 4, "top_k": 2, "expert_hidden_dim": 32,
                "shared_expert_hidden_dim": 32}})
    graphdef, params = nnx.split(HybridLM(config, rngs=nnx.Rngs(0)), nnx.Param)

    def loss(params, tokens):
        return nnx.merge(graphdef, params)(tokens).astype(jnp.float32).mean()

    module = jax.export.export(jax.jit(jax.grad(loss)), platforms=[platform])(
        params, jax.ShapeDtypeStruct((2, 128), jnp.int32)).mlir_module()
    assert "ragged_dot" in module
    assert ("mosaic_gpu" if platform == "cuda" else "tpu_custom_call") in module
