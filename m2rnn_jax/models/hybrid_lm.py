"""The hybrid language model: embedding, one pre-norm block per pattern letter, LM head."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from m2rnn_jax.layers.linear import Embed, Linear
from m2rnn_jax.layers.mlp import SwiGLU
from m2rnn_jax.layers.moe import MoE
from m2rnn_jax.layers.norm import RMSNorm
from m2rnn_jax.layers.params import model_dtypes
from m2rnn_jax.layers.registry import build_mixer, mixer_class
from m2rnn_jax.ops import values_on_host
from m2rnn_jax.parallel import MeshAxes
from pallas_kernels import platforms


class Block(nnx.Module):
    """``x += mixer(RMSNorm(x)); x += MLP(RMSNorm(x))``, the MLP a SwiGLU, or a mixture of
    experts when ``config.moe.num_experts`` > 0."""

    def __init__(self, config, letter: str, *, rngs: nnx.Rngs, axes: MeshAxes = MeshAxes()):
        dtype, param_dtype = model_dtypes(config)
        self.letter = letter
        self.mixer_norm = RMSNorm(config.d_model, eps=config.norm_eps, dtype=dtype,
                                  param_dtype=param_dtype)
        self.mixer = build_mixer(letter, config, rngs=rngs, axes=axes)
        self.mlp_norm = RMSNorm(config.d_model, eps=config.norm_eps, dtype=dtype,
                                param_dtype=param_dtype)
        self.is_moe = config.moe.enabled
        self.mlp = (MoE(config, rngs=rngs, axes=axes) if self.is_moe
                    else SwiGLU(config, rngs=rngs))

    def __call__(self, x, segment_ids=None):
        return self.forward(x, segment_ids)[0]

    def forward(self, x, segment_ids=None):
        """``(x, router statistics)``: the MoE's ``{"aux_loss", "load"}``, or ``None``."""
        x = x + self.mixer(self._mixer_input(x), segment_ids=segment_ids).astype(x.dtype)
        return self._add_mlp(x)

    def prefill(self, x, segment_ids, max_len):
        self._require_decoding()
        y, cache = self.mixer.prefill(self._mixer_input(x), segment_ids, max_len)
        x = x + y.astype(x.dtype)
        return self._add_mlp(x)[0], cache

    def decode_step(self, x, cache):
        self._require_decoding()
        if getattr(self.mixer, "decode_step_adds", False):
            x, cache = self.mixer.decode_step(self._mixer_input(x), cache, add=x)
        else:
            y, cache = self.mixer.decode_step(self._mixer_input(x), cache)
            x = x + y.astype(x.dtype)
        return self._add_mlp(x)[0], cache

    def _mixer_input(self, x):
        if getattr(self.mixer, "takes_normed_row", False):
            return self.mixer_norm.for_product(x)
        return self.mixer_norm(x)

    def _add_mlp(self, x):
        if self.is_moe:  # the router reads the normalised rows themselves
            y, stats = self.mlp(self.mlp_norm(x))
            return x + y.astype(x.dtype), stats
        return self.mlp(self.mlp_norm.for_product(x), add=x), None

    def _require_decoding(self):
        if not (hasattr(self.mixer, "prefill") and hasattr(self.mixer, "decode_step")):
            raise NotImplementedError(
                f"mixer {type(self.mixer).__name__} (layer letter {self.letter!r}) has no "
                f"prefill/decode_step, so models containing it cannot generate token by token")


