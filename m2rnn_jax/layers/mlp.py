"""The SwiGLU MLP of every block: ``down(silu(gate(x)) ⊙ up(x))``."""

import jax
from flax import nnx

from m2rnn_jax.layers.linear import Linear, row_kernel_product, single_row_kernel
from m2rnn_jax.layers.params import model_dtypes, out_proj_std


class SwiGLU(nnx.Module):
    def __init__(self, config, *, rngs: nnx.Rngs):
        """``config`` is a ``ModelConfig``; the hidden width is ``config.mlp.hidden_dim``."""
        dtype, param_dtype = model_dtypes(config)
        d, hidden = config.d_model, config.mlp.hidden_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.gate = Linear(d, hidden, ("embed", "mlp"), std=config.init_std, **kw)
        self.up = Linear(d, hidden, ("embed", "mlp"), std=config.init_std, **kw)
        self.down = Linear(hidden, d, ("mlp", "embed"), std=out_proj_std(config), **kw)

    def __call__(self, x, add=None):
        """``down(silu(gate(x)) ⊙ up(x)) (+ add)``; ``x`` an array or a ``NormedRow``. A single
        row under ``linear.row_kernels`` takes two kernels: gate and up as one, then down."""
        if single_row_kernel(x):  # gate and up are built without biases, in one dtype
            hidden = row_kernel_product(x, self.gate.kernel[...], self.gate.dtype,
                                        w2=self.up.kernel[...])
        else:
            hidden = jax.nn.silu(self.gate(x)) * self.up(x)
        return self.down(hidden, add=add)
