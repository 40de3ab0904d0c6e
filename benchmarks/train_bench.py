"""Training throughput on the GPU: tokens/s, MFU, where a step's time goes, and 1 vs 2 GPUs.

From the repository root, with the package installed:

    python benchmarks/train_bench.py [--json FILE] [key=value ...]     # one GPU
    python benchmarks/train_bench.py --two-gpu [--json FILE]           # two GPUs
    python benchmarks/train_bench.py --tiny [--two-gpu]                # CPU smoke test

``key=value`` arguments override the hybrid's ``ModelConfig`` (``--model``, default
``configs/model/hybrid_400m.yaml``) as ``m2rnn-train``'s overrides do, e.g.
``layer_pattern=DDDDADDDDDDDADDDDDDDADDD`` for the Gated DeltaNet hybrid of the same shape or
``attention.implementation=cudnn`` for cuDNN attention in the hybrid's attention layers.

One GPU (in this order, each section saved to ``--json`` as soon as it ends):

1. the attention-only model: the hybrid with every layer ``A`` (same d_model, MLP,
   vocabulary). Its attention path is chosen by ``--attention`` (default ``auto``): cuDNN flash
   attention (``jax.nn.dot_product_attention(implementation="cudnn")`` with ``is_causal`` and
   the packed rows' documents as a boolean mask, which cuDNN takes as an additive (B, 1, S, S)
   bias: no S x S scores in float32, no bias gradient), and if that cannot be compiled or run,
   XLA attention with per-block rematerialisation (one layer's S x S scores alive at a time).
   XLA attention without remat needs ~160 GiB at batch 4 x 4096 and is never tried by
   ``auto``. The path used is printed and saved (``attention_path``).
2. where the time goes, from isolated timings: forward and forward+backward of one
   (RMSNorm + mixer) per mixer letter, of the M²RNN op alone at a layer's shapes (so the
   mixer's time splits into the recurrence and the rest: projections, conv, gates, output
   gate and norm), one (RMSNorm + SwiGLU), and of embedding + final norm + LM head +
   cross-entropy, each jitted alone at the bench shape (median after warm-up,
   ``benchmarks/timing.py``), times their counts; the optimizer update (clip + AdamW + apply,
   float32 master weights) timed alone on the model's real state, 8 per call. Printed as ms
   and % of the measured step; the remainder is residual adds, overlap and what the isolated
   timings miss.
3. the hybrid as configured (M²RNN ``backend="auto"``, no remat).

``--profile DIR``: after timing, each trained model runs ``--profile-steps`` more steps under
``jax.profiler``; the trace goes to ``DIR/<model>/`` and the busiest kernels of each device
timeline are printed (``benchmarks/trace_summary.py``, which also reads the trace again later,
with ``--hlo`` for what a fusion computes). This is the step's breakdown as it runs, overlap
included, next to the isolated timings of 2.

``--two-gpu``: the hybrid on a 1-device mesh (the reference), then data-parallel (mesh data=2)
and FSDP (fsdp=2) on 2 devices, for ``--steps`` steps (default 8) on the same batches from the
same initial state: the state is initialised once on one device, copied to the host and put on
each mesh (so the three runs start from identical values and the init compiles once). Per-step
losses, max |loss - 1-device loss|, tokens/s and compile times go to ``--json``; layouts already
in that file are skipped (a rerun after a timeout does only what is missing).

Init: every parameter draws its own ``jax.random.normal``, and XLA inlines a ThreeFry hash into
every such fusion and compiles each of them to PTX, so a 400M state initialised under jit spends
about a minute compiling on an H200. This script switches on
``jax_threefry_gpu_kernel_lowering`` (one handwritten ThreeFry kernel instead;
``--no-threefry-kernel`` turns it off) and prints init lower / compile / run times separately,
as it does for the train step (compiled ahead of time with ``.lower().compile()``). Set
``JAX_COMPILATION_CACHE_DIR`` to reuse compiled steps across runs.

Model FLOPs per token (forward + backward = 3 x forward; recomputation not counted):

    dense      = 6 · P_matmul           P_matmul: every weight matrix except the embedding
                                        table (unless tied) and the M²RNN W; conv taps count;
                                        a routed expert's weights count top_k / num_experts
                                        (the active parameters, as train/step.py counts them)
    attention  = 6 · L_A · S · H · D_h  causal QKᵀ and PV (half of 12 · L_A · S · H · D_h)
    recurrence = 6 · L_M · N · K · V · (V + 1)   per step and head: H W (2·K·V²) and the
                                        read-out Hᵀq (2·K·V), x3 for the backward

MFU = (dense + attention + recurrence) · tokens/s / peak bf16 FLOP/s (989 TFLOP/s for an
H100/H200 SXM, dense; ``--peak-tflops`` for others). Tokens come from the Python standard
library's sources as bytes (in memory; the ``grain`` package is not needed).
"""

