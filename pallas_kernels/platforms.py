"""Where the kernels run: compiled on their accelerator, or in a Pallas interpreter elsewhere."""

import contextlib

import jax

_lowered_off_device = []  # platforms whose kernels lower for real although JAX runs elsewhere


def interpret(platform: str) -> bool:
    """True when JAX does not run on ``platform`` (``"gpu"`` or ``"tpu"``) and no
    ``lowered_for(platform)`` is active: the kernels of that platform then run in their Pallas
    interpreter on the CPU, which is how CI tests them."""
    return platform not in _lowered_off_device and jax.default_backend() != platform


@contextlib.contextmanager
def lowered_for(platform: str):
    """Inside, ``platform``'s kernels take their real lowering on any machine: for exporting or
    compiling for an accelerator this machine lacks (``benchmarks/hopper_compile.py``)."""
    _lowered_off_device.append(platform)
    try:
        yield
    finally:
        _lowered_off_device.remove(platform)
