"""End-to-end training on a tiny model: the loss goes down; SIGTERM + resume reproduces the
uninterrupted run bit for bit; a 2x2x2 (data x fsdp x tensor) mesh with gradient accumulation
matches one device; the generation CLI's restore gives back the trained model."""

import functools
import json
import os
import signal

import jax
import numpy as np
import pytest
from flax import nnx

from m2rnn_jax.typed_config import from_dict
from train import data as data_lib
from train import sharding, step, trainer
from train.checkpointing import restore_for_inference
from train.config import MeshConfig, TrainConfig

TOTAL_STEPS = 8
INTERRUPT_AT = 3  # not a checkpoint step: the stop path must save by itself


def tiny_config(corpus_dir, **overrides) -> TrainConfig:
    config = {
        "steps": TOTAL_STEPS, "seed": 3,
        "model": {"vocab_size": 256, "d_model": 32, "layer_pattern": "MA",
                  "m2rnn": {"num_heads": 2, "key_dim": 8, "value_dim": 4},
                  "attention": {"num_heads": 2}, "mlp": {"hidden_dim": 64},
                  "compute_dtype": "float32"},
        "optimizer": {"learning_rate": 1e-2, "warmup_steps": 2},
        "data": {"source": "text", "paths": [str(corpus_dir)], "validation_fraction": 0.25,
                 "seq_len": 32, "batch_size": 8, "eval_rows": 16},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1},
        "checkpoint": {"every_steps": 4, "keep": 3},
        "logging": {"eval_every": 4, "log_every": 1, "progress_bar": False},
    }
    for key, value in overrides.items():
        section, name = key.split("__")
        config[section][name] = value
    return from_dict(TrainConfig, config)


@pytest.fixture(scope="module", autouse=True)
def compile_once():
    """Runs in one process share one compiled trainee per (config, mesh): the trainee holds
    no arrays, so this changes no result, only the test's time."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "build_trainee", functools.cache(step.build_trainee))
        yield trainer.build_trainee


def train_losses(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["kind"] == "train"]


def checkpoint_params(out_dir, step_number):
    _, model = restore_for_inference(out_dir, step=step_number)
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


@pytest.fixture(scope="module")
def uninterrupted(corpus_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    summary = trainer.train(tiny_config(corpus_dir), out, devices=jax.devices()[:1],
                            log=lambda *_: None)
    return out, summary


def test_loss_goes_down_and_the_run_folder_is_complete(uninterrupted):
    out, summary = uninterrupted
    losses = train_losses(out)
    assert len(losses) == TOTAL_STEPS
    assert np.mean(losses[-2:]) < losses[0] - 0.5, losses
    assert summary["step"] == TOTAL_STEPS and not summary["interrupted"]
    assert np.isfinite(summary["val_bits"]) and summary["unigram_bits"] > 0
    assert (out / "loss.png").stat().st_size > 0 and (out / "config.yaml").exists()
    assert sorted(int(p.name) for p in (out / "checkpoints").iterdir()) == [4, 8]


def test_sigterm_then_resume_reproduces_the_uninterrupted_run(uninterrupted, corpus_dir,
                                                              tmp_path):
    reference_out, _ = uninterrupted
    config = tiny_config(corpus_dir)

    def interrupt(step_number, _metrics):
        if step_number == INTERRUPT_AT:
            os.kill(os.getpid(), signal.SIGTERM)

    handler_before = signal.getsignal(signal.SIGTERM)
    first = trainer.train(config, tmp_path, devices=jax.devices()[:1], on_step=interrupt,
                          log=lambda *_: None)
    assert first["interrupted"] and first["reason"] == "SIGTERM"
    assert first["step"] == INTERRUPT_AT
    assert signal.getsignal(signal.SIGTERM) is handler_before
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir()) == [INTERRUPT_AT]

    messages = []
    second = trainer.train(config, tmp_path, devices=jax.devices()[:1], log=messages.append)
    assert any(m.startswith(f"Resuming from step {INTERRUPT_AT}") for m in messages)
    assert second["step"] == TOTAL_STEPS and not second["interrupted"]

    assert train_losses(tmp_path) == train_losses(reference_out)
    resumed, reference = (checkpoint_params(d, TOTAL_STEPS) for d in (tmp_path, reference_out))
    for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_restore_for_inference_gives_the_trained_model(uninterrupted, corpus_dir):
    out, summary = uninterrupted
    model_config, model = restore_for_inference(out)
    assert model_config == tiny_config(corpus_dir).model
    config = tiny_config(corpus_dir)
    corpus = data_lib.load_corpus(config.data)
    batches = data_lib.validation_batches(
        data_lib.PackedRows(corpus.validation, config.data.seq_len), config.data.eval_rows,
        config.micro_batch_size)
    total, count = 0.0, 0
    for batch in batches:
        inputs, segments, targets, mask = data_lib.model_inputs(batch["tokens"],
                                                                batch["segment_ids"])
        logits = np.asarray(model(inputs, segment_ids=segments), np.float64)
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                    keepdims=True)) - logits.max(-1, keepdims=True)
        picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
        total -= float(picked[mask].sum())
        count += int(mask.sum())
    assert total / count == pytest.approx(summary["val_loss"], rel=1e-4)


def test_sharded_mesh_with_accumulation_matches_one_device(corpus_dir, compile_once):
    single_config = tiny_config(corpus_dir)
    sharded_config = tiny_config(corpus_dir, optimizer__grad_accum_steps=2)
    single = compile_once(single_config, sharding.make_mesh(MeshConfig(data=1),
                                                            jax.devices()[:1]))
    sharded = compile_once(sharded_config, sharding.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2),
                                                              jax.devices()[:8]))
    assert any(s.spec != jax.sharding.PartitionSpec(*[None] * len(s.spec))
               for s in jax.tree.leaves(sharded.state_shardings["params"]))

    corpus = data_lib.load_corpus(single_config.data)
    rows = data_lib.PackedRows(corpus.train, single_config.data.seq_len, seed=1)
    iterator = data_lib.train_iterator(rows, single_config.data.batch_size, seed=17)
    batches = [next(iterator) for _ in range(3)]

    state_single, state_sharded = single.init_state(), sharded.init_state()
    for batch in batches:
        state_single, m_single = single.train_step(state_single,
                                                   step.put_batch(batch, single, accum_steps=1))
        state_sharded, m_sharded = sharded.train_step(
            state_sharded, step.put_batch(batch, sharded, accum_steps=2))
        np.testing.assert_allclose(float(m_sharded["loss"]), float(m_single["loss"]),
                                   rtol=2e-5)
        np.testing.assert_allclose(float(m_sharded["grad_norm"]), float(m_single["grad_norm"]),
                                   rtol=2e-4)
    for a, b in zip(jax.tree.leaves(state_sharded["params"]),
                    jax.tree.leaves(state_single["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)