import argparse
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from m2rnn_jax import ModelConfig, m2rnn
from m2rnn_jax.layers.linear import Embed, Linear
from m2rnn_jax.layers.mlp import SwiGLU
from m2rnn_jax.layers.moe import MoE
from m2rnn_jax.layers.norm import RMSNorm
from m2rnn_jax.layers.params import model_dtypes
from m2rnn_jax.layers.registry import mixer_class
from m2rnn_jax.typed_config import load_yaml, override
from train import sharding
from train.config import DataConfig, MeshConfig, OptimizerConfig, TrainConfig
from train.data import PackedRows, model_inputs, read_bytes, stdlib_python_files
from train.run_folder import write_atomically
from train.step import active_shares, build_trainee, put_batch, token_cross_entropy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trace_summary  # noqa: E402  (benchmarks/trace_summary.py)
from timing import median_seconds  # noqa: E402  (benchmarks/timing.py)

HYBRID_CONFIG = "configs/model/hybrid_400m.yaml"
TINY_CONFIG = "configs/model/tiny_hybrid.yaml"
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0}
GiB = 2 ** 30
LAYOUTS = {"1": ("1 device", {"data": 1}, 1),
           "dp": ("2 devices data-parallel", {"data": 2}, 2),
           "fsdp": ("2 devices FSDP", {"data": 1, "fsdp": 2}, 2)}


# ----------------------------------------------------------------------------- bookkeeping

class Report:
    """The JSON results file, rewritten after every section (a timeout keeps what is done)."""

    def __init__(self, path):
        self.path = path
        self.data = {}
        if path and os.path.exists(path):
            with open(path) as fh:
                self.data = json.load(fh)

    def put(self, section, key, value):
        self.data.setdefault(section, {})[key] = value
        self.save()

    def save(self):
        if not self.path:
            return
        write_atomically(self.path, json.dumps(self.data, indent=1, default=str))


def short_error(err) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"


def peak_memory_gib():
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else peak / GiB


def compiled_gib(compiled):
    """Arguments + outputs - aliased + temporaries of a compiled step, GiB per device."""
    try:
        m = compiled.memory_analysis()
        total = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                 + m.temp_size_in_bytes)
        return total / GiB
    except Exception:  # noqa: BLE001 — not every backend reports it
        return None


def flops_per_token(model_config: ModelConfig, abstract_params, seq_len: int) -> dict:
    """Model FLOPs per trained token by term (see the module docstring)."""
    matmul_params = 0.0
    # A routed expert's weights count by the share of them a token uses.
    for names, shape, share in active_shares(model_config, abstract_params):
        if len(shape) < 2 or names[-1] == "W":
            continue
        if names[-1] == "embedding" and not model_config.tie_embeddings:
            continue
        matmul_params += int(np.prod(shape)) * share
    pattern = model_config.layer_pattern
    m, att = model_config.m2rnn, model_config.attention
    attention = 6 * pattern.count("A") * seq_len * att.num_heads * model_config.attention_head_dim
    recurrence = 6 * pattern.count("M") * m.num_heads * m.key_dim * m.value_dim * (
        m.value_dim + 1)
    return {"dense": round(6 * matmul_params), "attention": attention, "recurrence": recurrence}


def peak_flops(override_tflops):
    if override_tflops:
        return override_tflops * 1e12
    kind = jax.devices()[0].device_kind
    for name, tflops in PEAK_TFLOPS.items():
        if name in kind:
            return tflops * 1e12
    return None


def text_batches(seq_len, batch, count, seed=0):
    """``count`` batches of packed standard-library bytes (rows of ``seq_len + 1``)."""
    files = stdlib_python_files()
    documents, total = [], 0
    rng = np.random.default_rng(seed)
    for index in rng.permutation(len(files)):
        documents.append(read_bytes(files[index]))
        total += documents[-1].size
        if total > (seq_len + 1) * batch * count * 1.1 + 1:
            break
    rows = PackedRows(documents, seq_len, seed=seed)
    picked = [rows[i] for i in range(batch * count)]
    return [{key: np.stack([r[key] for r in picked[i * batch:(i + 1) * batch]])
             for key in ("tokens", "segment_ids")} for i in range(count)]


def train_config(model_config, batch, seq_len, steps, mesh=None, remat=False):
    return TrainConfig(model=model_config, steps=steps, remat=remat,
                       optimizer=OptimizerConfig(warmup_steps=5),
                       data=DataConfig(seq_len=seq_len, batch_size=batch),
                       mesh=MeshConfig(**(mesh or {"data": 1})))


# ----------------------------------------------------------------------------- init + steps

def init_state(config, device):
    """The initial train state on one device (or sharded over a list of devices, the mesh of
    ``config.mesh``), with lower / compile / run seconds."""
    devices = list(device) if isinstance(device, (list, tuple)) else [device]
    trainee = build_trainee(config, sharding.make_mesh(config.mesh, devices))
    jitted, seed = trainee.init_state.func, trainee.init_state.args[0]
    t0 = time.perf_counter()
    try:
        lowered = jitted.lower(seed)
        t1 = time.perf_counter()
        compiled = lowered.compile()
    except Exception as err:  # noqa: BLE001 — the ThreeFry kernel is only a compile-time aid
        if not jax.config.jax_threefry_gpu_kernel_lowering:
            raise
        print(f"  init with the ThreeFry GPU kernel failed ({short_error(err)}); without it",
              flush=True)
        jax.config.update("jax_threefry_gpu_kernel_lowering", False)
        t0 = time.perf_counter()
        lowered = jitted.lower(seed)
        t1 = time.perf_counter()
        compiled = lowered.compile()
    t2 = time.perf_counter()
    state = jax.block_until_ready(compiled(seed))
    t3 = time.perf_counter()
    times = {"lower_s": t1 - t0, "compile_s": t2 - t1, "run_s": t3 - t2,
             "threefry_gpu_kernel": bool(jax.config.jax_threefry_gpu_kernel_lowering)}
    print(f"  init {trainee.num_params / 1e6:.1f}M params: lower {times['lower_s']:.1f} s, "
          f"compile {times['compile_s']:.1f} s, run {times['run_s']:.1f} s", flush=True)
    return state, times


