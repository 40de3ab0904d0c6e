"""Generation: decode steps against the full-sequence path, caches, sampling, the CLI."""

import dataclasses
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax import HybridLM, ModelConfig, register_mixer
from m2rnn_jax.generation import (ByteDecoder, Generator, encode, filter_logits, left_pad,
                                  sample, transpose_projections)
from m2rnn_jax.layers import Linear, RMSNorm
from m2rnn_jax.typed_config import load_yaml
from train import generate_cli

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs" / "model"


def tiny_config(pattern="MAM", **attention):
    config = load_yaml(ModelConfig, CONFIGS / "tiny_hybrid.yaml")
    attention = dataclasses.replace(config.attention, **attention)
    return dataclasses.replace(config, layer_pattern=pattern, attention=attention)


@nnx.jit(static_argnames="max_len")
def prefill(model, tokens, segment_ids, max_len):
    return model.prefill(tokens, segment_ids, max_len=max_len)


@nnx.jit
def decode_step(model, tokens, caches):
    return model.decode_step(tokens, caches)


@nnx.jit
def forward(model, tokens, segment_ids):
    return model(tokens, segment_ids)


def packed_batch(seed, seq_len):
    """Row 0: a padding document then a prompt; row 1: two documents. Random tokens."""
    tokens = jax.random.randint(jax.random.key(seed), (2, seq_len), 0, 256, jnp.int32)
    segment_ids = jnp.array([[0] * 3 + [1] * (seq_len - 3), [4] * 4 + [7] * (seq_len - 4)],
                            jnp.int32)
    return tokens, segment_ids


def assert_prefill_then_decode_equals_full(model, tokens, segment_ids, *, prompt_len, max_len):
    """Prefill a prompt, then feed the rest one token at a time: every logit equals the
    full-sequence forward's."""
    full = np.asarray(forward(model, tokens, segment_ids))
    logits, caches = prefill(model, tokens[:, :prompt_len], segment_ids[:, :prompt_len], max_len)
    np.testing.assert_allclose(np.asarray(logits), full[:, :prompt_len], rtol=1e-5, atol=1e-5)
    for t in range(prompt_len, tokens.shape[1]):
        step_logits, caches = decode_step(model, tokens[:, t], caches)
        np.testing.assert_allclose(np.asarray(step_logits), full[:, t], rtol=1e-5, atol=1e-5,
                                   err_msg=f"step {t}")


@pytest.mark.parametrize("pattern, attention", [
    ("M", {}),
    ("A", dict(rope=True, num_kv_heads=2)),
    ("MAM", dict(rope=False)),
    ("SD", {}),  # the baselines' decode steps take the folded norm too
])
def test_decode_steps_equal_the_full_sequence(pattern, attention):
    model = HybridLM(tiny_config(pattern, **attention), rngs=nnx.Rngs(1))
    tokens, segment_ids = packed_batch(2, 14)
    assert_prefill_then_decode_equals_full(model, tokens, segment_ids, prompt_len=6, max_len=16)


class TanhDecodeMixer(nnx.Module):
    """Another engineer's mixer whose decode step does array arithmetic on its input, and
    which does not set ``takes_normed_row``."""

    def __init__(self, config, *, rngs):
        self.proj = Linear(config.d_model, config.d_model, ("embed", "mixer"),
                           std=config.init_std, rngs=rngs)

    def prefill(self, x, segment_ids, max_len):
        del segment_ids, max_len
        return self.proj(jnp.tanh(x)), {}

    def decode_step(self, x, cache):
        return self.proj(jnp.tanh(x)), cache

    def __call__(self, x, segment_ids=None):
        return self.prefill(x, segment_ids, None)[0]


@pytest.mark.parametrize("pattern, tied", [("MASD", False), ("MY", True)])
def test_at_batch_1_the_norms_fold_into_the_products_and_decoding_equals_the_full_sequence(
        pattern, tied, monkeypatch):
    """One row: every norm whose output reaches Linear layers only is factored (mixer inputs of
    the built-in mixers, MLPs, M²RNN and Mamba-2 output norms, the final norm; not the input of
    a mixer without ``takes_normed_row``), and the logits still equal the full sequence's."""
    register_mixer("Y", TanhDecodeMixer, replace=True)
    config = dataclasses.replace(tiny_config(pattern), tie_embeddings=tied)
    model = HybridLM(config, rngs=nnx.Rngs(3))
    widths = []
    factored = RMSNorm.factored
    monkeypatch.setattr(RMSNorm, "factored",
                        lambda self, x: widths.append(x.shape[-1]) or factored(self, x))
    tokens = jax.random.randint(jax.random.key(4), (1, 9), 0, 256, jnp.int32)
    segment_ids = jnp.zeros((1, 9), jnp.int32)
    assert_prefill_then_decode_equals_full(model, tokens, segment_ids, prompt_len=5, max_len=10)
    d, m2rnn_out = config.d_model, config.m2rnn.output_width
    mamba_out = model.blocks[2].mixer.inner if pattern == "MASD" else None
    # per block: mixer input (if it takes it), output norm (M, S), MLP; then the final norm
    want = ([d, m2rnn_out, d, d, d, d, mamba_out, d, d, d, d] if pattern == "MASD"
            else [d, m2rnn_out, d, d, d])
    assert widths == want


