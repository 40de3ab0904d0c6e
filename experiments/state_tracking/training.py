"""Train one (model, seed) on word problems and measure accuracy at each evaluation length.

A small loop of its own: parameters as the pure-dict form of the model's ``nnx.State``,
``train.optimizer``'s AdamW (warmup + cosine, global-norm clipping, no decay on the parameters
the layers flag) with this experiment's length decay on top, one jitted step vmapped over seeds,
batches drawn in NumPy from a generator seeded by the run's seed — or, with
``train.steps_per_dispatch`` N > 1 (or ``train.word_generator: device``), N steps per jitted
call in a ``lax.scan`` with the words drawn on the device from ``(seed, step)``. ``train``'s
trainer is built for sharded language-model training on a token corpus; word problems are
generated on the fly, tiny models train several seeds in one step, and each seed keeps its own
curriculum. The jitted functions are built once per model architecture (``ModelRunner``) and
reused across seeds, so only the first seed of a model pays for compilation.
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

from m2rnn_experiments.state_tracking import checkpoint
from m2rnn_experiments.state_tracking.tasks import (curriculum_length, device_word_problems,
                                                    eval_word_problems, gated_curriculum_length,
                                                    sample_word_problems)
from m2rnn_jax import HybridLM
from train.optimizer import make_optimizer


@dataclasses.dataclass
class RunResult:
    model: str
    seed: int
    num_params: int
    steps: int  # optimizer steps taken (fewer than asked when the time budget ran out)
    # First call (compilation, and its steps_per_dispatch steps) of this run; ~0 when the model's
    # step was cached.
    compile_s: float
    train_s: float  # the remaining calls
    eval_s: float
    final_loss: float
    final_train_accuracy: float
    # Longest scored length trained on (the curriculum's last length; train_length without one).
    final_scored_length: int
    # The step at which the scored length reached the training length (None: never).
    reached_train_length_step: int | None
    resumed_from_step: int  # 0 unless the run continued from a checkpoint
    # One entry per evaluation length: {"length", "position_accuracy", "sequence_accuracy"}.
    evals: list
    # The step at which the run was exact on held-out words and stopped
    # (``train.stop_when_exact_every``; None: it was not).
    stopped_exact_step: int | None = None


def token_losses(logits, targets, label_smoothing=0.0):
    """Cross-entropy per position; with ``label_smoothing`` α against ``(1 − α)·onehot + α/K``,
    whose minimum keeps the logits at a finite margin (log(1 + (1 − α)K/α)), so the loss still
    responds to a state that is slightly off once every answer is right."""
    if not label_smoothing:
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    labels = optax.smooth_labels(jax.nn.one_hot(targets, logits.shape[-1]), label_smoothing)
    return optax.softmax_cross_entropy(logits, labels)


def length_decay_factor(train_config, step, reached_step):
    """The factor on the learning rate at ``step`` (``train.length_decay_*``): 1 before the
    scored length reaches the training length (``reached_step``), then falling geometrically
    to ``length_decay_ratio`` over ``length_decay_steps`` steps (as many steps per factor of
    ten: the runs needed time at each of 1e-3, 1e-4 and 3e-5), then that ratio."""
    if not train_config.length_decay_steps or reached_step is None or step < reached_step:
        return 1.0
    progress = min(1.0, (step - reached_step) / train_config.length_decay_steps)
    return train_config.length_decay_ratio ** progress


def label_smoothing_on(train_config, step, reached_step):
    """Whether ``train.label_smoothing`` applies at ``step``: always with
    ``label_smoothing_from="start"``; with "train_length" once the scored length has reached
    the training length (``reached_step``, as ``length_decay_factor``)."""
    if train_config.label_smoothing_from == "start":
        return True
    return reached_step is not None and step >= reached_step


class ModelRunner:
    """Jitted train / eval steps of one model architecture, shared by its seeds."""

    def __init__(self, name, model_config, train_config):
        self.name = name
        self.model_config = model_config
        self.train_config = train_config
        abstract = nnx.eval_shape(lambda: HybridLM(model_config, rngs=nnx.Rngs(0)))
        self.graphdef, abstract_params = nnx.split(abstract, nnx.Param)
        self.num_params = sum(x.size for x in jax.tree.leaves(abstract_params))
        self.optimizer, _ = make_optimizer(train_config.optimizer_config(), abstract_params,
                                           train_config.steps)
        # Over a leading seed axis (``run_seeds``): every argument and result is per seed.
        self._train_step = jax.jit(jax.vmap(self._step), donate_argnums=(0, 1))
        # steps_per_dispatch steps per call, words drawn on the device (``_dispatch``).
        self._train_dispatch = jax.jit(
            self._dispatch, donate_argnums=(0, 1),
            static_argnames=("width", "length", "length_sampling", "batch_size"))
        self._eval_step = jax.jit(self._correct)

    def logits(self, params, tokens):
        """The model's logits ``(batch, length, group order)`` for element tokens."""
        return nnx.merge(self.graphdef, params)(tokens)

    def _step(self, params, opt_state, tokens, targets, mask, lr_factor, smoothing_on=True):
        """One AdamW step; ``lr_factor`` (a traced scalar) multiplies the schedule's rate;
        ``smoothing_on`` (a traced bool, ``label_smoothing_on``) picks the smoothed loss when
        its use is conditional."""
        cfg = self.train_config

        def loss_fn(params):
            logits = self.logits(params, tokens)
            losses = token_losses(logits, targets, cfg.label_smoothing)
            if cfg.label_smoothing and cfg.label_smoothing_from != "start":
                # Each loss exactly as on its own: runs before the switch are unchanged.
                losses = jnp.where(smoothing_on, losses, token_losses(logits, targets))
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

    def _dispatch(self, params, opt_state, seeds, schedule, table, *, width, length,
                  length_sampling, batch_size):
        """``train.steps_per_dispatch`` steps of each seed (leading axis) in one ``lax.scan``,
        each on the words ``tasks.device_word_problems`` draws for ``(seed, step)`` from the
        group's Cayley table ``table``. ``schedule`` holds ``(seeds, steps_per_dispatch)``
        arrays, one entry per scanned step, computed on the host from the step counter by the
        same functions as one step per call: ``step``, ``scored`` (the curriculum's length),
        ``lr_factor`` (``length_decay_factor``), ``smoothing_on`` (``label_smoothing_on``) and
        ``live`` (false past a seed's share of the call: such a step leaves its state as it
        was). Returns the new parameters and optimizer states and each seed's loss and
        accuracy at its last live step."""
        def one_seed(params, opt_state, seed, schedule):
            def body(state, at):
                tokens, targets, mask = device_word_problems(
                    table, seed, at["step"], batch_size, length, width, at["scored"],
                    length_sampling)
                params, opt_state, loss, accuracy = self._step(
                    state[0], state[1], tokens, targets, mask, at["lr_factor"],
                    at["smoothing_on"])
                stepped = (params, opt_state, loss.astype(jnp.float32),
                           accuracy.astype(jnp.float32))
                return jax.tree.map(lambda new, old: jnp.where(at["live"], new, old),
                                    stepped, state), None

            start = (params, opt_state, jnp.float32(jnp.nan), jnp.float32(jnp.nan))
            return jax.lax.scan(body, start, schedule)[0]

        return jax.vmap(one_seed)(params, opt_state, seeds, schedule)

    def _correct(self, params, tokens, targets):
        """Per-sequence (number of correct positions, all positions correct)."""
        correct = self.logits(params, tokens).argmax(-1) == targets
        return jnp.sum(correct, axis=1), jnp.all(correct, axis=1)

    def init_params(self, seed):
        model = HybridLM(self.model_config, rngs=nnx.Rngs(seed))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def load_saved(self, path, task_config, seed):
        """The ``checkpoint.RunState`` in ``path`` of this runner's run of ``seed`` on
        ``task_config``, checked against the settings as a resumed run is (for analyses)."""
        params = self.init_params(seed)
        prints = checkpoint.fingerprints(self.model_config, self.train_config, task_config, seed)
        return checkpoint.load(path, params, self.optimizer.init(params), prints)

    def run(self, seed, group, task_config, deadline=None, progress=True,
            checkpoint_path=None) -> RunResult:
        """Trains from seed ``seed`` and evaluates; stops training early past ``deadline``
        (a ``time.perf_counter()`` value). With ``checkpoint_path``, resumes from that file if
        it exists and saves to it every ``train.checkpoint_every_s`` seconds and at the end."""
        return self.run_seeds([seed], group, task_config, deadline, progress,
                              [checkpoint_path])[0]

    def run_seeds(self, seeds, group, task_config, deadline=None, progress=True,
                  checkpoint_paths=None) -> list:
        """``run`` for several seeds at once: their steps are one vmapped step over a leading
        seed axis (on a GPU, where these small steps are bound by kernel launches, K seeds
        cost little more than one). Each seed keeps its own data, curriculum, schedule and
        checkpoint file, as in ``run``; a step runs at the widest of the seeds' curriculum
        widths, and the positions past a seed's own width are unscored (the models are
        causal), so each seed's trajectory is its ``run``'s up to rounding. A seed that reaches
        ``train.steps``, or is found exact (``train.stop_when_exact_every``: after the call that
        reaches or passes each multiple, at the training length), leaves the group; its file
        says so, and a run resumed from it takes no step. Returns one ``RunResult`` per seed.

        With ``train.steps_per_dispatch`` N > 1 a call runs N steps (``_dispatch``; the calls
        start at multiples of N, so a resumed run's calls are an uninterrupted run's). The
        step-dependent schedules (the step curriculum, length decay, label smoothing) follow
        each step inside the call; everything that needs values read back acts between
        calls, from each seed's last step: logging and the gated curriculum at the first call
        end at or past each multiple of ``train.log_every`` (a gated run's length can then
        change only every max(N, log_every) or so steps), the progress bar, checkpoints and
        the deadline after every call. A call runs at the widest power-of-two prefix its
        steps need, so a curriculum compiles the call a few times, not once per call."""
        cfg = self.train_config
        paths = checkpoint_paths or [None] * len(seeds)
        runs = [self._start_seed(seed, task_config, path) for seed, path in zip(seeds, paths)]
        gated = task_config.curriculum_accuracy is not None
        label = f"{self.name} seed{'s' if len(seeds) > 1 else ''} " + ",".join(map(str, seeds))
        bar = tqdm(total=cfg.steps * len(runs), initial=sum(r.steps for r in runs), desc=label,
                   disable=not progress, leave=False, dynamic_ncols=True)
        compile_s = 0.0
        start = last_save = time.perf_counter()
        active = [r for r in runs if r.steps < cfg.steps and r.exact_step is None]
        if active:
            params, opt_state = _stack_runs(active)
        device_words = cfg.device_words
        if device_words:
            table = jnp.asarray(group.table)
        first_tick, stopped = True, False
        while active and not stopped:
            if device_words:
                counts, params, opt_state, loss_t, accuracy_t = self._device_call(
                    active, params, opt_state, table, task_config, gated)
            else:
                counts = [1] * len(active)
                batches = [self._next_batch(r, group, task_config, gated) for r in active]
                width = max(b[0] for b in batches)
                tokens, targets, mask = (np.stack([b[1][i][:, :width] for b in batches])
                                         for i in range(3))
                lr_factors = np.array([length_decay_factor(cfg, r.steps, r.reached_step)
                                       for r in active], np.float32)
                smoothing_on = np.array([label_smoothing_on(cfg, r.steps, r.reached_step)
                                         for r in active])
                params, opt_state, loss_t, accuracy_t = self._train_step(
                    params, opt_state, tokens, targets, mask, lr_factors, smoothing_on)
            for r, count in zip(active, counts):
                r.steps += count
                r.trained_length = r.scored
                r.taken += count
            if first_tick:
                loss_t.block_until_ready()
                compile_s = time.perf_counter() - start
                first_tick = False
                if not progress:  # a log that stops here shows where the time went
                    print(f"{label}: first call {compile_s:.1f} s (compilation and "
                          f"{max(counts)} step{'s' if max(counts) > 1 else ''})", flush=True)
            # A call that reaches or passes a multiple of log_every (one step per call: a step
            # at a multiple of it) logs, as does a run's last.
            logging = [i for i, (r, count) in enumerate(zip(active, counts))
                       if _passed_multiple(r.steps, count, cfg.log_every)
                       or r.steps == cfg.steps]
            # The check for exactness: at the training length, not at the cap (the run ends).
            checking = [] if cfg.stop_when_exact_every is None else [
                i for i, (r, count) in enumerate(zip(active, counts))
                if _passed_multiple(r.steps, count, cfg.stop_when_exact_every)
                and r.reached_step is not None and r.steps < cfg.steps]
            if logging or checking or device_words:
                losses, accuracies = np.asarray(loss_t), np.asarray(accuracy_t)  # waits
                for i in logging:
                    self._log(active[i], float(losses[i]), float(accuracies[i]), task_config,
                              gated, start, progress, bar)
                bar.update(sum(r.steps for r in runs) - bar.n)
                exact = {i for i in checking
                         if self._check_exact(active[i], _unstack(params, i), group, task_config)}
                now = time.perf_counter()
                finished = [i for i, r in enumerate(active) if r.steps == cfg.steps or i in exact]
                save_due = cfg.checkpoint_every_s is not None and \
                    now - last_save > cfg.checkpoint_every_s
                stopped = deadline is not None and now > deadline
                if finished or save_due or stopped:
                    for i, r in enumerate(active):
                        r.params, r.opt_state = _unstack(params, i), _unstack(opt_state, i)
                        r.loss, r.accuracy = float(losses[i]), float(accuracies[i])
                        if save_due or stopped or i in finished:
                            r.save()
                    last_save = now if save_due else last_save
                if finished:
                    active = [r for i, r in enumerate(active) if i not in finished]
                    if active and not stopped:  # the rest go on as a smaller group
                        params, opt_state = _stack_runs(active)
        bar.close()
        train_s = time.perf_counter() - start - compile_s
        results = []
        for r in runs:
            eval_start = time.perf_counter()
            evals = [self.evaluate(r.params, group, task_config, length)
                     for length in task_config.eval_lengths]
            results.append(RunResult(
                model=self.name, seed=r.seed, num_params=self.num_params, steps=r.steps,
                compile_s=compile_s if r.taken else 0.0, train_s=train_s if r.taken else 0.0,
                eval_s=time.perf_counter() - eval_start, final_loss=r.loss,
                final_train_accuracy=r.accuracy, resumed_from_step=r.first_step,
                final_scored_length=task_config.train_length
                if r.trained_length is None else r.trained_length,
                reached_train_length_step=r.reached_step, evals=evals,
                stopped_exact_step=r.exact_step))
        return results

    def _check_exact(self, run, params, group, task_config):
        """Whether ``run`` is exact on the held-out words at every evaluation length; if so,
        records the step in ``run`` and prints it."""
        held_out = dataclasses.replace(task_config, eval_seed=task_config.eval_seed + 1)
        if not all(self.evaluate(params, group, held_out, length)["sequence_accuracy"] == 1.0
                   for length in sorted(task_config.eval_lengths, reverse=True)):
            return False  # (the longest first: a run that is not exact fails there soonest)
        run.exact_step = run.steps
        tqdm.write(f"{self.name} seed {run.seed}: step {run.steps}: exact on held-out words at "
                   f"lengths {', '.join(map(str, task_config.eval_lengths))}: stopped")
        return True

    def _start_seed(self, seed, task_config, checkpoint_path):
        """A seed's run state: fresh, or resumed from its checkpoint file."""
        cfg = self.train_config
        params = self.init_params(seed)
        opt_state = self.optimizer.init(params)
        gated = task_config.curriculum_accuracy is not None
        prints = checkpoint.fingerprints(self.model_config, cfg, task_config, seed)
        run = _SeedRun(seed=seed, params=params, opt_state=opt_state,
                       rng=np.random.default_rng([seed, 0x5EED]),
                       scored=task_config.curriculum_start_length if gated else None,
                       checkpoint_path=checkpoint_path, prints=prints)
        if checkpoint_path is not None and os.path.exists(checkpoint_path):
            saved = checkpoint.load(checkpoint_path, params, opt_state, prints)
            run.params, run.opt_state, run.first_step, run.scored = (
                saved.params, saved.opt_state, saved.step, saved.scored)
            run.loss, run.accuracy, run.reached_step = saved.loss, saved.accuracy, \
                saved.reached_step
            if cfg.stop_when_exact_every is not None:  # (with the check off, it trains on)
                run.exact_step = saved.exact_step
            run.rng.bit_generator.state = saved.rng_state
            tqdm.write(f"{self.name} seed {seed}: resumed at step {run.first_step} from "
                       f"{checkpoint_path}")
            if run.exact_step is not None:
                tqdm.write(f"{self.name} seed {seed}: stopped exact at step {run.exact_step}: "
                           f"no step to take (train.stop_when_exact_every=null trains on)")
            # A schedule key the file does not hold was at its default.
            defaults = type(cfg)()
            changed = {k: (saved.schedule.get(k, getattr(defaults, k)), new)
                       for k, new in prints.schedule.items()} if saved.schedule else {}
            changed = {k: pair for k, pair in changed.items() if pair[0] != pair[1]}
            if changed:
                tqdm.write(f"{self.name} seed {seed}: continues under a new schedule: " + ", ".join(
                    f"{k} {old} -> {new}" for k, (old, new) in changed.items()))
        run.steps = run.first_step
        run.trained_length = run.scored
        return run

    def _advance_schedule(self, run, task_config, gated, step):
        """Sets the seed's scored length for ``step`` (the step curriculum; a gated one moves
        in ``_log``) and notes the step at which it reaches the training length."""
        cfg = self.train_config
        if not gated:
            run.scored = curriculum_length(step, task_config.curriculum_start_length,
                                           task_config.train_length, task_config.curriculum_steps)
        if run.reached_step is None and (run.scored is None
                                         or run.scored >= task_config.train_length):
            run.reached_step = step
            if cfg.length_decay_steps:
                tqdm.write(f"{self.name} seed {run.seed}: step {step}: scored length at "
                           f"the training length; the learning rate falls by "
                           f"{cfg.length_decay_ratio}x over {cfg.length_decay_steps} steps")
            if cfg.label_smoothing and cfg.label_smoothing_from == "train_length":
                tqdm.write(f"{self.name} seed {run.seed}: step {step}: label smoothing "
                           f"{cfg.label_smoothing} from here")

    def _next_batch(self, run, group, task_config, gated):
        """The seed's next training words: ``(width, (tokens, targets, mask))``."""
        cfg = self.train_config
        self._advance_schedule(run, task_config, gated, run.steps)
        batch = sample_word_problems(group, run.rng, cfg.batch_size * cfg.batch_scale,
                                     task_config.train_length,
                                     task_config.length_sampling, run.scored)
        return _width(run.scored, task_config), (batch.tokens, batch.targets, batch.mask)

    def _device_call(self, active, params, opt_state, table, task_config, gated):
        """One ``_dispatch`` call for the ``active`` seeds: each takes the steps up to the next
        multiple of ``train.steps_per_dispatch`` (or to ``train.steps``). Returns
        ``(steps taken per seed, params, opt_state, loss, accuracy)``."""
        cfg = self.train_config
        n = cfg.steps_per_dispatch
        counts = [min(n - r.steps % n, cfg.steps - r.steps) for r in active]
        schedules = [self._call_schedule(r, count, task_config, gated)
                     for r, count in zip(active, counts)]
        schedule = {key: np.stack([s[key] for s in schedules]) for key in schedules[0]}
        width = max(_width(r.scored, task_config) for r in active)  # scored grows with steps
        seeds = np.array([r.seed for r in active], np.int32)
        params, opt_state, loss, accuracy = self._train_dispatch(
            params, opt_state, seeds, schedule, table, width=width,
            length=task_config.train_length, length_sampling=task_config.length_sampling,
            batch_size=cfg.batch_size * cfg.batch_scale)
        return counts, params, opt_state, loss, accuracy

    def _call_schedule(self, run, count, task_config, gated):
        """The per-step inputs of ``_dispatch`` for one seed taking ``count`` steps from
        ``run.steps`` (its scored length is left at the last one's); the rows past ``count``
        repeat the last live one, marked not live."""
        cfg = self.train_config
        rows = []
        for i in range(cfg.steps_per_dispatch):
            if i < count:
                step = run.steps + i
                self._advance_schedule(run, task_config, gated, step)
                rows.append((step, task_config.train_length if run.scored is None
                             else run.scored, length_decay_factor(cfg, step, run.reached_step),
                             label_smoothing_on(cfg, step, run.reached_step), True))
            else:
                rows.append(rows[-1][:-1] + (False,))
        columns = list(zip(*rows))
        return {"step": np.array(columns[0], np.int32), "scored": np.array(columns[1], np.int32),
                "lr_factor": np.array(columns[2], np.float32),
                "smoothing_on": np.array(columns[3], bool), "live": np.array(columns[4], bool)}

    def _log(self, run, loss, accuracy, task_config, gated, start, progress, bar):
        run.loss, run.accuracy = loss, accuracy
        bar.set_postfix(loss=f"{loss:.3f}", acc=f"{accuracy:.3f}", len=run.scored,
                        refresh=False)
        if not progress:  # headless runs (logs, sweeps) still show how training goes
            print(f"{self.name} seed {run.seed}: step {run.steps}, loss {loss:.3f}, training "
                  f"accuracy {accuracy:.3f}, scored length "
                  f"{task_config.train_length if run.scored is None else run.scored}, "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
        if gated:
            grown = gated_curriculum_length(run.scored, accuracy,
                                            task_config.curriculum_accuracy,
                                            task_config.train_length)
            if grown != run.scored:
                tqdm.write(f"{self.name} seed {run.seed}: step {run.steps}, training accuracy "
                           f"{accuracy:.3f} at length {run.scored} -> length {grown}")
            run.scored = grown

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


@dataclasses.dataclass
class _SeedRun:
    """One seed's state in ``ModelRunner.run_seeds`` (its parameters while it is not stacked
    with the others)."""
    seed: int
    params: dict
    opt_state: object
    rng: np.random.Generator  # the training words
    scored: int | None  # the curriculum's scored length (None: all positions)
    checkpoint_path: str | None
    prints: checkpoint.Fingerprints
    first_step: int = 0
    steps: int = 0  # optimizer steps taken so far (resumed ones included)
    taken: int = 0  # by this invocation
    reached_step: int | None = None
    exact_step: int | None = None  # the step at which it stopped exact
    trained_length: int | None = None  # the scored length of the last step taken
    loss: float = float("nan")
    accuracy: float = float("nan")

    def save(self):
        if self.checkpoint_path is not None and self.taken:  # (nothing new otherwise)
            checkpoint.save(self.checkpoint_path, checkpoint.RunState(
                self.params, self.opt_state, self.steps, self.scored,
                self.rng.bit_generator.state, self.loss, self.accuracy,
                reached_step=self.reached_step, exact_step=self.exact_step), self.prints)


def _passed_multiple(steps, count, every):
    """Whether a call that took ``count`` steps up to ``steps`` reached or passed a multiple of
    ``every``."""
    return steps // every > (steps - count) // every


def _width(scored, task_config):
    """Columns a step at scored length ``scored`` runs on. Causal models: positions past the
    scored ones change nothing, so a curriculum step runs on the shortest power-of-two prefix
    (a few compilations, much less work)."""
    if scored is None:
        return task_config.train_length
    return min(task_config.train_length, 1 << (scored - 1).bit_length())


def _stack_runs(runs):
    """The runs' parameters and optimizer states along a leading seed axis."""
    def stack(trees):
        return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)

    return stack([r.params for r in runs]), stack([r.opt_state for r in runs])


def _unstack(tree, index):
    return jax.tree.map(lambda x: x[index], tree)

