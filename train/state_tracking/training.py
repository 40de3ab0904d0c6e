"""Train one (model, seed) on word problems and measure accuracy at each evaluation length.

A small, self-contained loop: parameters as the pure-dict form of the model's ``nnx.State``,
Optax AdamW (warmup + cosine, global-norm clipping, no decay on the parameters the layers flag),
one jitted step, batches drawn in NumPy from a generator seeded by the run's seed. The jitted
functions are built once per model architecture (``ModelRunner``) and reused across seeds, so
only the first seed of a model pays for compilation.
"""

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from m2rnn_jax import HybridLM, decay_mask
from train.state_tracking import checkpoint
from train.state_tracking.tasks import (curriculum_length, eval_word_problems,
                                        gated_curriculum_length, sample_word_problems)


@dataclasses.dataclass
class RunResult:
    model: str
    seed: int
    num_params: int
    steps: int  # optimizer steps taken (fewer than asked when the time budget ran out)
    compile_s: float  # first step (compilation) of this run; ~0 when the model's step was cached
    train_s: float  # the remaining steps
    eval_s: float
    final_loss: float
    final_train_accuracy: float
    # Longest scored length trained on (the curriculum's last length; train_length without one).
    final_scored_length: int
    resumed_from_step: int  # 0 unless the run continued from a checkpoint
    # One entry per evaluation length: {"length", "position_accuracy", "sequence_accuracy"}.
    evals: list


def length_decay_factor(train_config, step, reached_step):
    """The factor on the learning rate at ``step`` (``train.length_decay_*``): 1 before the
    scored length reaches the training length (``reached_step``), then falling geometrically
    to ``length_decay_ratio`` over ``length_decay_steps`` steps (as many steps per factor of
    ten: the runs needed time at each of 1e-3, 1e-4 and 3e-5), then that ratio."""
    if not train_config.length_decay_steps or reached_step is None or step < reached_step:
        return 1.0
    progress = min(1.0, (step - reached_step) / train_config.length_decay_steps)
    return train_config.length_decay_ratio ** progress