class HybridLM(nnx.Module):
    """``__call__(tokens (B, S) int, segment_ids=None) -> logits (B, S, vocab) float32``.

    ``forward`` returns the logits with the router statistics of mixture-of-experts blocks.
    The residual stream is kept in the compute dtype; logits are float32.
    """

    def __init__(self, config, *, rngs: nnx.Rngs, remat: bool = False,
                 axes: MeshAxes = MeshAxes()):
        """``remat=True`` recomputes each block's activations in the backward pass. ``axes``
        names the mesh axes that split the batch, heads, sequence and experts, for the layers
        that place their own collectives (``m2rnn_jax.parallel``); the default splits nothing.
        """
        for letter in config.layer_pattern:
            mixer_class(letter)  # fail early, naming the letter, before allocating anything
        dtype, param_dtype = model_dtypes(config)
        self.config = config
        self.remat = remat
        self.axes = axes
        self.embed = Embed(config.vocab_size, config.d_model, std=config.init_std, rngs=rngs,
                           dtype=dtype, param_dtype=param_dtype)
        self.blocks = nnx.List([Block(config, letter, rngs=rngs, axes=axes)
                                for letter in config.layer_pattern])
        self.final_norm = RMSNorm(config.d_model, eps=config.norm_eps, dtype=dtype,
                                  param_dtype=param_dtype)
        self.lm_head = (None if config.tie_embeddings else
                        Linear(config.d_model, config.vocab_size, ("embed", "vocab"),
                               std=config.init_std, rngs=rngs, dtype=dtype,
                               param_dtype=param_dtype))

    def __call__(self, tokens, segment_ids=None):
        return self.forward(tokens, segment_ids)[0]

    def forward(self, tokens, segment_ids=None):
        """``(logits, aux)``; ``aux`` is ``{}`` for a model without mixture-of-experts blocks,
        else ``{"moe_aux_loss": scalar, "expert_load": (num_moe_layers, num_experts)}``: the
        load-balancing losses of the MoE blocks summed (unweighted; ``layers/moe.py``) and each
        block's fraction of token-slots per expert (a row sums to 1), both float32 over the
        whole batch."""
        self._check_inputs(tokens, segment_ids)
        x = self._place(self.embed(tokens))
        router_stats = []
        for block in self.blocks:
            x, stats = (_remat_block(block, x, segment_ids) if self.remat
                        else block.forward(x, segment_ids))
            if stats is not None:
                router_stats.append(stats)
        aux = {}
        if router_stats:
            aux = {"moe_aux_loss": sum(stats["aux_loss"] for stats in router_stats),
                   "expert_load": jnp.stack([stats["load"] for stats in router_stats])}
        return self.logits(x), aux

    def prefill(self, tokens, segment_ids=None, *, max_len):
        """Runs the prompt ``tokens (B, S)`` through the full-sequence path.

        Returns ``(logits (B, S, vocab) float32, caches)``: one cache per block, sized for
        ``max_len`` total steps (attention preallocates its KV cache; M²RNN's is constant).
        Generation continues each row's last document (``segment_ids`` as in ``__call__``;
        left padding = a padding document before the prompt).
        """
        self._check_inputs(tokens, segment_ids)
        x = self.embed(tokens)
        caches = []
        for block in self.blocks:
            x, cache = block.prefill(x, segment_ids, max_len)
            caches.append(cache)
        return self.logits(x), caches

    def decode_step(self, tokens, caches):
        """One token per row ``tokens (B,)`` -> ``(logits (B, vocab) float32, caches)``."""
        x = self.embed(tokens[:, None])
        new_caches = []
        for block, cache in zip(self.blocks, caches, strict=True):
            x, cache = block.decode_step(x, cache)
            new_caches.append(cache)
        return self.logits(x)[:, 0], new_caches

    def decodes_by_row_kernels(self, batch):
        """Whether a ``Generator``'s decode steps of ``batch`` rows run their products as row
        kernels (``layers.linear.row_kernels``, ``config.decode_products``)."""
        mode = self.config.decode_products
        if batch != 1 or mode == "xla":
            return False
        return mode == "kernel" or (not platforms.interpret("gpu")
                                    and not self.axes.splits_anything)

    def logits(self, x):
        """Final norm and LM head on hidden states ``(..., d_model)`` -> float32 logits."""
        x = self.final_norm.for_product(x)
        if self.lm_head is None:
            return self.embed.attend(x)
        return self.lm_head(x, out_dtype=jnp.float32)

    def _place(self, x):
        """Residual stream ``(B, S, d_model)`` split over the batch and context axes."""
        axes = self.axes
        if not axes.splits_anything:
            return x
        spec = PartitionSpec(axes.batch_spec(), axes.context, None)
        return jax.lax.with_sharding_constraint(x, NamedSharding(axes.mesh, spec))

    def _check_inputs(self, tokens, segment_ids):
        if not hasattr(tokens, "ndim") or tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (B, S), got "
                             f"{getattr(tokens, 'shape', type(tokens).__name__)}")
        if not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must have an integer dtype, got {tokens.dtype}")
        if tokens.shape[1] < 1:
            raise ValueError(f"tokens must have at least one step, got shape {tokens.shape}")
        if segment_ids is not None:
            if getattr(segment_ids, "shape", None) != tokens.shape:
                raise ValueError(f"segment_ids must have the shape of tokens {tokens.shape}, got "
                                 f"{getattr(segment_ids, 'shape', type(segment_ids).__name__)}")
            if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
                raise ValueError(f"segment_ids must have an integer dtype, got "
                                 f"{segment_ids.dtype}")
        if values_on_host(tokens):
            # Only where reading values is cheap (not traced, not on an accelerator).
            values = np.asarray(tokens)
            if values.min() < 0 or values.max() >= self.config.vocab_size:
                raise ValueError(f"token ids must lie in [0, vocab_size={self.config.vocab_size}),"
                                 f" got values in [{values.min()}, {values.max()}]")


# A block whose activations are recomputed in the backward pass.
_remat_block = nnx.remat(lambda block, x, segment_ids: block.forward(x, segment_ids))
