import os
import shutil
import sys
import tempfile

import pytest

# Multi-device logic is tested on simulated CPU devices; must be set before JAX initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The commands turn JAX's persistent compilation cache on by default; tests leave the user's cache
# alone and share one of their own, fresh for each run (the xdist workers inherit it), so a
# program that several tests or several runs of a command compile is compiled once
# (tests/test_compile_cache.py checks the cache itself).
_MADE_THE_CACHE = "M2RNN_TEST_COMPILE_CACHE" not in os.environ  # the xdist controller, or alone
if _MADE_THE_CACHE:
    os.environ["M2RNN_TEST_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="m2rnn-test-compile-cache-")
os.environ["M2RNN_COMPILE_CACHE"] = os.environ["M2RNN_TEST_COMPILE_CACHE"]
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402  (after the environment above)

jax.config.update("jax_compilation_cache_dir", os.environ["M2RNN_COMPILE_CACHE"])


def pytest_sessionfinish():
    if _MADE_THE_CACHE:  # after the workers are done
        shutil.rmtree(os.environ["M2RNN_TEST_COMPILE_CACHE"], ignore_errors=True)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A few small standard-library sources: real text whose bytes are learnable."""
    from train import data as data_lib

    folder = tmp_path_factory.mktemp("corpus")
    small = [f for f in data_lib.stdlib_python_files() if 2_000 < f.stat().st_size < 12_000]
    for i, source in enumerate(small[:8]):
        shutil.copy(source, folder / f"{i}_{source.name}")
    return folder