def test_decode_steps_equal_the_full_sequence_with_linear_value_and_normal_transition():
    """The state-tracking M layer (no SiLU on v, random W): decoding must drop v's SiLU too."""
    config = tiny_config("MA")
    m2rnn = dataclasses.replace(config.m2rnn, value_activation="identity",
                                transition_init="normal", transition_scale=0.5)
    model = HybridLM(dataclasses.replace(config, m2rnn=m2rnn), rngs=nnx.Rngs(5))
    tokens, segment_ids = packed_batch(6, 10)
    assert_prefill_then_decode_equals_full(model, tokens, segment_ids, prompt_len=5, max_len=10)


def test_decode_after_a_prompt_shorter_than_the_conv_window():
    model = HybridLM(tiny_config("MA"), rngs=nnx.Rngs(3))
    tokens = jax.random.randint(jax.random.key(4), (2, 6), 0, 256, jnp.int32)
    full = np.asarray(forward(model, tokens, None))
    logits, caches = prefill(model, tokens[:, :2], None, 6)
    np.testing.assert_allclose(np.asarray(logits), full[:, :2], rtol=1e-5, atol=1e-5)
    for t in range(2, 6):
        step_logits, caches = decode_step(model, tokens[:, t], caches)
        np.testing.assert_allclose(np.asarray(step_logits), full[:, t], rtol=1e-5, atol=1e-5)


def test_m2rnn_cache_has_the_same_size_at_every_length():
    config = tiny_config("MA")
    model = HybridLM(config, rngs=nnx.Rngs(0))
    shapes = {}
    for seq_len, max_len in ((3, 5), (40, 300)):
        tokens = jax.ShapeDtypeStruct((2, seq_len), jnp.int32)
        _, caches = nnx.eval_shape(lambda m, t: m.prefill(t, None, max_len=max_len), model, tokens)
        _, stepped = nnx.eval_shape(lambda m, t, c: m.decode_step(t, c), model,
                                    jax.ShapeDtypeStruct((2,), jnp.int32), caches)
        assert jax.tree.map(lambda a: a.shape, stepped) == jax.tree.map(lambda a: a.shape, caches)
        shapes[seq_len] = caches
    m2rnn_short, m2rnn_long = shapes[3][0], shapes[40][0]
    cfg = config.m2rnn
    assert m2rnn_short["state"].shape == (2, cfg.num_heads, cfg.key_dim, cfg.value_dim)
    assert m2rnn_short["state"].dtype == jnp.float32
    assert jax.tree.map(lambda a: a.shape, m2rnn_short) == \
        jax.tree.map(lambda a: a.shape, m2rnn_long)
    # Attention's KV cache, by contrast, is preallocated for max_len steps.
    assert shapes[3][1]["key"].shape[1] == 5 and shapes[40][1]["key"].shape[1] == 300


@pytest.fixture(scope="module")
def model():
    return HybridLM(tiny_config("MA"), rngs=nnx.Rngs(5))


@pytest.fixture(scope="module")
def generator(model):
    return Generator(model)


def test_the_generator_keeps_exactly_the_projection_weights_transposed(model, generator):
    _, state = nnx.split(model)
    transposed = 0
    for (path, kept), (_, original) in zip(jax.tree_util.tree_leaves_with_path(generator._state),
                                           jax.tree_util.tree_leaves_with_path(state)):
        name = jax.tree_util.keystr(path)
        if "kernel" in name:  # every Linear: in_proj, out_proj, the MLP, attention, the head
            np.testing.assert_array_equal(kept, original.T, err_msg=name)
            transposed += 1
        else:
            np.testing.assert_array_equal(kept, original, err_msg=name)
    assert transposed == sum(isinstance(m, Linear) for _, m in nnx.iter_graph(model))
    restored = transpose_projections(generator._state)
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), restored, state))


def test_fixed_seed_sampling_is_reproducible(generator):
    prompts = [encode("state"), encode("tracking!")]
    kwargs = dict(temperature=1.0, top_k=50, top_p=0.9)
    first = generator.generate(prompts, 8, seed=11, **kwargs)
    assert first == generator.generate(prompts, 8, seed=11, **kwargs)
    assert first != generator.generate(prompts, 8, seed=12, **kwargs)
    assert [len(row) for row in first] == [8, 8]


