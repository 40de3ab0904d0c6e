"""Fault injection on the trainer: damaged, bit-flipped and checksum-less checkpoints, non-finite
losses, a metrics file cut short, a second run on one folder, a run killed at a random time
(often during a save), and reruns of a finished run. Every case must end either in the same
numbers as an undisturbed run or in a clear error that changes nothing on disk."""

import dataclasses
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from test_train_run import tiny_config
from train import sharding, step, trainer
from train.checkpointing import DAMAGED_DIR, CheckpointError, restore_for_inference
from train.config import CheckpointConfig, LoggingConfig, train_config_to_dict
from train.run_folder import LOCK_FILE, OLD_RUNS_DIR, RunFolderBusy
from train.trainer import NonFiniteError

STEPS = 4  # checkpoints at 2 and 4


@pytest.fixture(scope="module", autouse=True)
def compile_once():
    """One compiled trainee per model, optimizer and data settings: the logging and checkpoint
    settings do not enter the trainee, nor the number of steps once the learning-rate schedule
    has a length of its own, so runs that differ only there share it."""
    cache = {}

    def build(config, mesh):
        assert config.optimizer.schedule_steps is not None
        key = (dataclasses.replace(config, steps=1, logging=LoggingConfig(),
                                   checkpoint=CheckpointConfig()), mesh)
        if key not in cache:
            cache[key] = step.build_trainee(config, mesh)
        return cache[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "build_trainee", build)
        yield


def config_for(corpus_dir, *, steps=STEPS, **changes):
    """``test_train_run``'s tiny config with one attention layer (the fastest to compile: the
    faults here are the trainer's, whatever the model). ``section__key=value`` changes a
    section's key, ``key=value`` a top-level one."""
    sections = {"model__layer_pattern": "A", "optimizer__schedule_steps": STEPS,
                "checkpoint__every_steps": 2, "logging__eval_every": 2}
    sections.update({key: value for key, value in changes.items() if "__" in key})
    top_level = {key: value for key, value in changes.items() if "__" not in key}
    return dataclasses.replace(tiny_config(corpus_dir, **sections), steps=steps, **top_level)


def run(config, out, **kwargs):
    kwargs.setdefault("log", lambda *_: None)
    return trainer.train(config, out, devices=jax.devices()[:1], **kwargs)


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def numbers(out):
    """What a run computed, without its timings."""
    return [(r["kind"], r["step"], r.get("loss"), r.get("grad_norm"), r.get("val_loss"))
            for r in records(out)]


