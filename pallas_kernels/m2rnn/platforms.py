"""Where the kernels run: compiled on their accelerator, or in a Pallas interpreter elsewhere."""

import jax


def interpret(platform: str) -> bool:
    """True when JAX does not run on ``platform`` (``"gpu"`` or ``"tpu"``): the kernels of that
    platform then run in their Pallas interpreter on the CPU, which is how CI tests them."""
    return jax.default_backend() != platform
