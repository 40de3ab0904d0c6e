"""HybridLM: parameter counts of the paper's configs, causality, packed documents, gradients."""

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax import HybridLM, ModelConfig, no_decay_mask, register_mixer
from m2rnn_jax.layers import Linear
from m2rnn_jax.typed_config import load_yaml

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "model"


def load(name, **changes):
    return dataclasses.replace(load_yaml(ModelConfig, CONFIGS / f"{name}.yaml"), **changes)


def count_params(model):
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def hand_count_400m(pattern):
    """docs/math.md §3/§4 by hand: d=1024, N=84, K=64, V=16, Nq=Nk=1, SwiGLU 2752, 16 attention
    heads, vocab 50304, untied head, no biases."""
    d, vocab, n, k, v, hidden = 1024, 50304, 84, 64, 16, 2752
    qkv = 1 * k + 1 * k + n * v
    m2rnn = (d * (qkv + n + n * v)  # in_proj -> q|k|v, forget logits, g
             + 4 * qkv  # conv taps
             + n + n  # A_log, dt_bias
             + n * v * v  # W
             + n * v  # D
             + n * v  # output RMSNorm
             + n * v * d)  # out_proj
    attention = 4 * d * d  # q, k, v, o with 16 heads of 64
    block_rest = 2 * d + 3 * d * hidden  # two norms, SwiGLU
    blocks = sum((m2rnn if c == "M" else attention) + block_rest for c in pattern)
    return vocab * d + blocks + d + d * vocab


@pytest.mark.parametrize("name", ["m2rnn_400m", "hybrid_400m"])
def test_400m_parameter_counts(name):
    config = load(name)
    model = nnx.eval_shape(lambda: HybridLM(config, rngs=nnx.Rngs(0)))  # no 400M allocation
    assert config.num_layers == 24
    assert config.layer_pattern.count("A") == (3 if name == "hybrid_400m" else 0)
    assert count_params(model) == hand_count_400m(config.layer_pattern)


@pytest.fixture(scope="module")
def tiny():
    config = load("tiny_hybrid")
    return config, HybridLM(config, rngs=nnx.Rngs(0))


@nnx.jit
def forward(model, tokens, segment_ids=None):
    """One compilation per input shape keeps these tests fast (eager dispatch is slow)."""
    return model(tokens, segment_ids)


def random_tokens(seed, shape, vocab=256):
    return jax.random.randint(jax.random.key(seed), shape, 0, vocab, jnp.int32)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_forward_shapes_and_dtypes(compute_dtype):
    config = load("tiny_hybrid", compute_dtype=compute_dtype, tie_embeddings=True)
    model = HybridLM(config, rngs=nnx.Rngs(0))
    assert model.lm_head is None
    logits = forward(model, random_tokens(1, (2, 12)))
    assert logits.shape == (2, 12, config.vocab_size) and logits.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(logits)))


def test_causality(tiny):
    config, model = tiny
    tokens = random_tokens(2, (2, 12))
    changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % config.vocab_size)
    before, after = np.asarray(forward(model, tokens)), np.asarray(forward(model, changed))
    np.testing.assert_allclose(after[:, :7], before[:, :7], rtol=0, atol=1e-6)
    assert np.all(np.max(np.abs(after[:, 7:] - before[:, 7:]), axis=-1) > 1e-4)


def test_packed_documents_equal_running_each_alone(tiny):
    _, model = tiny
    first, second, third = random_tokens(3, (5,)), random_tokens(4, (7,)), random_tokens(5, (5,))
    # Row 0 packs [first | second]; row 1 runs second alone, followed by an unrelated document.
    tokens = jnp.stack([jnp.concatenate([first, second]), jnp.concatenate([second, third])])
    segment_ids = jnp.array([[1] * 5 + [2] * 7, [0] * 7 + [4] * 5], jnp.int32)
    logits = np.asarray(forward(model, tokens, segment_ids))
    np.testing.assert_allclose(logits[0, 5:], logits[1, :7], rtol=1e-5, atol=1e-5)
    # The first document alone (causality makes the rest of the row irrelevant).
    alone = np.asarray(forward(model, tokens.at[0, 5:].set(third[0]), segment_ids))
    np.testing.assert_allclose(logits[0, :5], alone[0, :5], rtol=1e-5, atol=1e-5)
    # Without segment ids the second document does see the first.
    unpacked = np.asarray(forward(model, tokens))
    assert np.max(np.abs(unpacked[0, 5:] - logits[0, 5:])) > 1e-4


def loss_fn(model, tokens):
    logits = model(tokens[:, :-1])
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1))


def test_gradient_step_lowers_the_loss_and_remat_matches(tiny):
    config, _ = tiny
    model = HybridLM(config, rngs=nnx.Rngs(5))
    tokens = random_tokens(6, (2, 13))
    value_and_grad = nnx.jit(nnx.value_and_grad(loss_fn))
    loss, grads = value_and_grad(model, tokens)
    grads = nnx.to_pure_dict(grads)
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert np.all(np.isfinite(g)) and np.any(g != 0), path
    remat_model = HybridLM(config, rngs=nnx.Rngs(5), remat=True)
    remat_grads = nnx.to_pure_dict(value_and_grad(remat_model, tokens)[1])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 grads, remat_grads)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(lambda p, g: p - 0.5 * g, nnx.to_pure_dict(params), grads))
    assert float(value_and_grad(model, tokens)[0]) < float(loss)
    # The no-decay set of the whole model is the norm scales and the decay/residual parameters.
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(no_decay_mask(params)))[0]
    no_decay = {jax.tree_util.keystr(path[-1:]) for path, flag in flat if flag}
    assert no_decay == {"['scale']", "['A_log']", "['dt_bias']", "['D']"}


def test_bad_inputs_raise_clear_errors(tiny):
    config, model = tiny
    tokens = random_tokens(7, (1, 6))
    with pytest.raises(ValueError, match=r"tokens must have shape \(B, S\)"):
        model(tokens[0])
    with pytest.raises(ValueError, match="integer dtype"):
        model(tokens.astype(jnp.float32))
    with pytest.raises(ValueError, match="vocab_size=256"):
        model(tokens.at[0, 2].set(256))
    with pytest.raises(ValueError, match="segment_ids must have the shape of tokens"):
        model(tokens, jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids must have an integer dtype"):
        model(tokens, jnp.zeros((1, 6), jnp.float32))
    with pytest.raises(ValueError, match="layer_pattern letter 'Q'"):
        HybridLM(dataclasses.replace(config, layer_pattern="MQ"), rngs=nnx.Rngs(0))


class CausalMeanMixer(nnx.Module):
    """A stand-in for another engineer's mixer, following the registry's constructor contract."""

    def __init__(self, config, *, rngs):
        self.proj = Linear(config.d_model, config.d_model, ("embed", "mixer"),
                           std=config.init_std, rngs=rngs)

    def __call__(self, x, segment_ids=None):
        del segment_ids  # a test stub: documents are not packed in the test below
        steps = jnp.arange(1, x.shape[1] + 1)[None, :, None]
        return self.proj(jnp.cumsum(x, axis=1) / steps)


def test_registered_letters_build_into_the_model(tiny):
    config, _ = tiny
    register_mixer("X", CausalMeanMixer, replace=True)
    model = HybridLM(dataclasses.replace(config, layer_pattern="XMX"), rngs=nnx.Rngs(0))
    assert isinstance(model.blocks[0].mixer, CausalMeanMixer)
    assert forward(model, random_tokens(8, (2, 12))).shape == (2, 12, config.vocab_size)
