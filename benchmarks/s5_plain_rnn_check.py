"""Calibration for the S5 experiment: do textbook RNNs learn S5 word problems at length 4?

A plain Elman RNN (``h' = tanh(h W + E[x] + b)``: the input only adds to the pre-activation,
as in M²RNN's write) against an LSTM (input-dependent multiplicative gates), both trained on
our word-problem generator with Adam, batch 256, all positions scored. Prints the per-position
training accuracy every 500 steps. CPU is enough (a few minutes):

    PYTHONPATH=. python benchmarks/s5_plain_rnn_check.py --cell lstm --width 256 --steps 20000
    PYTHONPATH=. python benchmarks/s5_plain_rnn_check.py --cell elman --width 1024 --steps 12000
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from m2rnn_experiments.state_tracking.groups import group_by_name
from m2rnn_experiments.state_tracking.tasks import prefix_products


def init_params(key, cell, width, vocab):
    gates = 4 if cell == "lstm" else 1
    k_emb, k_rec, k_out = jax.random.split(key, 3)
    return {"emb": 0.3 * jax.random.normal(k_emb, (vocab, gates * width)),
            "rec": jax.random.normal(k_rec, (width, gates * width)) / np.sqrt(width),
            "bias": jnp.zeros(gates * width),
            "out": jax.random.normal(k_out, (width, vocab)) / np.sqrt(width)}


def logits_fn(params, tokens, cell):
    width = params["rec"].shape[0]

    def step(carry, x_t):
        h, c = carry
        z = x_t + h @ params["rec"] + params["bias"]
        if cell == "lstm":
            i, f, o, u = jnp.split(z, 4, axis=-1)
            c = jax.nn.sigmoid(f + 1.0) * c + jax.nn.sigmoid(i) * jnp.tanh(u)
            h = jax.nn.sigmoid(o) * jnp.tanh(c)
        else:
            h = jnp.tanh(z)
        return (h, c), h

    zeros = jnp.zeros((tokens.shape[0], width))
    _, hs = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(params["emb"][tokens], 0, 1))
    return jnp.swapaxes(hs, 0, 1) @ params["out"]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cell", choices=("elman", "lstm"), default="lstm")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--steps", type=int, default=20000)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--length", type=int, default=4)
    p.add_argument("--group", default="S5")
    args = p.parse_args()
    group = group_by_name(args.group)
    params = init_params(jax.random.PRNGKey(0), args.cell, args.width, group.order)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(args.lr))
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, tokens, targets):
        def loss_fn(params):
            logits = logits_fn(params, tokens, args.cell)
            loss = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
            return loss, (logits.argmax(-1) == targets).mean(axis=0)

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, accuracy

    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        tokens = rng.integers(0, group.order, (256, args.length))
        params, opt_state, loss, accuracy = train_step(params, opt_state, tokens,
                                                       prefix_products(group, tokens))
        if step % 500 == 0:
            print(f"{args.cell} {args.width} step {step}: loss {float(loss):.3f}, accuracy by "
                  f"position {np.round(np.asarray(accuracy), 3).tolist()}, "
                  f"{time.perf_counter() - start:.0f}s", flush=True)


if __name__ == "__main__":
    main()