def snapshot(folder):
    """Every file under ``folder`` (but the lock, rewritten by each run) and its SHA-256."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_FILE}


def step_dirs(out):
    folder = out / "checkpoints"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


@pytest.fixture(scope="module")
def reference(corpus_dir, tmp_path_factory):
    """An undisturbed run to compare with: checkpoints at steps 2 and 4."""
    out = tmp_path_factory.mktemp("reference")
    run(config_for(corpus_dir), out)
    assert step_dirs(out) == ["2", "4"]
    return out


def copy_run(reference, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    return out


def flip_a_byte(step_dir):
    data_file = max((p for p in (step_dir / "params").rglob("d/*") if p.is_file()),
                    key=lambda p: p.stat().st_size)
    data = bytearray(data_file.read_bytes())
    data[len(data) // 2] ^= 0x40
    data_file.write_bytes(bytes(data))
    return data_file


def truncate_every_file(out):
    for path in (out / "checkpoints").rglob("*"):
        if path.is_file():
            path.write_bytes(b"")


def damage_every_config_item(out):
    for path in (out / "checkpoints").glob("*/config/metadata"):
        path.write_text('{"model": ')


def damage_config_items_without_checksums(out):
    for path in (out / "checkpoints").glob("*/SHA256SUMS"):
        path.unlink()
    damage_every_config_item(out)


@pytest.mark.parametrize("damage", [truncate_every_file, damage_every_config_item,
                                    damage_config_items_without_checksums])
def test_no_restorable_checkpoint_is_an_error_that_changes_nothing(reference, corpus_dir,
                                                                   tmp_path, damage):
    out = copy_run(reference, tmp_path)
    damage(out)
    before = snapshot(out)
    with pytest.raises(CheckpointError, match=r"no checkpoint in .*checkpoints can be restored"
                                              r".*--restart"):
        run(config_for(corpus_dir), out)
    assert snapshot(out) == before  # nothing trained, saved, moved or deleted
    assert not (out / DAMAGED_DIR).exists()


def test_restart_moves_the_old_run_aside_and_starts_over(reference, corpus_dir, tmp_path):
    out = copy_run(reference, tmp_path)
    truncate_every_file(out)
    before = snapshot(out)
    messages = []
    summary = run(config_for(corpus_dir), out, restart=True, log=messages.append)
    assert summary["step"] == STEPS and numbers(out) == numbers(reference)
    (moved,) = (out / OLD_RUNS_DIR).iterdir()
    assert any(str(moved) in m for m in messages)
    assert snapshot(moved) == before  # every file of the old run, unchanged


def test_a_flipped_byte_is_caught_and_the_previous_checkpoint_is_used(reference, corpus_dir,
                                                                      tmp_path):
    out = copy_run(reference, tmp_path)
    flipped = flip_a_byte(out / "checkpoints" / "4")
    with pytest.warns(UserWarning, match=r"using checkpoint step 2 .*step 4: ChecksumError"):
        restore_for_inference(out)
    messages = []
    summary = run(config_for(corpus_dir), out, log=messages.append)
    assert any("checkpoints/4 cannot be restored" in m and "SHA-256" in m
               and "previous one, step 2" in m for m in messages), messages
    # Resumed from step 2: the same numbers as the undisturbed run.
    assert summary["step"] == STEPS and numbers(out) == numbers(reference)
    (set_aside,) = (out / DAMAGED_DIR).iterdir()
    assert (set_aside / flipped.relative_to(out / "checkpoints" / "4")).exists()


def test_checkpoints_without_checksums_restore_with_a_warning(reference, corpus_dir, tmp_path):
    out = copy_run(reference, tmp_path)
    shutil.rmtree(out / "checkpoints" / "4")
    (out / "checkpoints" / "2" / "SHA256SUMS").unlink()
    messages = []
    run(config_for(corpus_dir), out, log=messages.append)
    warnings = [m for m in messages if "SHA256SUMS" in m]
    assert len(warnings) == 1 and "checkpoints/2" in warnings[0] and "unverified" in warnings[0]
    assert numbers(out) == numbers(reference)
    assert "SHA256SUMS" in os.listdir(out / "checkpoints" / "4")  # new saves carry one


def test_a_torn_last_metrics_line_is_dropped_on_resume(reference, corpus_dir, tmp_path):
    out = copy_run(reference, tmp_path)
    shutil.rmtree(out / "checkpoints" / "4")
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join(lines) + '\n{"kind": "train", "st')
    messages = []
    run(config_for(corpus_dir), out, log=messages.append)
    assert any(f"line {len(lines) + 1} is not a whole record" in m for m in messages), messages
    assert numbers(out) == numbers(reference)


def test_rerunning_a_finished_run_adds_nothing(reference, corpus_dir, tmp_path):
    out = copy_run(reference, tmp_path)
    before = snapshot(out)
    messages = []
    summary = run(config_for(corpus_dir), out, log=messages.append)
    assert summary["already_finished"] and summary["step"] == STEPS
    assert any(f"Already finished at step {STEPS}" in m for m in messages)
    assert not any("tokens/s" in m for m in messages)
    assert snapshot(out) == before


def test_a_nonfinite_loss_stops_the_run_before_any_save(corpus_dir, tmp_path):
    # The loss is logged every 5 steps and saved every 3: the state of step 3 is NaN (a
    # learning rate of inf), and it must not reach the disk, on any attempt.
    config = config_for(corpus_dir, steps=6, optimizer__learning_rate=float("inf"),
                        checkpoint__every_steps=3, logging__log_every=5,
                        logging__eval_every=0)
    for _ in range(2):
        with pytest.raises(NonFiniteError, match=r"not finite \(NaN or inf\) at step 2; no "
                                                 r"checkpoint was saved.*on_nonfinite=skip"):
            run(config, tmp_path)
        assert step_dirs(tmp_path) == []
    # A state that turns non-finite while the loss is still finite is not saved either.
    with pytest.raises(NonFiniteError, match="model state is not finite .* after step 1"):
        run(dataclasses.replace(config, checkpoint=CheckpointConfig(every_steps=1)), tmp_path)
    assert step_dirs(tmp_path) == []


def test_skip_leaves_the_state_unchanged_and_counts_the_steps(corpus_dir, tmp_path):
    config = config_for(corpus_dir, steps=6, on_nonfinite="skip",
                        optimizer__learning_rate=float("inf"), checkpoint__every_steps=3,
                        logging__log_every=3, logging__eval_every=0)
    summary = run(config, tmp_path)
    assert summary["step"] == 6 and np.isfinite(summary["val_loss"])
    assert [r["skipped_steps"] for r in records(tmp_path) if r["kind"] == "train"] == [3, 3]
    _, model = restore_for_inference(tmp_path, step=6)
    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    initial = trainer.build_trainee(config, mesh).init_state()["params"]
    restored = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(initial)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_second_run_is_refused_and_a_killed_runs_folder_is_taken_over(corpus_dir, tmp_path):
    """A trainer in another process, saving every step, holds the folder: a second run is
    refused with its pid. It is then killed (SIGKILL) at a random time, during a save more
    often than not; the next run takes the folder over and ends with the same numbers as an
    undisturbed run."""
    total = 30
    config = config_for(corpus_dir, steps=total, checkpoint__every_steps=1,
                        logging__eval_every=10)
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(train_config_to_dict(config)))
    out = tmp_path / "run"
    # The trainer as this process runs it (same devices, so the same numbers), in another.
    code = ("import sys, jax, yaml; from train.config import train_config_from_dict; "
            "from train.trainer import train; train(train_config_from_dict(yaml.safe_load("
            "open(sys.argv[1]))), sys.argv[2], devices=jax.devices()[:1])")
    with open(tmp_path / "first.log", "w") as first_log:
        first = subprocess.Popen([sys.executable, "-c", code, str(config_file), str(out)],
                                 stdout=first_log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoints" / "1").exists():
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the first run saved nothing in 120 s"
            time.sleep(0.05)
        assert f"pid {first.pid} " in (out / LOCK_FILE).read_text()

        def must_not_train(*_):
            raise AssertionError("a second run trained in a folder in use")

        with pytest.raises(RunFolderBusy, match=f"in use by another m2rnn-train \\(pid "
                                                f"{first.pid} "):
            run(config, out, on_step=must_not_train)
        delay = random.uniform(0.0, 1.5)
        time.sleep(delay)
        was_running = first.poll() is None
        first.kill()
    finally:
        first.kill()
        first.wait()
    saved = sorted(int(p) for p in step_dirs(out) if p.isdigit())
    messages = []
    # Saving less often from here on changes nothing in the numbers.
    final_save_only = dataclasses.replace(config, checkpoint=CheckpointConfig(every_steps=0))
    summary = run(final_save_only, out, log=messages.append)
    note = (f"killed {delay:.2f} s after its first save (running: {was_running}), steps saved "
            f"{saved}: {messages}")
    assert summary["step"] == total, note
    reference_out = tmp_path / "undisturbed"
    run(final_save_only, reference_out)
    assert numbers(out) == numbers(reference_out), note
