"""JAX's persistent compilation cache, on by default in every command.

A compiled train step of the 400M hybrid takes minutes to build; with the cache a second run of
the same shapes reads it back (and reuses XLA's GPU autotuning results) instead. The setting is
a folder, ``"auto"`` or ``"off"``, taken from, in order: a command's ``--compile-cache`` flag,
the config's ``compile_cache`` key, the environment variable ``M2RNN_COMPILE_CACHE``, and
``"auto"``, which means ``$XDG_CACHE_HOME/m2rnn-jax/jax`` (``~/.cache/m2rnn-jax/jax``). JAX's
own variable ``JAX_COMPILATION_CACHE_DIR`` is honoured where it is set and nothing else is.

Entries are keyed by the computation, the JAX version and the device, so a stale entry is never
used; the folder may be deleted at any time. Only compilations that take ≥ 1 s are written
(JAX's default), so small CPU programs do not fill it.
"""

import os
import pathlib

import jax

from train.errors import UserError

AUTO = "auto"
OFF = "off"
ENVIRONMENT_VARIABLE = "M2RNN_COMPILE_CACHE"


def default_folder() -> pathlib.Path:
    base = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(base) / "m2rnn-jax" / "jax"


def resolve(flag=None, config_value=None):
    """The cache folder the settings select, or ``None`` for off.

    The first of ``flag`` (the command line), ``config_value`` (the config key) and
    ``$M2RNN_COMPILE_CACHE`` that is neither unset nor ``"auto"`` decides; otherwise
    ``$JAX_COMPILATION_CACHE_DIR``, otherwise the default folder.
    """
    for setting in (flag, config_value, os.environ.get(ENVIRONMENT_VARIABLE)):
        if setting not in (None, "", AUTO):  # "auto" defers to the next source
            return None if setting == OFF else pathlib.Path(setting).expanduser()
    jax_own = os.environ.get("JAX_COMPILATION_CACHE_DIR")
    return pathlib.Path(jax_own).expanduser() if jax_own else default_folder()


def enable(flag=None, config_value=None):
    """Points JAX's persistent cache at the selected folder (or turns it off); returns it.

    Call before the first compilation of the process: JAX opens the cache once.
    """
    folder = resolve(flag, config_value)
    if folder is None:
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"compile cache folder {folder} cannot be created ({err.strerror}); "
                        f"pass --compile-cache DIR or --compile-cache off") from None
    if not os.access(folder, os.W_OK):
        raise UserError(f"compile cache folder {folder} is not writable; pass --compile-cache "
                        f"DIR or --compile-cache off")
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    return folder


def add_flag(parser):
    parser.add_argument("--compile-cache", default=None, metavar="DIR|auto|off",
                        help="JAX's persistent compilation cache: a folder, 'off', or 'auto' "
                             "(the default: the config's compile_cache key where there is one, "
                             f"else ${ENVIRONMENT_VARIABLE}, else ~/.cache/m2rnn-jax/jax)")
