"""Autoregressive generation with ``HybridLM``: prefill once, then decode on the device.

Tokens are bytes: a token id is one UTF-8 byte (``encode``/``ByteDecoder``), the convention of
the training data pipeline (vocab >= 256).

Prefill runs the full-sequence path over the prompts (the M²RNN op/kernel returns its final
state; attention fills a KV cache preallocated for ``prompt + max_new_tokens`` steps); then each
new token costs one ``decode_step`` through every block. The sampling loop runs on the device:
one dispatch produces up to ``tokens_per_dispatch`` tokens, with the caches donated, so the
host's per-token work is reading the tokens back. Without stop tokens every dispatch makes a
whole block in a loop of known trip count; with them, a ``lax.while_loop`` that also stops once
every row has met one (XLA tests a while loop's condition on the host at every step). Prompts
of different lengths are left padded: the padding is a separate packed document, so no layer
sees it.

    generator = Generator(model)
    rows = generator.generate([encode("Once upon")], max_new_tokens=50, temperature=0.8,
                              top_p=0.95, seed=0, stop_tokens=[ord("\\n")])
"""

import codecs

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2rnn_jax.layers.linear import row_kernels

PAD_TOKEN = 0


def encode(text: str) -> list[int]:
    """Text -> byte-level token ids."""
    return list(text.encode("utf-8"))


class ByteDecoder:
    """Incremental bytes -> text for streaming (a multi-byte character waits for its last
    byte; invalid bytes become U+FFFD)."""

    def __init__(self):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, tokens) -> str:
        return self._decoder.decode(bytes(int(t) for t in tokens))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


def check_sampling(temperature, top_k, top_p, vocab_size):
    if not (isinstance(temperature, (int, float)) and temperature >= 0):
        raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and 1 <= top_k <= vocab_size):
        raise ValueError(f"top_k must be None or an integer in [1, {vocab_size}], got {top_k!r}")
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be None or a number in (0, 1], got {top_p!r}")


def filter_logits(logits, top_k=None, top_p=None):
    """Sets logits outside the top-k / nucleus (top-p) set to -inf. ``logits (..., vocab)``.

    The nucleus is the smallest set of most likely tokens whose probability reaches ``top_p``
    (the most likely token is always kept); tokens tied with the last kept one are kept too.
    """
    if top_k is not None:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p is not None and top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        threshold = jnp.min(jnp.where(mass_before < top_p, ordered, jnp.inf), axis=-1,
                            keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def sample(logits, key, temperature=1.0, top_k=None, top_p=None):
    """Next tokens ``(B,)`` from float32 ``logits (B, vocab)``; ``temperature == 0`` is greedy."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits.astype(jnp.float32) / temperature, top_k, top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def left_pad(prompts):
    """Token lists -> ``(tokens (B, S) int32, segment_ids (B, S) int32 or None)``.

    Shorter prompts are left padded with a padding document (segment 0; the prompt is 1), so
    every row ends at the same step and decodes in lockstep.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts must be a non-empty list of non-empty token lists")
    seq_len = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), seq_len), PAD_TOKEN, np.int32)
    segment_ids = np.zeros((len(prompts), seq_len), np.int32)
    for row, prompt in enumerate(prompts):
        tokens[row, seq_len - len(prompt):] = prompt
        segment_ids[row, seq_len - len(prompt):] = 1
    if all(len(p) == seq_len for p in prompts):
        return tokens, None
    return tokens, segment_ids


def _is_projection(path, value):
    """A ``Linear`` weight ``(in, out)``."""
    return value.ndim == 2 and any(getattr(key, "key", None) == "kernel" for key in path)


def transpose_projections(state):
    """The model state with every ``Linear`` weight transposed to ``(out, in)`` (and back: the
    map is its own inverse); the other leaves are the same arrays.

    A decode step multiplies one row by each weight. Stored ``(in, out)``, that product sums
    down columns, which XLA's GPU compiler may split into an elementwise product writing a
    weight-sized temporary and a reduction (two kernels, three reads of the weight); stored
    ``(out, in)`` it sums along rows, one kernel reading the weight once. The Generator keeps its
    weights transposed and passes ``W.T`` views to the model, which XLA folds into the products.
    """
    return jax.tree_util.tree_map_with_path(
        lambda path, value: value.T if _is_projection(path, value) else value, state)


