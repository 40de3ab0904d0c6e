import os
import shutil
import sys

import pytest

# Multi-device logic is tested on simulated CPU devices; must be set before JAX initialises.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The commands turn JAX's persistent compilation cache on by default; tests that run them leave
# the user's cache alone (tests/test_compile_cache.py checks the cache itself).
os.environ["M2RNN_COMPILE_CACHE"] = "off"
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A few small standard-library sources: real text whose bytes are learnable."""
    from train import data as data_lib

    folder = tmp_path_factory.mktemp("corpus")
    small = [f for f in data_lib.stdlib_python_files() if 2_000 < f.stat().st_size < 12_000]
    for i, source in enumerate(small[:8]):
        shutil.copy(source, folder / f"{i}_{source.name}")
    return folder
