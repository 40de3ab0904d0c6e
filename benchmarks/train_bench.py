"""Training throughput on the GPU: tokens/s and model FLOPs utilisation (MFU).

    PYTHONPATH=. python benchmarks/train_bench.py [--quick]       # one GPU
    PYTHONPATH=. python benchmarks/train_bench.py --two-gpu [--quick]

One GPU: the 400M hybrid (``configs/model/hybrid_400m.yaml``) and an attention-only model of
the same shape (every layer ``A``), seq 4096, bf16 compute with float32 master weights, M²RNN
``backend="auto"``; then where a step's time goes, from forward+backward timings of one
M²RNN mixer, one attention mixer and one SwiGLU MLP at the same batch and length.

``--two-gpu``: the hybrid on 1 GPU, data-parallel on 2 (mesh data=2) and FSDP on 2 (fsdp=2),
same initialisation and batches: the 2-GPU losses must match the 1-GPU loss over the first
steps (bf16, so within a tolerance), plus their throughput.

Model FLOPs per token (forward + backward = 3 x forward; recomputation not counted):

    dense      = 6 · P_matmul           P_matmul: every weight matrix except the embedding
                                        table (unless tied) and the M²RNN W; conv taps count
    attention  = 6 · L_A · S · H · D_h  causal QKᵀ and PV (half of 12 · L_A · S · H · D_h)
    recurrence = 6 · L_M · N · K · V · (V + 1)   per step and head: H W (2·K·V²) and the
                                        read-out Hᵀq (2·K·V), x3 for the backward

MFU = (dense + attention + recurrence) · tokens/s / peak bf16 FLOP/s (989 TFLOP/s for an
H100/H200 SXM, dense; ``--peak-tflops`` for others). Tokens come from the Python standard
library's sources as bytes (in memory; grain is not needed here).
"""

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m2rnn_jax import ModelConfig
from m2rnn_jax.layers.mlp import SwiGLU
from m2rnn_jax.layers.registry import mixer_class
from m2rnn_jax.typed_config import load_yaml
from train import sharding
from train.config import DataConfig, MeshConfig, OptimizerConfig, TrainConfig
from train.data import PackedRows, read_bytes, stdlib_python_files
from train.step import build_trainee, put_batch
from timing import median_seconds  # benchmarks/ is on sys.path when run as a script

HYBRID_CONFIG = "configs/model/hybrid_400m.yaml"
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "B200": 2250.0, "A100": 312.0}


def flops_per_token(model_config: ModelConfig, abstract_params, seq_len: int) -> dict:
    """Model FLOPs per trained token by term (see the module docstring)."""
    flat = jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(abstract_params))[0]
    matmul_params = 0
    for path, leaf in flat:
        names = [str(getattr(k, "key", k)) for k in path]
        if leaf.ndim < 2 or names[-1] == "W":
            continue
        if names[-1] == "embedding" and not model_config.tie_embeddings:
            continue
        matmul_params += int(np.prod(leaf.shape))
    pattern = model_config.layer_pattern
    m, att = model_config.m2rnn, model_config.attention
    attention = 6 * pattern.count("A") * seq_len * att.num_heads * model_config.attention_head_dim
    recurrence = 6 * pattern.count("M") * m.num_heads * m.key_dim * m.value_dim * (
        m.value_dim + 1)
    return {"dense": 6 * matmul_params, "attention": attention, "recurrence": recurrence}


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


def train_config(model_config, batch, seq_len, steps, mesh=(1, 1, 1), remat=False):
    return TrainConfig(model=model_config, steps=steps, remat=remat,
                       optimizer=OptimizerConfig(warmup_steps=5),
                       data=DataConfig(seq_len=seq_len, batch_size=batch),
                       mesh=MeshConfig(*mesh))


def is_out_of_memory(err) -> bool:
    return "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower()


def run_steps_fitting(config, devices, batches):
    """``run_steps``, retried with per-block rematerialisation if the step runs out of memory
    (the attention-only model's S x S scores at seq 4096 may not fit without it)."""
    try:
        return run_steps(config, devices, batches)
    except Exception as err:  # noqa: BLE001 — only out-of-memory is retried
        if config.remat or not is_out_of_memory(err):
            raise
        print(f"  out of memory without remat ({str(err).splitlines()[0][:120]}); "
              f"retrying with remat=True", flush=True)
        return run_steps(dataclasses.replace(config, remat=True), devices, batches)