def run_steps(config, devices, batches, state, *, time_optimizer=False, profile=None,
              metric_names=(), after=None, back_to_back=False):
    """Trains from ``state`` (put on the mesh; consumed) on ``batches``: losses and timings.

    The step is compiled ahead of time (timed on its own); every step is waited for, the
    median of steps 3.. is the step time. ``profile = (directory, steps)`` then traces that
    many more steps (see ``profile_steps``). ``metric_names``: train-step metrics recorded per
    step besides the loss (``result["metrics"]``). ``after(trainee, state, placed, result)``,
    when given, runs on the state after those steps and its dict is merged into the result.
    ``back_to_back``: last, the batches from the third on are trained again, dispatched back to
    back and waited for once, as the trainer runs them (``back_to_back_step_s``).
    """
    mesh = sharding.make_mesh(config.mesh, devices)
    trainee = build_trainee(config, mesh)
    state = jax.device_put(state, trainee.state_shardings)
    placed = [put_batch(b, trainee, accum_steps=1) for b in batches]
    t0 = time.perf_counter()
    lowered = trainee.train_step.lower(state, placed[0])
    t1 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0  # tracing and lowering included: what a user waits
    lower_s = t1 - t0
    step_gib = compiled_gib(compiled)
    print(f"  mesh {dict(mesh.shape)}: train step compiled in {compile_s:.1f} s (trace + lower "
          f"{lower_s:.1f} s, XLA {compile_s - lower_s:.1f} s); its memory (per device, XLA's "
          f"analysis) {'n/a' if step_gib is None else f'{step_gib:.1f}'} GiB", flush=True)
    losses, times = [], []
    recorded = {name: [] for name in metric_names}
    for batch in placed:
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        losses.append(float(metrics["loss"]))  # blocks: each step timed on its own
        times.append(time.perf_counter() - t0)
        for name in metric_names:
            recorded[name].append(float(metrics[name]))
    step_s = statistics.median(times[2:]) if len(times) > 3 else times[-1]
    print(f"  losses {' '.join(f'{x:.4f}' for x in losses)}", flush=True)
    print(f"  step times (ms) {' '.join(f'{t * 1e3:.0f}' for t in times)}; "
          f"median {step_s * 1e3:.1f} ms", flush=True)
    result = {"losses": losses, "step_times_s": times, "step_s": step_s,
              "compile_s": compile_s, "lower_s": lower_s, "remat": config.remat,
              "attention_implementation": config.model.attention.implementation,
              "step_gib": step_gib, "process_peak_gib": peak_memory_gib(),
              "num_params": trainee.num_params}
    if metric_names:
        result["metrics"] = recorded
    if profile:
        state, result["profile"] = profile_steps(compiled, state, placed, *profile)
    if after is not None:
        result.update(after(trainee, state, placed, result))
    if time_optimizer:
        result["optimizer_s"] = optimizer_seconds(trainee, state)
        print(f"  optimizer update alone {result['optimizer_s'] * 1e3:.1f} ms", flush=True)
    if back_to_back:
        # As the trainer runs them (it reads its metrics every log_every steps): the host's
        # dispatch of one step overlaps the GPU's work on the one before.
        again = placed[2:] if len(placed) > 3 else placed
        t0 = time.perf_counter()
        for batch in again:
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        result["back_to_back_step_s"] = (time.perf_counter() - t0) / len(again)
        print(f"  {len(again)} steps back to back: "
              f"{result['back_to_back_step_s'] * 1e3:.1f} ms per step", flush=True)
    result["flops"] = flops_per_token(config.model, trainee.abstract_params,
                                      config.data.seq_len)
    del state, compiled
    gc.collect()
    return result


def profile_steps(compiled, state, placed, directory, steps, threads=4, top=12):
    """Runs ``steps`` more train steps under ``jax.profiler`` (trace in ``directory``) and
    prints the busiest kernels of each device timeline. Returns the state and, per timeline,
    its busy ms per step and top kernels (ms per step)."""
    with jax.profiler.trace(directory, create_perfetto_trace=True):
        for i in range(steps):
            state, metrics = compiled(state, placed[i % len(placed)])
            float(metrics["loss"])
    on_gpu = jax.devices()[0].platform == "gpu"
    events = trace_summary.read_events(trace_summary.find_trace(directory))
    rows = trace_summary.summarize(events, "GPU" if on_gpu else "", top)
    print(f"  profile of {steps} steps ({directory}), busiest timelines:", flush=True)
    trace_summary.print_summary(rows, threads)
    return state, [{"timeline": f"{process} / {thread}", "busy_ms_per_step": busy / 1e3 / steps,
                    "top_ms_per_step": {name: total / 1e3 / steps for name, total, _ in ranked}}
                   for process, thread, busy, _, ranked in rows[:threads]]


