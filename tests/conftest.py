import os
import shutil
import sys
import tempfile

import pytest

# Multi-device logic is tested on simulated CPU devices; must be set before JAX initialises. The
# tests are bound by compilation, not by running the code: LLVM unoptimised (XLA's own passes
# still run) takes the suite to ~60 % of its time (764 -> 448 s on 2 cores).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

# The commands turn JAX's persistent compilation cache on by default. Tests leave the user's cache
# alone and share one of their own, fresh for each run, so a program that several tests or
# several runs of a command compile is compiled once (tests/test_compile_cache.py checks the
# cache itself). The xdist controller makes it and its workers inherit it; a folder named by a
# caller in M2RNN_TEST_COMPILE_CACHE is used and kept.
_TEST_CACHE_VARIABLE = "M2RNN_TEST_COMPILE_CACHE"
_made_cache_folder = None


def pytest_configure():
    global _made_cache_folder
    folder = os.environ.get(_TEST_CACHE_VARIABLE)
    if folder is None:
        folder = _made_cache_folder = tempfile.mkdtemp(prefix="m2rnn-test-compile-cache-")
        os.environ[_TEST_CACHE_VARIABLE] = folder
    os.environ["M2RNN_COMPILE_CACHE"] = folder  # the commands
    os.environ["JAX_COMPILATION_CACHE_DIR"] = folder  # subprocesses that enable none
    import jax
    jax.config.update("jax_compilation_cache_dir", folder)


def pytest_unconfigure():
    if _made_cache_folder:  # in the controller: after its workers are done
        shutil.rmtree(_made_cache_folder, ignore_errors=True)


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    """A few small standard-library sources: real text whose bytes are learnable."""
    from train import data as data_lib

    folder = tmp_path_factory.mktemp("corpus")
    small = [f for f in data_lib.stdlib_python_files() if 2_000 < f.stat().st_size < 12_000]
    for i, source in enumerate(small[:8]):
        shutil.copy(source, folder / f"{i}_{source.name}")
    return folder


@pytest.fixture
def lowered_for_an_h200(monkeypatch):
    """The Pallas kernels lowered as for the GPU, not interpreted, on this CPU machine.
    Pallas' Triton lowering asks the local GPU for its compute capability; there is none here, so
    an H200's is supplied through a private hook (``jax._src.gpu_info`` from JAX 0.12 on,
    ``jax._src.pallas.triton.gpu_info`` before)."""
    from jax._src.pallas.triton import pallas_call_registration

    from pallas_kernels import platforms

    try:
        from jax._src import gpu_info
    except ImportError:
        from jax._src.pallas.triton import gpu_info
    monkeypatch.setattr(pallas_call_registration.gpu_info_lib, "get_gpu_info",
                        lambda: gpu_info.get_gpu_info_from_version(gpu_info.GpuVersion.H200))
    monkeypatch.setattr(platforms, "interpret", lambda platform: False)