class ModelRunner:
    """Jitted train / eval steps of one model architecture, shared by its seeds."""

    def __init__(self, name, model_config, train_config):
        self.name = name
        self.model_config = model_config
        self.train_config = train_config
        abstract = nnx.eval_shape(lambda: HybridLM(model_config, rngs=nnx.Rngs(0)))
        self.graphdef, abstract_params = nnx.split(abstract, nnx.Param)
        self.num_params = sum(x.size for x in jax.tree.leaves(abstract_params))
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=train_config.learning_rate,
            warmup_steps=min(train_config.warmup_steps, train_config.steps - 1),
            decay_steps=train_config.steps,
            end_value=train_config.learning_rate * train_config.min_lr_ratio)
        parts = [] if train_config.clip_grad_norm is None else \
            [optax.clip_by_global_norm(train_config.clip_grad_norm)]
        parts.append(optax.adamw(schedule, b1=train_config.b1, b2=train_config.b2,
                                 weight_decay=train_config.weight_decay,
                                 mask=nnx.to_pure_dict(decay_mask(abstract_params))))
        self.optimizer = optax.chain(*parts)
        self._train_step = jax.jit(self._step, donate_argnums=(0, 1))
        self._eval_step = jax.jit(self._correct)

    def _logits(self, params, tokens, state_noise=None):
        return nnx.merge(self.graphdef, params)(tokens, state_noise=state_noise)

    def _step(self, params, opt_state, tokens, targets, mask, noise_root, step, lr_factor):
        """One AdamW step; ``lr_factor`` (a traced scalar) multiplies the schedule's rate; the
        state noise of step ``step`` (when on) is drawn from ``fold_in(noise_root, step)``."""
        std = self.train_config.state_noise_std
        state_noise = (jax.random.fold_in(noise_root, step), std) if std else None

        def loss_fn(params):
            logits = self._logits(params, tokens, state_noise)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
            loss = jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)
            accuracy = jnp.sum((logits.argmax(-1) == targets) * mask) / jnp.maximum(
                jnp.sum(mask), 1.0)
            return loss, accuracy

        (loss, accuracy), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = self.optimizer.update(grads, opt_state, params)
        # Scaling AdamW's update scales its rate (weight decay included) and leaves its state
        # (the moments) as it is: checkpoints keep their structure.
        updates = jax.tree.map(lambda u: (u * lr_factor).astype(u.dtype), updates)
        return optax.apply_updates(params, updates), opt_state, loss, accuracy

    def _correct(self, params, tokens, targets):
        """Per-sequence (number of correct positions, all positions correct)."""
        correct = self._logits(params, tokens).argmax(-1) == targets
        return jnp.sum(correct, axis=1), jnp.all(correct, axis=1)

    def init_params(self, seed):
        model = HybridLM(self.model_config, rngs=nnx.Rngs(seed))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def run(self, seed, group, task_config, deadline=None, progress=True,
            checkpoint_path=None) -> RunResult:
        """Trains from seed ``seed`` and evaluates; stops training early past ``deadline``
        (a ``time.perf_counter()`` value). With ``checkpoint_path``, resumes from that file if
        it exists and saves to it every ``train.checkpoint_every_s`` seconds and at the end."""
        cfg = self.train_config
        params = self.init_params(seed)
        opt_state = self.optimizer.init(params)
        rng = np.random.default_rng([seed, 0x5EED])
        noise_root = jax.random.key(seed)  # the state noise's key (folded with the step)
        gated = task_config.curriculum_accuracy is not None
        scored = task_config.curriculum_start_length if gated else None
        loss, accuracy, first_step, reached_step = float("nan"), float("nan"), 0, None
        prints = checkpoint.fingerprints(self.model_config, cfg, task_config, seed)
        if checkpoint_path is not None and os.path.exists(checkpoint_path):
            saved = checkpoint.load(checkpoint_path, params, opt_state, prints)
            params, opt_state, first_step, scored = (saved.params, saved.opt_state, saved.step,
                                                     saved.scored)
            loss, accuracy, reached_step = saved.loss, saved.accuracy, saved.reached_step
            rng.bit_generator.state = saved.rng_state
            tqdm.write(f"{self.name} seed {seed}: resumed at step {first_step} from "
                       f"{checkpoint_path}")
            # Keys missing from older files held their defaults then.
            defaults = type(cfg)()
            changed = {k: (saved.schedule.get(k, getattr(defaults, k)), new)
                       for k, new in prints.schedule.items()} if saved.schedule else {}
            changed = {k: pair for k, pair in changed.items() if pair[0] != pair[1]}
            if changed:
                tqdm.write(f"{self.name} seed {seed}: continues under a new schedule: " + ", ".join(
                    f"{k} {old} -> {new}" for k, (old, new) in changed.items()))

        def save_checkpoint():
            if checkpoint_path is not None:
                checkpoint.save(checkpoint_path, checkpoint.RunState(
                    params, opt_state, steps, scored, rng.bit_generator.state, loss, accuracy,
                    reached_step=reached_step), prints)

        bar = tqdm(total=cfg.steps, initial=first_step, desc=f"{self.name} seed {seed}",
                   disable=not progress, leave=False, dynamic_ncols=True)
        compile_s, steps = 0.0, first_step
        start = last_save = time.perf_counter()
        loss_t = accuracy_t = None
        trained_length = scored  # the scored length of the last step taken (None: all)
        for step in range(first_step, cfg.steps):
            if not gated:
                scored = curriculum_length(step, task_config.curriculum_start_length,
                                           task_config.train_length, task_config.curriculum_steps)
            if reached_step is None and (scored is None or scored >= task_config.train_length):
                # (Files of older versions resumed at the training length: from here.)
                reached_step = step
                if cfg.length_decay_steps:
                    tqdm.write(f"{self.name} seed {seed}: step {step}: scored length at the "
                               f"training length; the learning rate falls by "
                               f"{cfg.length_decay_ratio}x over {cfg.length_decay_steps} steps")
            batch = sample_word_problems(group, rng, cfg.batch_size, task_config.train_length,
                                         task_config.length_sampling, scored)
            # Causal models: positions past the scored ones change nothing, so a curriculum
            # step runs on the shortest power-of-two prefix (a few compilations, much less work).
            width = task_config.train_length if scored is None else min(
                task_config.train_length, 1 << (scored - 1).bit_length())
            params, opt_state, loss_t, accuracy_t = self._train_step(
                params, opt_state, batch.tokens[:, :width], batch.targets[:, :width],
                batch.mask[:, :width], noise_root, np.int32(step),
                np.float32(length_decay_factor(cfg, step, reached_step)))
            steps, trained_length = step + 1, scored
            if step == first_step:
                loss_t.block_until_ready()
                compile_s = time.perf_counter() - start
            if steps % cfg.log_every == 0 or steps == cfg.steps:
                loss, accuracy = float(loss_t), float(accuracy_t)  # waits for the step
                bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.3f}", len=scored,
                                refresh=False)
                if not progress:  # headless runs (logs, sweeps) still show how training goes
                    print(f"{self.name} seed {seed}: step {steps}, loss {loss:.3f}, training "
                          f"accuracy {accuracy:.3f}, scored length "
                          f"{task_config.train_length if scored is None else scored}, "
                          f"{time.perf_counter() - start:.0f}s", flush=True)
                if gated:
                    grown = gated_curriculum_length(scored, accuracy,
                                                    task_config.curriculum_accuracy,
                                                    task_config.train_length)
                    if grown != scored:
                        tqdm.write(f"{self.name} seed {seed}: step {steps}, training accuracy "
                                   f"{accuracy:.3f} at length {scored} -> length {grown}")
                    scored = grown
                bar.update(steps - bar.n)
                now = time.perf_counter()
                if cfg.checkpoint_every_s is not None and now - last_save > cfg.checkpoint_every_s:
                    save_checkpoint()
                    last_save = now
                if deadline is not None and now > deadline:
                    break
        if loss_t is not None:  # trained in this call (not only resumed a finished run)
            loss, accuracy = float(loss_t), float(accuracy_t)
            save_checkpoint()
        bar.close()
        train_s = time.perf_counter() - start - compile_s
        eval_start = time.perf_counter()
        evals = [self.evaluate(params, group, task_config, length)
                 for length in task_config.eval_lengths]
        return RunResult(model=self.name, seed=seed, num_params=self.num_params, steps=steps,
                         compile_s=compile_s, train_s=train_s,
                         eval_s=time.perf_counter() - eval_start, final_loss=loss,
                         final_train_accuracy=accuracy, resumed_from_step=first_step,
                         final_scored_length=task_config.train_length
                         if trained_length is None else trained_length, evals=evals)

    def evaluate(self, params, group, task_config, length):
        words = eval_word_problems(group, task_config.eval_seed, task_config.eval_sequences,
                                   length)
        correct_positions, all_correct = 0, 0
        for first in range(0, task_config.eval_sequences, task_config.eval_batch_size):
            rows = slice(first, first + task_config.eval_batch_size)
            positions, whole = self._eval_step(params, words.tokens[rows], words.targets[rows])
            correct_positions += int(jnp.sum(positions))
            all_correct += int(jnp.sum(whole))
        n = task_config.eval_sequences
        return {"length": length, "position_accuracy": correct_positions / (n * length),
                "sequence_accuracy": all_correct / n}