def optimizer_seconds(trainee, state, updates=8):
    """Seconds of one optimizer update + apply on the real state; the params stand in for the
    gradients (the update's cost does not depend on their values), and being carried they keep
    XLA from hoisting the clip's global norm out of the loop. ``updates`` run in one jitted
    loop per call: each call of its own would mostly time the host's handling of its ~1,800
    buffers (16.5 ms per update on an H200, whose kernels take 4.3 ms)."""
    optimizer = trainee.optimizer

    def run(params, opt_state):
        def update(_, carry):
            params, opt_state = carry
            changes, opt_state = optimizer.update(params, opt_state, params)
            return optax.apply_updates(params, changes), opt_state

        return jax.lax.fori_loop(0, updates, update, (params, opt_state))

    fn = jax.jit(run)
    return median_seconds(fn, state["params"], state["opt_state"], repeats=3) / updates


# ----------------------------------------------------------------------------- layer shares

class MixerPart(nnx.Module):
    """RMSNorm + one mixer, as in a block (the residual add left out)."""

    def __init__(self, config, letter, *, rngs):
        dtype, param_dtype = model_dtypes(config)
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps, dtype=dtype,
                            param_dtype=param_dtype)
        self.mixer = mixer_class(letter)(config, rngs=rngs)

    def __call__(self, x, segment_ids):
        return self.mixer(self.norm(x), segment_ids=segment_ids)


class MlpPart(nnx.Module):
    """RMSNorm + the block's MLP: the SwiGLU, or the mixture of experts when ``moe`` is on
    (``dense_equivalent``: a SwiGLU as wide as the experts a token uses, shared one included)."""

    def __init__(self, config, *, rngs, dense_equivalent=False):
        dtype, param_dtype = model_dtypes(config)
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps, dtype=dtype,
                            param_dtype=param_dtype)
        moe = config.moe
        if dense_equivalent:
            width = moe.top_k * moe.expert_hidden_dim + moe.shared_expert_hidden_dim
            config = dataclasses.replace(config, mlp=dataclasses.replace(config.mlp,
                                                                         hidden_dim=width))
        self.is_moe = moe.enabled and not dense_equivalent
        self.mlp = MoE(config, rngs=rngs) if self.is_moe else SwiGLU(config, rngs=rngs)

    def __call__(self, x, segment_ids):
        out = self.mlp(self.norm(x))
        return out[0] if self.is_moe else out


class HeadPart(nnx.Module):
    """Embedding lookup, final norm, LM head and the masked cross-entropy sum; ``x`` stands in
    for the blocks' output (added to the embeddings so both get gradients)."""

    def __init__(self, config, *, rngs):
        dtype, param_dtype = model_dtypes(config)
        self.embed = Embed(config.vocab_size, config.d_model, std=config.init_std, rngs=rngs,
                           dtype=dtype, param_dtype=param_dtype)
        self.norm = RMSNorm(config.d_model, eps=config.norm_eps, dtype=dtype,
                            param_dtype=param_dtype)
        self.head = Linear(config.d_model, config.vocab_size, ("embed", "vocab"),
                           std=config.init_std, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x, tokens, segment_ids):
        inputs, _, targets, mask = model_inputs(tokens, segment_ids)
        logits = self.head(self.norm(x + self.embed(inputs)), out_dtype=jnp.float32)
        losses = token_cross_entropy(logits, targets)
        return jnp.sum(jnp.where(mask, losses, 0.0))


class M2RNNOpPart(nnx.Module):
    """The M²RNN op alone at one layer's shapes: what the mixer spends in the recurrence
    kernel (its inputs are random projections of ``x``, made outside the timed function)."""

    def __init__(self, config, *, rngs):
        self.cfg = config.m2rnn
        self.W = nnx.Param(jnp.eye(self.cfg.value_dim, dtype=jnp.float32)[None].repeat(
            self.cfg.heads("w"), axis=0))

    def inputs(self, x):
        cfg, (batch, seq_len) = self.cfg, x.shape[:2]
        keys = jax.random.split(jax.random.key(1), 4)

        def draw(key, heads, dim):
            return jax.random.normal(key, (batch, seq_len, heads, dim), x.dtype)

        return (draw(keys[0], cfg.heads("q"), cfg.key_dim), draw(keys[1], cfg.heads("k"),
                                                                 cfg.key_dim),
                draw(keys[2], cfg.heads("v"), cfg.value_dim),
                jax.nn.sigmoid(jax.random.normal(keys[3], (batch, seq_len, cfg.heads("f")))))

    def __call__(self, inputs, segment_ids):
        q, k, v, f = inputs
        y, _ = m2rnn(q, k, v, self.W[...].astype(v.dtype), f, None, self.cfg.gradient_clipping,
                     segment_ids=segment_ids, backend=self.cfg.backend,
                     chunk_size=self.cfg.chunk_size)
        return y