@pytest.mark.parametrize("fixed", [False, True])  # the while loop; the known trip count's scan
def test_the_decode_loop_multiplies_by_the_transposed_weights_inside_its_body(model, generator,
                                                                             fixed):
    """The W.T views are taken inside the loop body, where XLA folds them into the products;
    taken before the loop, XLA would transpose the weights back once and multiply by columns."""
    _, caches = prefill(model, jnp.zeros((1, 3), jnp.int32), None, 8)
    trace = jax.make_jaxpr(functools.partial(generator._decode_fn, sampling=(0.0, None, None),
                                             block=4, fixed=fixed))
    jaxpr = trace(generator._state, jnp.zeros((1,), jnp.int32), caches, jax.random.key(0),
                  jnp.asarray([-1], jnp.int32), jnp.ones((1,), bool), jnp.asarray(4, jnp.int32),
                  jnp.asarray(1, jnp.int32)).jaxpr

    def transposes(jaxpr):
        return sum(eqn.primitive.name == "transpose" for eqn in jaxpr.eqns)

    kind = "scan" if fixed else "while"
    loop = next(eqn for eqn in jaxpr.eqns if eqn.primitive.name == kind)
    body = loop.params["jaxpr" if fixed else "body_jaxpr"].jaxpr
    projections = sum(isinstance(m, Linear) for _, m in nnx.iter_graph(model))
    assert transposes(body) >= projections
    assert transposes(jaxpr) == 0


def test_greedy_batch_with_padding_equals_each_prompt_alone(model, generator):
    short, long = encode("ab"), encode("matrix states")
    batch = generator.generate([long, short], 6, temperature=0.0)
    assert batch[1] == generator.generate([short], 6, temperature=0.0)[0]
    # Greedy tokens are the argmax of the model's own full-sequence logits of prompt +
    # continuation (the generator computes with its transposed projection weights).
    sequence = jnp.asarray([long + batch[0][:-1]], jnp.int32)
    want = np.argmax(np.asarray(forward(model, sequence, None))[0, len(long) - 1:], axis=-1)
    assert list(want) == batch[0]


def test_stop_tokens_and_streaming_callback(generator):
    prompts = [encode("one"), encode("two")]
    free = generator.generate(prompts, 8, temperature=0.0)
    stop = free[0][3]
    seen = []
    stopped = generator.generate(prompts, 8, temperature=0.0, stop_tokens=[stop],
                                 callback=lambda step, tokens, emitted: seen.append(
                                     (step, tokens.copy(), emitted.copy())))
    assert stopped[0] == free[0][:free[0].index(stop)]
    assert stopped[1] == (free[1][:free[1].index(stop)] if stop in free[1] else free[1])
    streamed = [[int(t[row]) for _, t, e in seen if e[row]] for row in range(2)]
    assert streamed == stopped and [s for s, _, _ in seen] == list(range(len(seen)))


def one_dispatch_per_token(generator, prompts, max_new_tokens, seed, sampling, stops):
    """The reference loop: one compiled decode step per token, stops checked on the host."""
    tokens, segment_ids = left_pad(prompts)
    key = jax.random.key(seed)
    last, caches = generator.prefill(tokens, segment_ids,
                                     max_len=tokens.shape[1] + max_new_tokens,
                                     key=jax.random.fold_in(key, 0), sampling=sampling)
    outputs, running = [[] for _ in prompts], np.ones(len(prompts), bool)
    for step in range(max_new_tokens):
        running &= ~np.isin(np.asarray(last), stops)
        for row in np.flatnonzero(running):
            outputs[row].append(int(last[row]))
        if not running.any():
            break
        last, caches = generator.step(last, caches, jax.random.fold_in(key, step + 1), sampling)
    return outputs


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_the_on_device_loop_gives_the_tokens_of_one_dispatch_per_token(generator, temperature,
                                                                        monkeypatch):
    prompts = [encode("loop on"), encode("the device")]
    sampling = (temperature, None, None)
    free = one_dispatch_per_token(generator, prompts, 11, 3, sampling, [])
    stops = [free[0][4]]
    want = one_dispatch_per_token(generator, prompts, 11, 3, sampling, stops)
    assert want[0] == free[0][:4]
    for per_dispatch in (1, 3, 64):
        got = generator.generate(prompts, 11, temperature=temperature, seed=3, stop_tokens=stops,
                                 tokens_per_dispatch=per_dispatch)
        assert got == want, per_dispatch
    # Without stops every dispatch makes a whole block on the loop of known trip count: 10
    # tokens after the prefill's as 4 blocks of 3, the last 2 dropped.
    kinds = []
    decode = generator._decode
    monkeypatch.setattr(generator, "_decode",
                        lambda *args, **kw: kinds.append(kw["fixed"]) or decode(*args, **kw))
    assert generator.generate(prompts, 11, temperature=temperature, seed=3,
                              tokens_per_dispatch=3) == free
    assert kinds == [True] * 4
    with pytest.raises(ValueError, match="tokens_per_dispatch"):
        generator.generate(prompts, 4, tokens_per_dispatch=0)


