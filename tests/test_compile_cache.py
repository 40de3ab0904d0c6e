"""The persistent compilation cache: which setting wins, and that a command really fills it."""

import os
import pathlib
import subprocess
import sys

import pytest

from train import cli, compile_cache
from train.config import TrainConfig
from m2rnn_jax.typed_config import ConfigError

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_the_flag_wins_then_the_config_then_the_environment_then_the_default(monkeypatch,
                                                                              tmp_path):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(compile_cache.ENVIRONMENT_VARIABLE, raising=False)
    default = tmp_path / "xdg" / "m2rnn-jax" / "jax"
    assert compile_cache.resolve() == default
    assert compile_cache.resolve("auto", "auto") == default
    assert compile_cache.resolve(None, str(tmp_path / "c")) == tmp_path / "c"
    assert compile_cache.resolve(str(tmp_path / "f"), str(tmp_path / "c")) == tmp_path / "f"
    assert compile_cache.resolve("off", str(tmp_path / "c")) is None
    assert compile_cache.resolve("auto", "off") is None
    monkeypatch.setenv(compile_cache.ENVIRONMENT_VARIABLE, str(tmp_path / "env"))
    assert compile_cache.resolve(None, "auto") == tmp_path / "env"
    assert compile_cache.resolve(None, str(tmp_path / "c")) == tmp_path / "c"
    monkeypatch.delenv(compile_cache.ENVIRONMENT_VARIABLE)
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "jax"))
    assert compile_cache.resolve() == tmp_path / "jax"


def test_the_config_key_is_checked():
    with pytest.raises(ConfigError, match="compile_cache"):
        TrainConfig(compile_cache="  ")


def test_an_unusable_folder_is_one_line_with_the_usage_status(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    status = cli.main(["--config", str(REPO / "configs/tiny.yaml"), "--out", str(tmp_path / "r"),
                       "--compile-cache", str(blocker / "cache")])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1 and "compile cache" in err


def test_enabling_it_writes_compiled_programs_that_a_second_process_reads(tmp_path):
    script = f"""
import jax, jax.numpy as jnp
from train import compile_cache
hits = []
jax.monitoring.register_event_listener(
    lambda event, **kw: hits.append(event) if event.endswith("/cache_hits") else None)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
compile_cache.enable({str(tmp_path / 'cache')!r})
f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
print(float(f(jnp.ones((64, 64)))), len(hits))
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop(compile_cache.ENVIRONMENT_VARIABLE, None)

    def run():
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        value, hits = done.stdout.split()
        return value, int(hits)

    first_value, first_hits = run()
    assert any((tmp_path / "cache").iterdir()), "the cache folder stayed empty"
    second_value, second_hits = run()
    assert first_hits == 0 and second_hits >= 1 and second_value == first_value