def part_seconds(part, batch, d_model, compute_dtype):
    """``(forward, forward + backward)`` seconds of ``part`` on a ``(B, S, d_model)``
    compute-dtype input."""
    graphdef, params = nnx.split(part, nnx.Param)
    tokens, segment_ids = jnp.asarray(batch["tokens"]), jnp.asarray(batch["segment_ids"])
    x_segments = segment_ids[:, :-1]
    shape = (tokens.shape[0], tokens.shape[1] - 1, d_model)
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], shape, jnp.float32).astype(compute_dtype)
    probe = jax.random.normal(keys[1], shape, jnp.float32)

    if isinstance(part, HeadPart):
        def loss(p, inputs):
            return nnx.merge(graphdef, p)(inputs, tokens, segment_ids)
    elif isinstance(part, M2RNNOpPart):
        x = part.inputs(x)
        y_probe = jax.random.normal(keys[1], shape[:2] + (part.cfg.num_heads,
                                                          part.cfg.value_dim), jnp.float32)

        def loss(p, inputs):
            out = nnx.merge(graphdef, p)(inputs, x_segments)
            return jnp.sum(out.astype(jnp.float32) * y_probe)
    else:
        def loss(p, inputs):
            out = nnx.merge(graphdef, p)(inputs, x_segments)
            return jnp.sum(out.astype(jnp.float32) * probe)

    forward = median_seconds(jax.jit(loss), params, x, repeats=5)
    return forward, median_seconds(jax.jit(jax.grad(loss, argnums=(0, 1))), params, x, repeats=5)


def layer_shares(model_configs, batch, report):
    """Seconds of each component (fwd+bwd, one instance) for the given model configs."""
    timings = {}
    for model_config in model_configs:
        compute = jnp.dtype(model_config.compute_dtype)
        parts = {f"mixer {letter}" + ("" if letter != "A" else
                                      f" ({model_config.attention.implementation or 'xla'})"):
                 (lambda c, l=letter: MixerPart(c, l, rngs=nnx.Rngs(0)))
                 for letter in sorted(set(model_config.layer_pattern))}
        if "A" in model_config.layer_pattern and \
                (model_config.attention.implementation or "xla") != "xla":
            # the same mixer on XLA attention: what the configured attention path buys
            parts["mixer A (xla)"] = lambda c: MixerPart(with_attention(c, "xla"), "A",
                                                         rngs=nnx.Rngs(0))
        if "M" in model_config.layer_pattern:
            parts["m2rnn op"] = lambda c: M2RNNOpPart(c, rngs=nnx.Rngs(0))
        parts["mlp"] = lambda c: MlpPart(c, rngs=nnx.Rngs(0))
        if model_config.moe.enabled:
            parts["dense mlp of the active width"] = lambda c: MlpPart(
                c, rngs=nnx.Rngs(0), dense_equivalent=True)
        parts["embed+head+loss"] = lambda c: HeadPart(c, rngs=nnx.Rngs(0))
        for name, make in parts.items():
            if name in timings:
                continue
            try:
                part = make(model_config)
                forward, seconds = part_seconds(part, batch, model_config.d_model, compute)
                del part
                timings[name] = seconds
                timings[f"{name} forward"] = forward
                print(f"  {name:28s} fwd {forward * 1e3:8.2f} ms  fwd+bwd {seconds * 1e3:8.2f} "
                      f"ms", flush=True)
            except Exception as err:  # noqa: BLE001 — record and go on
                timings[name] = None
                print(f"  {name}: failed: {short_error(err)}", flush=True)
            report.put("component_s", name, timings[name])
            report.put("component_forward_s", name, timings.get(f"{name} forward"))
            gc.collect()
    return timings


