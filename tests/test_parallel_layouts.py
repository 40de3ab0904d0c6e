"""Every parallel layout trains the tiny MoE hybrid as one device does (8 simulated devices).

One train step of ``configs/tiny_moe.yaml``'s model, from one initial state on one batch with
packed documents, on one device and on each layout: the loss, the gradient norm and every
updated parameter must agree to float32 tolerance. (The command-line check, four steps of
``m2rnn-train`` per layout against one device, is the ``slow`` test at the end.)
"""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from train import sharding
from train.config import MeshConfig, load_train_config
from train.data import PackedRows
from train.step import build_trainee, put_batch

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "tiny_moe.yaml"
LAYOUTS = {
    "data2-fsdp2-tensor2": MeshConfig(data=2, fsdp=2, tensor=2),
    "data2-expert4": MeshConfig(data=2, expert=4),
    "data2-context4": MeshConfig(data=2, context=4),
    "fsdp2-tensor2-context2": MeshConfig(data=1, fsdp=2, tensor=2, context=2),
}


@pytest.fixture(scope="module")
def setup():
    config = load_train_config(CONFIG, ["data.seq_len=64", "data.batch_size=8"])
    rng = np.random.default_rng(0)
    # Documents of random lengths packed into rows: boundaries fall inside context shards,
    # at their edges and across them.
    docs = [rng.integers(0, 256, int(n)) for n in rng.integers(5, 90, 40)]
    rows = PackedRows(docs, config.data.seq_len)
    batch = {key: np.stack([rows[i][key] for i in range(config.data.batch_size)])
             for key in ("tokens", "segment_ids")}
    one = build_trainee(config, sharding.make_mesh(MeshConfig(data=1), jax.devices()[:1]))
    host = jax.device_get(one.init_state())
    new_state, metrics = one.train_step(jax.device_put(host, one.state_shardings),
                                        put_batch(batch, one, accum_steps=1))
    return config, batch, host, jax.device_get(new_state), jax.device_get(metrics)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_one_step_on_a_layout_equals_one_device(setup, layout):
    config, batch, host_state, want_state, want = setup
    trainee = build_trainee(config, sharding.make_mesh(LAYOUTS[layout]))
    state = jax.device_put(host_state, trainee.state_shardings)
    new_state, got = trainee.train_step(state, put_batch(batch, trainee, accum_steps=1))
    got, new_state = jax.device_get(got), jax.device_get(new_state)
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-5)
    np.testing.assert_allclose(got["grad_norm"], want["grad_norm"], rtol=1e-4)
    for name in ("moe_aux_loss", "expert_load_max"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4, err_msg=name)
    flat_got = jax.tree_util.tree_leaves_with_path(new_state["params"])
    flat_want = jax.tree.leaves(want_state["params"])
    for (path, value), expected in zip(flat_got, flat_want, strict=True):
        np.testing.assert_allclose(value, expected, rtol=2e-4, atol=2e-6,
                                   err_msg=jax.tree_util.keystr(path))


def _train_losses(out, mesh_overrides, devices):
    env_flags = f"--xla_force_host_platform_device_count={devices}"
    done = subprocess.run(
        [sys.executable, "-m", "train.cli", "--config", str(CONFIG), "--out", str(out),
         "--steps", "4", "logging.log_every=1", "logging.progress_bar=false",
         "logging.plot=false", "logging.eval_every=0", *mesh_overrides],
        env={**os.environ, "XLA_FLAGS": env_flags, "JAX_PLATFORMS": "cpu"},
        capture_output=True, text=True, timeout=900, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r.get("kind") == "train"]


@pytest.mark.slow
def test_the_command_trains_every_layout_to_the_one_device_loss(tmp_path):
    one = _train_losses(tmp_path / "one", ["mesh.data=1"], 1)
    assert len(one) == 4
    for name, overrides in {
            "data2-fsdp2-tensor2": ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"],
            "data2-expert4": ["mesh.data=2", "mesh.expert=4"],
            "data2-context4": ["mesh.data=2", "mesh.context=4"],
            "fsdp2-tensor2-context2": ["mesh.data=1", "mesh.fsdp=2", "mesh.tensor=2",
                                       "mesh.context=2"]}.items():
        losses = _train_losses(tmp_path / name, overrides, 8)
        np.testing.assert_allclose(losses, one, rtol=2e-3, err_msg=name)