class Generator:
    """Compiled prefill and decode step of one model (compiled once per shape and sampling
    setting; the decode loop also once per block length and loop kind, ``decode``). The
    parameters are captured at construction, the ``Linear`` weights as transposed copies
    (``transpose_projections``): while the caller keeps the model, those weights are held
    twice. The copies keep the model's sharding labels, which name the ``(in, out)`` layout; the
    model the compiled functions build transposes them back."""

    def __init__(self, model):
        self.vocab_size = model.config.vocab_size
        self._graphdef, state = nnx.split(model)
        self._state = transpose_projections(state)
        on_cpu = jax.default_backend() == "cpu"  # CPU cannot donate buffers
        self._prefill = jax.jit(self._prefill_fn, static_argnames=("max_len", "sampling"))
        self._step = jax.jit(self._step_fn, static_argnames=("sampling",),
                             donate_argnums=() if on_cpu else (2,))
        self._decode = jax.jit(self._decode_fn, static_argnames=("sampling", "block", "fixed"),
                               donate_argnums=() if on_cpu else (1, 2))

    def _model(self, state):
        return nnx.merge(self._graphdef, transpose_projections(state))

    def _prefill_fn(self, state, tokens, segment_ids, key, *, max_len, sampling):
        model = self._model(state)
        logits, caches = model.prefill(tokens, segment_ids, max_len=max_len)
        return sample(logits[:, -1], key, *sampling), caches

    def _step_fn(self, state, tokens, caches, key, *, sampling):
        logits, caches = self._decode_step(state, tokens, caches)
        return sample(logits, key, *sampling), caches

    def _decode_step(self, state, tokens, caches):
        """The model's decode step, with its products as row kernels where the model says so
        (``HybridLM.decodes_by_row_kernels``): they read the weights as held here."""
        model = self._model(state)
        with row_kernels(model.decodes_by_row_kernels(tokens.shape[0])):
            return model.decode_step(tokens, caches)

    def _decode_fn(self, state, tokens, caches, key, stops, running, count, first_step, *,
                   sampling, block, fixed=False):
        def more(carry):
            produced, _, _, running, _ = carry
            return (produced < count) & jnp.any(running)

        # The layers' conv-step counters advance together (each counts the tokens decoded; the
        # mixer contract in layers/registry.py): carried as one (start + produced), not one add
        # kernel per layer and token.
        counted = [i for i, c in enumerate(caches) if "conv_step" in c]
        start = caches[counted[0]]["conv_step"] if counted else None
        if start is not None and any((caches[i]["conv_step"].shape, caches[i]["conv_step"].dtype)
                                     != (start.shape, start.dtype) for i in counted):
            raise ValueError("the caches' conv_step counters differ in shape or dtype; each "
                             "must be the int32 count of tokens decoded (layers/conv.py)")

        def with_step(caches, step):
            return [{**c, "conv_step": step} if i in counted else c for i, c in enumerate(caches)]

        def without_step(caches):
            return [{k: v for k, v in c.items() if k != "conv_step"} for c in caches]

        def one_token(carry):
            produced, tokens, caches, running, out = carry
            if start is not None:
                caches = with_step(caches, start + produced)
            # The model (its W.T views) inside the loop: built outside, XLA would transpose the
            # weights back once before the loop instead of folding the views into the products.
            logits, caches = self._decode_step(state, tokens, caches)
            caches = without_step(caches)
            step_key = jax.random.fold_in(key, first_step + produced)
            tokens = sample(logits, step_key, *sampling)
            running = running & ~jnp.isin(tokens, stops)
            return produced + 1, tokens, caches, running, out.at[produced].set(tokens)

        out = jnp.zeros((block, tokens.shape[0]), jnp.int32)
        carry = (jnp.zeros((), jnp.int32), tokens, without_step(caches), running, out)
        if fixed:  # every one of the block's tokens: a trip count XLA knows, no test per token
            carry = jax.lax.fori_loop(0, block, lambda _, carry: one_token(carry), carry)
        else:
            carry = jax.lax.while_loop(more, one_token, carry)
        produced, _, caches, _, out = carry
        if start is not None:
            caches = with_step(caches, start + produced)
        return out, produced, caches

    def decode(self, tokens, caches, count, *, key, first_step=1, block=None, stop_tokens=(),
               running=None, sampling=(0.0, None, None)):
        """Up to ``count`` decode steps in one dispatch, feeding back each sampled token.

        ``tokens (B,)`` are the last tokens (fed first); the i-th new token is sampled with
        ``fold_in(key, first_step + i)``. The loop ends early once every row of ``running``
        (default: all) has produced one of ``stop_tokens``. ``block`` (default ``count``) is the
        compiled buffer length: calls with the same ``block`` and any ``count <= block`` share
        one compilation of the while loop, except that ``count == block`` with no stop tokens
        and ``running`` None compiles (once) a loop of known trip count instead, which spares
        the host a test of the loop's condition per token. Returns ``(new tokens (produced, B)
        int32 array, caches)``; the caches passed in are consumed (donated) on accelerators.
        """
        block = count if block is None else block
        if not (isinstance(count, int) and 1 <= count <= block):
            raise ValueError(f"count must be an integer in [1, block={block}], got {count!r}")
        stop_list = sorted({int(t) for t in np.asarray(stop_tokens).ravel()})
        # Every row producing all of the block's tokens: a loop whose trip count XLA knows.
        fixed = count == block and not stop_list and running is None
        batch = tokens.shape[0]
        running = jnp.ones((batch,), bool) if running is None else jnp.asarray(running, bool)
        stops = jnp.asarray(stop_list or [-1], jnp.int32)  # -1 matches nothing
        out, produced, caches = self._decode(
            self._state, tokens, caches, key, stops, running, jnp.asarray(count, jnp.int32),
            jnp.asarray(first_step, jnp.int32), sampling=sampling, block=block, fixed=fixed)
        return out[:int(produced)], caches

    def prefill(self, tokens, segment_ids=None, *, max_len, key=None, sampling=(0.0, None, None)):
        """First sampled tokens ``(B,)`` and the caches after the prompt ``tokens (B, S)``."""
        key = jax.random.key(0) if key is None else key
        return self._prefill(self._state, jnp.asarray(tokens), None if segment_ids is None else
                             jnp.asarray(segment_ids), key, max_len=max_len, sampling=sampling)

    def step(self, tokens, caches, key=None, sampling=(0.0, None, None)):
        """Feeds ``tokens (B,)``; returns the next sampled tokens and the updated caches."""
        key = jax.random.key(0) if key is None else key
        return self._step(self._state, tokens, caches, key, sampling=sampling)

    def generate(self, prompts, max_new_tokens=64, *, temperature=1.0, top_k=None, top_p=None,
                 seed=0, stop_tokens=(), callback=None, tokens_per_dispatch=64):
        """Continues each prompt (a list of token ids); returns one token list per prompt.

        A row ends at its first stop token (not included in its output) or after
        ``max_new_tokens``. ``callback(step, tokens (B,) np.int32, emitted (B,) bool)`` is
        called for every step, as each dispatch of up to ``tokens_per_dispatch`` tokens
        returns; ``emitted[i]`` says whether ``tokens[i]`` belongs to row i's output (False once
        the row has stopped). The tokens do not depend on ``tokens_per_dispatch``.
        """
        if not (isinstance(tokens_per_dispatch, int) and tokens_per_dispatch >= 1):
            raise ValueError(f"tokens_per_dispatch must be a positive integer, got "
                             f"{tokens_per_dispatch!r}")
        check_sampling(temperature, top_k, top_p, self.vocab_size)
        if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        prompts = [list(p) for p in prompts]
        for row, prompt in enumerate(prompts):
            if prompt and not all(0 <= t < self.vocab_size for t in prompt):
                raise ValueError(f"prompt {row} has token ids outside [0, {self.vocab_size})")
        tokens, segment_ids = left_pad(prompts)
        sampling = (float(temperature), top_k, None if top_p is None else float(top_p))
        base_key = jax.random.key(seed)
        stops = np.asarray(sorted(set(stop_tokens)), np.int32)
        outputs = [[] for _ in prompts]
        running = np.ones(len(prompts), bool)
        # The tokens after the prefill's in the fewest dispatches, as even blocks. Without stop
        # tokens every dispatch makes a whole block (one compiled loop of known trip count): the
        # last may run up to dispatches - 1 steps past max_new_tokens, whose tokens are dropped
        # and whose keys and values the attention caches get room for.
        remaining = max_new_tokens - 1
        dispatches = max(1, -(-remaining // tokens_per_dispatch))
        block = max(1, -(-remaining // dispatches))
        whole_blocks = not len(stops)
        spare = dispatches * block - remaining if whole_blocks else 0
        last, caches = self.prefill(tokens, segment_ids,
                                    max_len=tokens.shape[1] + max_new_tokens + spare,
                                    key=jax.random.fold_in(base_key, 0), sampling=sampling)
        pending = [np.asarray(last)]  # tokens sampled on the device, not yet handed out
        step = 0
        while True:
            for host_tokens in pending:
                running &= ~np.isin(host_tokens, stops)
                for row in np.flatnonzero(running):
                    outputs[row].append(int(host_tokens[row]))
                if callback is not None:
                    callback(step, host_tokens, running.copy())
                step += 1
                if not running.any() or step == max_new_tokens:
                    return outputs
            # Token `step` is sampled from token `step - 1` with key fold_in(base_key, step).
            count = block if whole_blocks else min(block, max_new_tokens - step)
            new, caches = self.decode(jnp.asarray(pending[-1]), caches, count, key=base_key,
                                      first_step=step, block=block, stop_tokens=stops,
                                      running=None if running.all() else running,
                                      sampling=sampling)
            pending = list(np.asarray(new))


def generate(model, prompts, max_new_tokens=64, **kwargs):
    """``Generator(model).generate(...)`` (compiles anew each time; keep a ``Generator``
    to generate repeatedly)."""
    return Generator(model).generate(prompts, max_new_tokens, **kwargs)