def print_shares(name, model_config, result, timings):
    step_s = result["step_s"]
    pattern = model_config.layer_pattern
    impl = model_config.attention.implementation or "xla"
    rows = []  # (label, forward seconds, forward + backward seconds, counts in the total)

    def add(label, key, count, counted=True):
        one, forward = timings.get(key), timings.get(f"{key} forward")
        rows.append((label, None if forward is None else count * forward,
                     None if one is None else count * one, counted))

    labels = (("M", "M²RNN mixers (+norm)"), ("A", f"attention mixers (+norm, {impl})"),
              ("D", "gated-deltanet mixers (+norm)"), ("S", "mamba2 mixers (+norm)"))
    for letter, label in labels:
        count = pattern.count(letter)
        if count:
            add(f"{label} x{count}", f"mixer {letter}" + (f" ({impl})" if letter == "A" else ""),
                count)
            if letter == "M":  # the part of the mixers' time spent in the recurrence op
                add(f"  of which the M²RNN op alone x{count}", "m2rnn op", count, False)
            if letter == "A" and impl != "xla":
                add(f"  vs XLA attention x{count}", "mixer A (xla)", count, False)
    moe = model_config.moe
    add(f"{'MoE' if moe.enabled else 'SwiGLU'} MLPs (+norm) x{len(pattern)}", "mlp",
        len(pattern))
    if moe.enabled:  # what the same active width costs as one dense SwiGLU
        width = moe.top_k * moe.expert_hidden_dim + moe.shared_expert_hidden_dim
        add(f"  vs a dense SwiGLU of width {width} x{len(pattern)}",
            "dense mlp of the active width", len(pattern), False)
    add("embedding + final norm + head + loss", "embed+head+loss", 1)
    rows.append(("optimizer update (clip + AdamW + apply)", None, result.get("optimizer_s"),
                 True))
    known = sum(s for _, _, s, counted in rows if s is not None and counted)
    rows.append(("rest (residual adds, overlap, unmeasured)", None, step_s - known, True))
    remat = " (remat: its recompute is in the rest)" if result["remat"] else ""
    print(f"\n== where the {name} step goes: one component alone x count; measured step "
          f"{step_s * 1e3:.1f} ms{remat} ==")
    print(f"  {'':46s} {'forward':>9s} {'fwd+bwd':>12s} {'share':>7s}")
    for label, forward, seconds, _ in rows:
        fwd = "" if forward is None else f"{forward * 1e3:6.1f} ms"
        if seconds is None:
            print(f"  {label:46s} {fwd:>9s} {'n/a':>12s}")
        else:
            print(f"  {label:46s} {fwd:>9s} {seconds * 1e3:9.1f} ms {seconds / step_s:7.1%}")
    return [(label, seconds) for label, _, seconds, _ in rows]


# ----------------------------------------------------------------------------- one device

def attention_paths(choice, remat):
    """(implementation, remat) pairs to try, in order, for the attention-only model."""
    if choice == "auto":
        return [("cudnn", remat), ("xla", True)]
    if choice == "xla-remat":
        return [("xla", True)]
    return [(choice, remat)]


def with_attention(model_config, implementation):
    return dataclasses.replace(model_config, attention=dataclasses.replace(
        model_config.attention, implementation=implementation))


def check_attention(model_config, implementation, batch, length=1024):
    """Max relative difference of one attention mixer's output and input gradient between
    ``implementation`` and XLA, on two packed rows of the batch (first ``length`` steps)."""
    rows = min(2, batch["segment_ids"].shape[0])
    length = min(length, batch["segment_ids"].shape[1] - 1)
    segment_ids = jnp.asarray(batch["segment_ids"][:rows, :length])
    x = jax.random.normal(jax.random.key(1), (rows, length, model_config.d_model),
                          jnp.float32).astype(model_config.compute_dtype)
    probe = jax.random.normal(jax.random.key(2), x.shape, jnp.float32)
    outputs = []
    for impl in (implementation, "xla"):
        layer = mixer_class("A")(with_attention(model_config, impl), rngs=nnx.Rngs(0))

        def loss(inputs, layer=layer):
            out = layer(inputs, segment_ids=segment_ids).astype(jnp.float32)
            return jnp.sum(out * probe), out

        grad, out = jax.jit(jax.grad(loss, has_aux=True))(x)
        outputs.append((np.asarray(out, np.float32), np.asarray(grad, np.float32)))
    return max(float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))
               for a, b in zip(*outputs))


def train_model(name, model_config, args, batches, report, paths):
    """Init + train ``model_config`` on one device, trying attention ``paths`` in order."""
    device = jax.devices()[0]
    base = train_config(model_config, args.batch, args.seq_len, args.steps)
    host_state = None
    init_times = None
    failures = []
    for implementation, remat in paths:
        config = dataclasses.replace(base, remat=remat,
                                     model=with_attention(model_config, implementation))
        label = f"{implementation or 'xla'}{' + remat' if remat else ''}"
        print(f"\n-- {name}: attention {label}", flush=True)
        try:
            if implementation not in (None, "xla"):
                error = check_attention(config.model, implementation, batches[0])
                print(f"  {implementation} vs xla attention (fwd output, input grad; 2 packed "
                      f"rows): max relative difference {error:.2e}", flush=True)
                if not error < 2e-2:
                    raise ValueError(f"{implementation} attention differs from xla by {error:.2e}")
            if host_state is None:
                state, init_times = init_state(config, device)
                if len(paths) > 1:  # kept for a retry: a failed run may consume the state
                    host_state = jax.device_get(state)
            else:
                state = host_state
            profile = (os.path.join(args.profile, name), args.profile_steps) \
                if args.profile else None
            result = run_steps(config, [device], batches, state, time_optimizer=True,
                               profile=profile, back_to_back=True)
        except Exception as err:  # noqa: BLE001 — the next path is tried
            failures.append(f"{label}: {short_error(err)}")
            print(f"  attention {label} failed: {short_error(err)}", flush=True)
            if args.verbose:
                traceback.print_exc()
            state = None
            gc.collect()
            continue
        result.update(attention_path=label, init=init_times, failed_paths=failures,
                      pattern=model_config.layer_pattern)
        result["config"] = config
        report.put("train", name, {k: v for k, v in result.items() if k != "config"})
        return result
    report.put("train", name, {"error": failures})
    return None