def run_steps(config, devices, batches):
    """Trains on ``batches`` (the first one compiles); returns losses and timings."""
    mesh = sharding.make_mesh(config.mesh, devices)
    trainee = build_trainee(config, mesh)
    t0 = time.perf_counter()
    state = jax.block_until_ready(trainee.init_state())
    print(f"  initialised {trainee.num_params / 1e6:.1f}M params on mesh "
          f"{dict(mesh.shape)} in {time.perf_counter() - t0:.1f} s (compile included)", flush=True)
    losses, times = [], []
    start = time.perf_counter()
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        state, metrics = trainee.train_step(state, put_batch(batch, trainee, accum_steps=1))
        losses.append(float(metrics["loss"]))  # blocks: each step timed on its own
        times.append(time.perf_counter() - t0)
        if i == 0:
            compile_s = time.perf_counter() - start
            print(f"  first step (compile) {compile_s:.1f} s, loss {losses[0]:.4f}", flush=True)
    step_s = statistics.median(times[2:]) if len(times) > 3 else times[-1]
    del state
    return {"trainee": trainee, "losses": losses, "step_s": step_s, "compile_s": compile_s,
            "remat": config.remat}


def layer_seconds(model_config, make_layer, batch, seq_len, segment_ids):
    """Forward + backward seconds of one layer on ``(batch, seq_len, d_model)`` bf16 input."""
    layer = make_layer(model_config)
    graphdef, params = nnx.split(layer, nnx.Param)
    keys = jax.random.split(jax.random.key(0), 2)
    x = jax.random.normal(keys[0], (batch, seq_len, model_config.d_model), jnp.bfloat16)
    probe = jax.random.normal(keys[1], x.shape, jnp.float32)

    def loss(p, inputs):
        module = nnx.merge(graphdef, p)
        out = module(inputs) if segment_ids is None else module(inputs, segment_ids=segment_ids)
        return jnp.sum(out.astype(jnp.float32) * probe)

    return median_seconds(jax.jit(jax.grad(loss, argnums=(0, 1))), params, x, repeats=5)


def one_gpu(args, hybrid):
    batch, seq_len = args.batch, args.seq_len
    steps = 5 if args.quick else 12
    batches = text_batches(seq_len, batch, steps)
    attention_only = dataclasses.replace(hybrid, layer_pattern="A" * hybrid.num_layers)
    peak = peak_flops(args.peak_tflops)
    device = jax.devices()[:1]
    rows = []
    results = {}
    for name, model_config in (("hybrid", hybrid), ("attention-only", attention_only)):
        config = train_config(model_config, batch, seq_len, steps, remat=args.remat)
        result = run_steps_fitting(config, device, batches)
        print(f"  {name}: {result['step_s'] * 1e3:.1f} ms/step", flush=True)
        flops = flops_per_token(model_config, result["trainee"].abstract_params, seq_len)
        tokens_per_s = batch * seq_len / result["step_s"]
        mfu = sum(flops.values()) * tokens_per_s / peak if peak else float("nan")
        results[name] = result
        rows.append((name, result["remat"], result["trainee"].num_params / 1e6,
                     result["step_s"] * 1e3, tokens_per_s, sum(flops.values()) / 1e9, mfu,
                     result["compile_s"], flops))
    print(f"\n== one GPU ({jax.devices()[0].device_kind}), batch {batch} x seq {seq_len}, "
          f"bf16, M²RNN backend=auto ==")
    print(f"{'model':16s} {'params':>8s} {'step ms':>9s} {'tokens/s':>10s} "
          f"{'GFLOP/tok':>10s} {'MFU':>6s} {'compile s':>9s} {'remat':>6s}")
    for name, remat, params, ms, tps, gflop, mfu, compile_s, _ in rows:
        print(f"{name:16s} {params:7.1f}M {ms:9.1f} {tps:10,.0f} {gflop:10.3f} "
              f"{mfu:6.1%} {compile_s:9.1f} {'yes' if remat else 'no':>6s}")
    flops = rows[0][-1]
    print("hybrid FLOPs/token by term (GFLOP): " + ", ".join(
        f"{k} {v / 1e9:.3f}" for k, v in flops.items()))

    segment_ids = jnp.asarray(batches[0]["segment_ids"][:, :-1])
    layer_batch = batch
    m_s = layer_seconds(hybrid, lambda c: mixer_class("M")(c, rngs=nnx.Rngs(0)), layer_batch,
                        seq_len, segment_ids)
    a_s = layer_seconds(hybrid, lambda c: mixer_class("A")(c, rngs=nnx.Rngs(0)), layer_batch,
                        seq_len, segment_ids)
    mlp_s = layer_seconds(hybrid, lambda c: SwiGLU(c, rngs=nnx.Rngs(0)), layer_batch, seq_len,
                          None)
    step_s = results["hybrid"]["step_s"]
    pattern = hybrid.layer_pattern
    parts = {"M²RNN mixers": pattern.count("M") * m_s,
             "attention mixers": pattern.count("A") * a_s,
             "SwiGLU MLPs": len(pattern) * mlp_s}
    parts["rest (embed, head, norms, optimizer, overlap)"] = step_s - sum(parts.values())
    print(f"\n== where the hybrid's step goes (one layer fwd+bwd x count; step "
          f"{step_s * 1e3:.1f} ms) ==")
    print(f"one M²RNN mixer {m_s * 1e3:.2f} ms, one attention mixer {a_s * 1e3:.2f} ms, "
          f"one SwiGLU {mlp_s * 1e3:.2f} ms")
    for name, seconds in parts.items():
        print(f"  {name:46s} {seconds * 1e3:9.1f} ms  {seconds / step_s:6.1%}")


