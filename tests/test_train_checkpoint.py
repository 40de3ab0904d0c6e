"""Checkpointer: round trip, keep-last-K, and fallback past a damaged newest checkpoint."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from train.checkpointing import DAMAGED_DIR, Checkpointer


def random_state(seed):
    keys = jax.random.split(jax.random.key(seed), 3)
    params = {"blocks": {0: {"w": jax.random.normal(keys[0], (4, 8))},
                         1: {"w": jax.random.normal(keys[1], (8, 4))}},
              "scale": jax.random.normal(keys[2], (8,))}
    optimizer = optax.adamw(1e-3)
    opt_state = optimizer.init(params)
    grads = jax.tree.map(lambda x: x * 0.5 + 1.0, params)  # one update makes moments non-zero
    _, opt_state = optimizer.update(grads, opt_state, params)
    return {"params": params, "opt_state": opt_state, "step": jnp.int32(seed),
            "rng": jax.random.key_data(jax.random.key(seed + 100))}


def abstract(state):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def save_steps(out, steps, keep=5):
    checkpointer = Checkpointer(out, keep=keep, async_save=True, log=lambda *_: None)
    states = {}
    for step in steps:
        states[step] = random_state(step)
        checkpointer.save(step, states[step], {"iterator": {"next_index": step}},
                          {"steps": step})
    checkpointer.wait()
    checkpointer.close()
    return states


def test_round_trip_and_keep_last(tmp_path):
    states = save_steps(tmp_path, [1, 2, 3, 4], keep=2)
    checkpointer = Checkpointer(tmp_path, keep=2, log=lambda *_: None)
    assert checkpointer.steps() == [3, 4]
    restored = checkpointer.restore_latest(abstract(states[4]))
    assert restored.step == 4 and restored.data == {"iterator": {"next_index": 4}}
    assert restored.config == {"steps": 4}
    assert_same(restored.state, states[4])
    assert checkpointer.saved_config() == {"steps": 4}
    # Saving a step that exists is refused, not an error.
    assert not checkpointer.save(4, states[4], {}, {})
    checkpointer.close()


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    states = save_steps(tmp_path, [10, 20])
    for chunk in (tmp_path / "checkpoints" / "20" / "params").rglob("d/*"):
        if chunk.is_file():
            chunk.write_bytes(b"\0damaged")
    messages = []
    checkpointer = Checkpointer(tmp_path, keep=5, log=messages.append)
    restored = checkpointer.restore_latest(abstract(states[10]))
    assert restored.step == 10
    assert_same(restored.state, states[10])
    assert any("checkpoints/20 cannot be restored" in m and "previous" in m for m in messages)
    # The damaged one is moved out of the way, so the run can save step 20 again.
    assert checkpointer.steps() == [10]
    assert len(list((tmp_path / DAMAGED_DIR).iterdir())) == 1
    assert checkpointer.save(20, states[20], {}, {})
    checkpointer.wait()
    checkpointer.close()


def test_partly_written_checkpoint_is_skipped(tmp_path):
    states = save_steps(tmp_path, [5, 6])
    (tmp_path / "checkpoints" / "6" / "train_state" / "_METADATA").unlink()
    checkpointer = Checkpointer(tmp_path, keep=5, log=lambda *_: None)
    restored = checkpointer.restore_latest(abstract(states[5]))
    assert restored.step == 5
    assert_same(restored.state, states[5])
    checkpointer.close()