def one_device(args, hybrid, report):
    batches = text_batches(args.seq_len, args.batch, args.steps)
    attention_only = dataclasses.replace(hybrid, layer_pattern="A" * hybrid.num_layers)
    peak = peak_flops(args.peak_tflops)
    results = {}
    if "attention-only" in args.models:
        results["attention-only"] = train_model(
            "attention-only", attention_only, args, batches, report,
            attention_paths(args.attention, args.remat))
    timings = {}
    if args.shares:
        print("\n-- components, fwd+bwd alone at the bench shape", flush=True)
        configs = [hybrid]
        if results.get("attention-only"):
            configs.append(results["attention-only"]["config"].model)
        timings = layer_shares(configs, batches[0], report)
    if "hybrid" in args.models:
        results["hybrid"] = train_model("hybrid", hybrid, args, batches, report,
                                        [(hybrid.attention.implementation, args.remat)])

    print(f"\n== one device ({jax.devices()[0].device_kind}), batch {args.batch} x seq "
          f"{args.seq_len}, {hybrid.compute_dtype} compute / {hybrid.param_dtype} weights, "
          f"M²RNN backend={hybrid.m2rnn.backend} ==")
    print(f"{'model':15s} {'params':>8s} {'step ms':>8s} {'tokens/s':>9s} {'GFLOP/tok':>9s} "
          f"{'MFU':>6s} {'step GiB':>8s} {'compile s':>9s} {'init s':>6s}  attention")
    for name in ("hybrid", "attention-only"):
        result = results.get(name)
        if name not in args.models:
            continue
        if not result:
            print(f"{name:15s} failed: {report.data.get('train', {}).get(name)}")
            continue
        tokens_per_s = args.batch * args.seq_len / result["step_s"]
        gflop = sum(result["flops"].values()) / 1e9
        mfu = gflop * 1e9 * tokens_per_s / peak if peak else float("nan")
        result.update(tokens_per_s=tokens_per_s, mfu=mfu)
        report.put("train", name, {k: v for k, v in result.items() if k != "config"})
        init_s = (sum(v for k, v in result["init"].items() if k.endswith("_s"))
                  if result["init"] else float("nan"))
        peak_gib = result["step_gib"]
        print(f"{name:15s} {result['num_params'] / 1e6:7.1f}M {result['step_s'] * 1e3:8.1f} "
              f"{tokens_per_s:9,.0f} {gflop:9.3f} {mfu:6.1%} "
              f"{'n/a' if peak_gib is None else f'{peak_gib:.1f}':>8s} "
              f"{result['compile_s']:9.1f} {init_s:6.1f}  {result['attention_path']}")
    for name, result in results.items():
        if result:
            print(f"{name} FLOPs/token by term (GFLOP): " + ", ".join(
                f"{k} {v / 1e9:.3f}" for k, v in result["flops"].items()))
    if timings:
        for name, result in results.items():
            if result:
                rows = print_shares(name, result["config"].model, result, timings)
                report.put("shares", name, {label: s for label, s in rows})


# ----------------------------------------------------------------------------- two devices

def two_devices(args, hybrid, report):
    if len(jax.devices()) < 2:
        raise SystemExit(f"--two-gpu needs 2 devices, found {len(jax.devices())}")
    done = report.data.get("two_gpu", {})
    todo = [key for key in args.layouts if not (key in done and "losses" in done[key])]
    report.put("meta", "two_gpu_steps", args.steps)
    if todo:
        print(f"layouts to run: {', '.join(todo)} (done before: "
              f"{', '.join(k for k in done if k not in todo) or 'none'})", flush=True)
        batches = text_batches(args.seq_len, args.batch, args.steps)
        config = train_config(hybrid, args.batch, args.seq_len, args.steps, remat=args.remat)
        state, init_times = init_state(config, jax.devices()[0])
        report.put("meta", "init_s", init_times)
        host_state = jax.device_get(state)
        del state
        for key in todo:
            name, mesh, count = LAYOUTS[key]
            print(f"\n-- {name}", flush=True)
            start = time.perf_counter()
            try:
                result = run_steps(dataclasses.replace(config, mesh=MeshConfig(**mesh)),
                                   jax.devices()[:count], batches, host_state)
            except Exception as err:  # noqa: BLE001 — record and go on to the next layout
                print(f"  {name} failed: {short_error(err)}", flush=True)
                if args.verbose:
                    traceback.print_exc()
                report.put("two_gpu", key, {"name": name, "error": short_error(err)})
                continue
            result.update(name=name, mesh=mesh, wall_s=time.perf_counter() - start,
                          tokens_per_s=args.batch * args.seq_len / result["step_s"])
            report.put("two_gpu", key, result)
    done = report.data.get("two_gpu", {})
    reference = done.get("1", {}).get("losses")
    print(f"\n== hybrid on 1 vs 2 devices ({jax.devices()[0].device_kind}), global batch "
          f"{args.batch} x seq {args.seq_len}, {hybrid.compute_dtype}, {args.steps} steps, "
          f"same initial state and batches ==")
    print(f"{'layout':24s} {'step ms':>8s} {'tokens/s':>9s} {'compile s':>9s} {'loss 1st':>9s} "
          f"{'loss last':>9s} {'max |Δloss|':>11s} {'match':>5s}")
    all_match = reference is not None
    for key in LAYOUTS:
        result = done.get(key)
        if result is None:
            continue
        name = LAYOUTS[key][0]
        if "losses" not in result:
            print(f"{name:24s} failed: {result.get('error')}")
            all_match = False
            continue
        losses = np.array(result["losses"])
        diff = match = None
        if reference is not None and len(reference) == len(losses):
            diff = float(np.max(np.abs(losses - np.array(reference))))
            # bf16 compute with another reduction order: allow 1% of the loss.
            match = diff <= 0.01 * float(np.max(np.abs(reference)))
            result.update(max_abs_diff_vs_1=diff, match=match)
            report.put("two_gpu", key, result)
        all_match &= bool(match)
        print(f"{name:24s} {result['step_s'] * 1e3:8.1f} {result['tokens_per_s']:9,.0f} "
              f"{result['compile_s']:9.1f} {losses[0]:9.4f} {losses[-1]:9.4f} "
              f"{'n/a' if diff is None else f'{diff:.2e}':>11s} "
              f"{'n/a' if match is None else 'yes' if match else 'NO':>5s}")
    print("per-step losses:")
    for key in LAYOUTS:
        if "losses" in done.get(key, {}):
            print(f"  {key:5s} " + " ".join(f"{x:.4f}" for x in done[key]["losses"]))
    missing = [k for k in args.layouts if "losses" not in done.get(k, {})]
    print("2-device losses match 1 device" if all_match and not missing else
          f"NOT all matched (missing: {missing or 'none'})")