def two_gpu(args, hybrid):
    if len(jax.devices()) < 2:
        raise SystemExit(f"--two-gpu needs 2 devices, found {len(jax.devices())}")
    batch, seq_len = args.batch, args.seq_len
    steps = 8 if args.quick else 20
    batches = text_batches(seq_len, batch, steps)
    layouts = (("1 GPU", (1, 1, 1), jax.devices()[:1]),
               ("2 GPUs data-parallel", (2, 1, 1), jax.devices()[:2]),
               ("2 GPUs FSDP", (1, 2, 1), jax.devices()[:2]))
    results = []
    for name, mesh, devices in layouts:
        config = train_config(hybrid, batch, seq_len, steps, mesh=mesh, remat=args.remat)
        result = run_steps_fitting(config, devices, batches)
        print(f"  {name}: {result['step_s'] * 1e3:.1f} ms/step", flush=True)
        results.append((name, result))
        del result["trainee"]
    reference = np.array(results[0][1]["losses"])
    print(f"\n== hybrid on 1 vs 2 GPUs, global batch {batch} x seq {seq_len}, bf16, "
          f"{steps} steps ==")
    print(f"{'layout':22s} {'step ms':>9s} {'tokens/s':>10s} {'loss 1st':>9s} "
          f"{'loss last':>9s} {'max |Δloss|':>12s} {'match':>6s}")
    all_match = True
    for name, result in results:
        losses = np.array(result["losses"])
        diff = float(np.max(np.abs(losses - reference)))
        # bf16 compute with a different reduction order: allow 1% of the loss.
        match = diff <= 0.01 * float(np.max(np.abs(reference)))
        all_match &= match
        tokens_per_s = batch * seq_len / result["step_s"]
        print(f"{name:22s} {result['step_s'] * 1e3:9.1f} {tokens_per_s:10,.0f} {losses[0]:9.4f}"
              f" {losses[-1]:9.4f} {diff:12.2e} {'yes' if match else 'NO':>6s}")
    print("2-GPU losses match 1 GPU" if all_match else "MISMATCH between 1 and 2 GPUs")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--two-gpu", action="store_true", help="DP and FSDP on 2 GPUs vs 1")
    parser.add_argument("--quick", action="store_true", help="fewer steps and a smaller batch")
    parser.add_argument("--model", default=HYBRID_CONFIG, help="hybrid ModelConfig YAML")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default 8; "
                        "--quick 4)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--remat", action="store_true", help="recompute block activations")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="peak bf16 TFLOP/s of one device for MFU (default by device kind)")
    args = parser.parse_args(argv)
    if args.batch is None:
        args.batch = 4 if args.quick else 8
    hybrid = load_yaml(ModelConfig, args.model)
    hybrid = dataclasses.replace(hybrid, compute_dtype="bfloat16", param_dtype="float32")
    print(f"jax {jax.__version__} on {jax.device_count()} x {jax.devices()[0].device_kind}; "
          f"hybrid model {args.model} (pattern {hybrid.layer_pattern})")
    start = time.perf_counter()
    (two_gpu if args.two_gpu else one_gpu)(args, hybrid)
    print(f"\nbenchmark wall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