def test_filtering_and_sampling_rules():
    logits = jax.random.normal(jax.random.key(6), (3, 40)) * 3
    probs = np.asarray(jax.nn.softmax(logits))
    kept_k = np.isfinite(np.asarray(filter_logits(logits, top_k=5)))
    np.testing.assert_array_equal(kept_k.sum(-1), [5, 5, 5])
    for row in range(3):
        assert set(np.flatnonzero(kept_k[row])) == set(np.argsort(-probs[row])[:5])
    kept_p = np.isfinite(np.asarray(filter_logits(logits, top_p=0.7)))
    for row in range(3):
        order = np.argsort(-probs[row])
        smallest = np.searchsorted(np.cumsum(probs[row][order]), 0.7) + 1
        assert set(np.flatnonzero(kept_p[row])) == set(order[:smallest])
    greedy = np.argmax(np.asarray(logits), -1)
    np.testing.assert_array_equal(sample(logits, jax.random.key(0), 0.0), greedy)
    np.testing.assert_array_equal(sample(logits, jax.random.key(0), 1.0, top_k=1), greedy)
    draws = np.stack([sample(logits, jax.random.key(i), 1.0, top_p=0.7) for i in range(30)])
    assert np.all(np.take_along_axis(kept_p, draws.T, axis=1))


def test_decode_takes_stop_tokens_as_any_sequence(generator):
    prompt = jnp.asarray([encode("stop here")])

    def decode(stops):
        first, caches = generator.prefill(prompt, max_len=prompt.shape[1] + 9)
        return np.asarray(generator.decode(first, caches, 8, key=jax.random.key(0),
                                           stop_tokens=stops)[0])

    free = decode(())
    stop = int(free[2, 0])
    want = free[:free[:, 0].tolist().index(stop) + 1]  # ends once the only row has stopped
    for stops in ([stop], (stop,), np.asarray([stop]), np.asarray([stop, -5])):
        np.testing.assert_array_equal(decode(stops), want)
    np.testing.assert_array_equal(decode(np.asarray([], np.int32)), free)


def test_bad_generation_arguments(generator):
    for kwargs, match in [(dict(temperature=-1.0), "temperature"), (dict(top_k=0), "top_k"),
                          (dict(top_k=10_000), "top_k"), (dict(top_p=1.5), "top_p")]:
        with pytest.raises(ValueError, match=match):
            generator.generate([encode("x")], 4, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generator.generate([encode("x")], 0)
    with pytest.raises(ValueError, match="non-empty"):
        generator.generate([[]], 4)
    with pytest.raises(ValueError, match="token ids outside"):
        generator.generate([[300]], 4)


class NoDecodeMixer(nnx.Module):
    def __init__(self, config, *, rngs, axes=None):
        self.proj = Linear(config.d_model, config.d_model, ("embed", "mixer"),
                           std=config.init_std, rngs=rngs)

    def __call__(self, x, segment_ids=None):
        return self.proj(x)


def test_mixers_without_a_decode_step_raise_not_implemented():
    register_mixer("Y", NoDecodeMixer, replace=True)
    model = HybridLM(tiny_config("YM"), rngs=nnx.Rngs(0))
    with pytest.raises(NotImplementedError, match="NoDecodeMixer.*'Y'"):
        model.prefill(jnp.zeros((1, 3), jnp.int32), max_len=4)


def test_byte_decoder_streams_multibyte_characters():
    decoder = ByteDecoder()
    data = encode("é→x")
    assert "".join(decoder([b]) for b in data) + decoder.flush() == "é→x"
    assert ByteDecoder()([0xFF]) == "\ufffd"


def test_cli_streams_the_greedy_continuation(model, generator, monkeypatch, capsys):
    monkeypatch.setattr(generate_cli, "restore_for_inference",
                        lambda out_dir, step=None: (model.config, model))
    generate_cli.main(["--checkpoint", "unused", "--prompt", "ab", "--max-new-tokens", "6",
                       "--temperature", "0"])
    want = generator.generate([encode("ab")], 6, temperature=0.0)[0]
    decoder = ByteDecoder()
    assert capsys.readouterr().out == "ab" + decoder(want) + decoder.flush() + "\n"