# ----------------------------------------------------------------------------- main

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--two-gpu", action="store_true", help="1-device vs DP vs FSDP on 2")
    parser.add_argument("--tiny", action="store_true",
                        help="tiny config, seq 64, batch 4, 4 steps (CPU smoke test)")
    parser.add_argument("--quick", action="store_true", help="fewer steps (5)")
    parser.add_argument("--model", default=None, help="hybrid ModelConfig YAML")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default 4)")
    parser.add_argument("--seq-len", type=int, default=None, help="default 4096 (tiny 64)")
    parser.add_argument("--steps", type=int, default=None,
                        help="train steps per run (default 10; --two-gpu 8; --quick 5)")
    parser.add_argument("--models", default="attention-only,hybrid",
                        help="one device: which of attention-only,hybrid to train")
    parser.add_argument("--attention", default="auto",
                        choices=["auto", "cudnn", "xla", "xla-remat"],
                        help="attention-only model's attention: auto = cudnn, else xla+remat")
    parser.add_argument("--no-shares", dest="shares", action="store_false",
                        help="skip the per-component timings")
    parser.add_argument("--layouts", default="1,dp,fsdp", help="--two-gpu: which layouts")
    parser.add_argument("--remat", action="store_true", help="recompute block activations")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak bf16 TFLOP/s of one device for MFU (default by device kind)")
    parser.add_argument("--json", default=None, help="results file (also the resume state)")
    parser.add_argument("--no-threefry-kernel", action="store_true",
                        help="leave jax_threefry_gpu_kernel_lowering off")
    parser.add_argument("--profile", metavar="DIR", default=None,
                        help="one device: trace --profile-steps more steps of each model here "
                             "and print the busiest kernels")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps traced (default 3)")
    parser.add_argument("--verbose", action="store_true", help="tracebacks of failures")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides of the hybrid's ModelConfig, e.g. "
                             "layer_pattern=SSSSASSSSSSSASSSSSSSASSS attention.implementation=cudnn")
    args = parser.parse_args(argv)
    args.model = args.model or (TINY_CONFIG if args.tiny else HYBRID_CONFIG)
    args.batch = args.batch or 4
    args.seq_len = args.seq_len or (64 if args.tiny else 4096)
    args.steps = args.steps or (4 if args.tiny else 5 if args.quick else
                                8 if args.two_gpu else 10)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.layouts = [m.strip() for m in args.layouts.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in ("hybrid", "attention-only")] + \
        [k for k in args.layouts if k not in LAYOUTS]
    if unknown:
        parser.error(f"unknown --models/--layouts entries {unknown}")
    if not args.no_threefry_kernel:
        jax.config.update("jax_threefry_gpu_kernel_lowering", True)
    if args.profile_steps < 1:
        parser.error("--profile-steps must be >= 1")
    hybrid = override(load_yaml(ModelConfig, args.model), args.overrides)
    hybrid = dataclasses.replace(hybrid, compute_dtype="bfloat16", param_dtype="float32")
    report = Report(args.json)
    report.put("meta", "jax", jax.__version__)
    report.put("meta", "devices", f"{jax.device_count()} x {jax.devices()[0].device_kind}")
    report.put("meta", "shape", {"batch": args.batch, "seq_len": args.seq_len,
                                 "model": args.model, "overrides": args.overrides})
    print(f"jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}; "
          f"model {args.model} (pattern {hybrid.layer_pattern}); batch {args.batch} x seq "
          f"{args.seq_len}; {args.steps} steps", flush=True)
    start = time.perf_counter()
    (two_devices if args.two_gpu else one_device)(args, hybrid, report)
    print(f"\nbenchmark wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
