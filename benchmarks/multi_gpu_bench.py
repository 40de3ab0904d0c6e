"""Several GPUs of one node: scaling of the 400M hybrid, long contexts split over GPUs, and the
7B MoE hybrid on 8 GPUs.

From the repository root on a node of 2-8 GPUs, with the package installed, one command per
study. A command stops starting runs after ``--budget`` seconds (default 560, so that it ends
within ten minutes) and prints its table; run the same command again with the same ``--out``
(on the same machine, so that the compile cache and the saved state are reused) and it does only
what is missing, until the table ends without a "rerun" line:

    python benchmarks/multi_gpu_bench.py --study scaling --out runs/multi_gpu --profile
    python benchmarks/multi_gpu_bench.py --study context --out runs/multi_gpu
    python benchmarks/multi_gpu_bench.py --study moe7b --out runs/multi_gpu [--mesh expert=8]
    python benchmarks/multi_gpu_bench.py --study STUDY --tiny --out DIR     # any machine, toy sizes

Every run (one model on one mesh at one shape) is a process of its own under a deadline
(``--deadline``; a run that overruns is killed and reported, the others still run). Results go
to ``OUT/<study>.json`` as they come (``<study>-remat.json`` or ``-no-remat.json`` under the
other ``--remat``, so runs measured both ways are never mixed); a run stopped because the
budget ran short is retried by the next command, one that failed or overran its own deadline is
not (unless ``--retry-failed``). First, ``--compile-workers`` processes (one per 12 CPU cores,
at most 8) compile the known runs' train steps side by side into JAX's persistent cache
(``OUT/jax-cache``, ``--compile-cache``), starting new ones during the first 60 % of the
budget, so that each run then reads its step back instead of compiling it alone (their GPU
autotuning runs side by side too; ``--compile-workers 0`` compiles each run alone). The initial
state is written once to ``OUT/state-<model hash>/`` (about 5 GB for the 400M) and read by
every run. Runs use ``XLA_CLIENT_MEM_FRACTION=0.92`` unless it (or the older
``XLA_PYTHON_CLIENT_MEM_FRACTION``) is set, so that the longest context is bounded by the GPU
rather than by JAX's default pool of 75 %. The scaling study (20 runs on 8 GPUs) takes several
commands; ``--gpus``, ``--layouts`` and ``--modes`` choose fewer.

Studies (``key=value`` arguments override the model config, as in ``train_bench.py``):

``scaling``  the 400M hybrid (``configs/model/hybrid_400m.yaml``, bf16 compute, float32 weights)
    on 1, 2, 4 and 8 GPUs (``--gpus``, those present) under data-parallel (``dp``: mesh
    data=N), FSDP (``fsdp``: fsdp=N) and tensor-parallel (``tp``: tensor=t, data=N/t with t
    the largest divisor of N that divides the M²RNN and attention head counts, so tensor=2, 4
    and data=2 x tensor=4 on 8). Weak scaling: ``--rows-per-gpu`` (4) x 4096 rows per GPU, a
    global batch of 4N. Strong scaling: a global batch of ``--global-batch`` (8) rows whatever
    N. 8 steps (``--steps``) each, all from ONE initial state (initialised once on one device,
    saved, put on each mesh) on the same batches, so every strong-scaling layout's loss curve
    must equal the 1-GPU run's. ``--profile``: one more step of each run is traced and the
    share of the GPU kernel time spent in collectives is reported (kernels whose name holds
    nccl, all-reduce, all-gather, reduce-scatter, collective-permute or all-to-all, against
    all kernels of the device's stream timelines; a NCCL kernel's time includes its wait for
    the other GPUs, and overlap with compute is not subtracted).
``context``  the 400M hybrid with the sequence split over ``context`` = 4 and 8 GPUs
    (``--contexts``). First the check: ``--check-len`` (16K) x 1 row for 4 steps on one GPU,
    unsplit, and the same run split over 4 and 8 GPUs (same initial state and batches): the
    losses must agree. Then 1 row (``--rows``) at each of ``--lengths`` (64K, 256K), doubling
    from the last until a run fails (compile error, out of memory, its deadline) or
    ``--max-len`` (4M). The recurrence's pipeline cuts each shard's rows into micro-batches
    (``mesh.context_microbatches``, ``--microbatches`` 4); a single row cannot be cut, so the
    1-row runs have M = 1 and the shards run the recurrence one after another, idle
    (C - 1) / C of the ticks. The ``pipe`` runs show what micro-batching buys at the same tokens
    per step: ``--microbatches`` rows of length L / M for each L of ``--pipe-lengths``
    (64K, 256K), so M = 4 and idle (C - 1) / (M + C - 1). The idle fraction printed is
    ``m2rnn_jax.parallel.recurrence.pipeline_idle_fraction`` of the run's M and C. Attention
    across shards all-gathers keys and values and masks an (s, S) block per shard, which may
    bound the length before the recurrence does; ``layer_pattern=MMMMMMMMMMMMMMMMMMMMMMMM``
    shows the recurrence's own limit. Per-block remat is on (``--no-remat`` drops it): one H100
    trains 128K tokens with it and not 64K without (benchmarks/RESULTS.md).
``moe7b``  the 7B MoE hybrid (``configs/model/hybrid_7b_moe.yaml``) on 8 GPUs with ``--mesh``
    (default expert=8, as ``configs/train_hybrid_7b_moe.yaml``), per-block remat (``--no-remat``
    to drop it), ``--rows-per-gpu`` 2 x 4096, 50 steps (``--steps``) on the embedded corpus
    (the Python standard library's sources as bytes), initialised directly on the mesh. Then the
    router's balance: ``moe_aux_loss``, ``expert_load_max`` and ``expert_load_min`` (max / min
    over experts of load / mean load, averaged over layers; 1 = balanced) every 10 steps, and
    the final state's per-expert loads on a fresh batch (one forward). The plan's estimate
    (``PLAN_7B``) is printed next to the measurement.

``--tiny``: tiny configs (``configs/model/tiny_hybrid.yaml``; ``configs/tiny_moe.yaml``'s
model), short rows, 1-2 steps, float32, on whatever devices exist (8 simulated CPU devices in
the tests); it checks the script, not speed.

Columns. ``rows``: global batch rows; ``step ms`` / ``step s``: median step time of steps
3.. (the last step when fewer than 4); ``tok/s``: tokens per second of the whole mesh;
``tok/s/GPU``: that over the GPUs; ``eff``: tok/s/GPU over the 1-GPU run's of the same mode
(weak: the per-GPU efficiency; strong: speed-up / N); ``XLA GiB``: the compiled train step's
memory per device by XLA's analysis (arguments + outputs - aliases + temporaries); ``peak
GiB``: the largest ``peak_bytes_in_use`` of the run's devices (its own process, so only this
run); ``max|Δloss|``: the largest per-step difference from the reference run's losses (same
initial state, same batches), ``ok`` when within 1 % of the reference loss (bf16; 1e-4 in
float32); ``comm %``: collectives' share of the kernel time (``--profile``); ``C``: context
shards; ``length``: tokens per row; ``M``: pipeline micro-batches; ``idle``: the pipeline's
idle fraction; ``MFU``: model FLOPs per token (``train_bench.py``'s formula: a routed expert's
weights count top_k / num_experts, plus attention and recurrence) x tok/s / (GPUs x peak bf16
FLOP/s, 989 TFLOP/s for an H200, ``--peak-tflops``).
"""

import argparse
import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from m2rnn_jax import ModelConfig
from m2rnn_jax.parallel.recurrence import microbatch_count, pipeline_idle_fraction
from m2rnn_jax.typed_config import load_yaml, override, read_yaml
from train import compile_cache, sharding
from train.config import load_train_config
from train.step import MOE_METRICS, build_trainee, loss_terms

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import trace_summary  # noqa: E402  (benchmarks/trace_summary.py)
import train_bench  # noqa: E402  (benchmarks/train_bench.py)

# JAX's share of a GPU's memory for a process: the name jaxlib 0.11 reads, then the one it
# deprecates (jaxlib refuses both set at once; an empty value counts as unset).
MEMORY_FRACTION_VARIABLES = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")

STUDIES = ("scaling", "context", "moe7b")
MODELS = {"scaling": "configs/model/hybrid_400m.yaml", "context": "configs/model/hybrid_400m.yaml",
          "moe7b": "configs/model/hybrid_7b_moe.yaml"}
TINY_MODELS = {"scaling": "configs/model/tiny_hybrid.yaml",
               "context": "configs/model/tiny_hybrid.yaml", "moe7b": "configs/tiny_moe.yaml"}
SCALING_LAYOUTS = ("dp", "fsdp", "tp")
# Studies whose runs recompute each block in the backward pass unless --no-remat.
REMAT_STUDIES = ("context", "moe7b")
# Seconds one run may take on an H200 node (compilation included), and with --tiny on a CPU.
DEADLINES = {"init": 300, "scaling": 300, "context": 420, "moe7b": 550}
TINY_DEADLINE = 240
BUDGET_S, TINY_BUDGET_S = 560, 1200
# A run is started only with this many seconds of the budget left (plus the table's reserve).
MIN_START_S, TINY_MIN_START_S, TABLE_RESERVE_S = 90, 15, 10
# Share of the budget in which side-by-side compilations may start.
COMPILE_WINDOW = 0.6
# benchmarks/RESULTS.md, "The 7B MoE hybrid: the plan": one node of 8 H200s, mesh expert=8,
# 2 rows x 4096 per GPU, remat per block; estimated from per-layer costs measured at 400M.
PLAN_7B = {"step_s": (0.7, 0.8), "tokens_per_s": 85_000, "mfu": 0.07}
# Kernel names of collectives (compared lower-case, '_' read as '-').
COLLECTIVES = ("nccl", "all-reduce", "all-gather", "reduce-scatter", "collective-permute",
               "all-to-all")
GiB = 2 ** 30
KILLED = "killed at its deadline"
CUT = "cut short by the time budget"  # retried by the next command


@dataclasses.dataclass(frozen=True)
class Run:
    """One process: a model on one mesh at one shape (or ``kind == "init"``: the state)."""

    key: str
    group: str  # table section: weak / strong / check / sweep / pipe / moe7b / init
    gpus: int = 1
    mesh: tuple = (("data", 1),)  # MeshConfig keywords, as pairs (hashable)
    rows: int = 1  # global batch
    seq_len: int = 0
    steps: int = 0
    reference: str | None = None  # key of the run whose losses these must equal
    kind: str = "train"  # train | init
    init_on_mesh: bool = False  # moe7b: no saved state, initialised on the mesh
    expert_load: bool = False  # moe7b: per-expert loads of the final state

    @property
    def mesh_dict(self):
        return dict(self.mesh)

    @property
    def tokens(self):
        return self.rows * self.seq_len


def mesh_label(mesh: dict) -> str:
    shown = {k: v for k, v in mesh.items() if k != "context_microbatches" and v != 1}
    return " ".join(f"{k}={v}" for k, v in shown.items()) or "data=1"


def length_label(tokens: int) -> str:
    return f"{tokens // 1024}K" if tokens % 1024 == 0 and tokens >= 1024 else str(tokens)


# ----------------------------------------------------------------------------- the models

def load_model(study, tiny, path=None, overrides=()):
    """The study's ``ModelConfig`` (a model file, or a train config's model section) with
    ``overrides``; bf16 compute and float32 weights unless ``tiny`` (float32 throughout)."""
    path = str(path or REPO / (TINY_MODELS if tiny else MODELS)[study])
    data = read_yaml(path)
    model = (load_train_config(path).model if isinstance(data, dict) and "model" in data
             else load_yaml(ModelConfig, path))
    model = override(model, list(overrides))
    if not tiny:
        model = dataclasses.replace(model, compute_dtype="bfloat16", param_dtype="float32")
    return model


def model_fingerprint(model) -> str:
    return hashlib.sha256(repr(model).encode()).hexdigest()[:12]


def tensor_ways(gpus, model) -> int:
    """The largest divisor of ``gpus`` that splits the M²RNN and the attention heads."""
    heads = (model.m2rnn.num_heads, model.attention.num_heads)
    return max(t for t in range(1, gpus + 1)
               if gpus % t == 0 and all(h % t == 0 for h in heads))


def scaling_mesh(layout, gpus, model):
    if gpus == 1:
        return {"data": 1}
    if layout == "dp":
        return {"data": gpus}
    if layout == "fsdp":
        return {"data": 1, "fsdp": gpus}
    ways = tensor_ways(gpus, model)
    return None if ways == 1 else {"data": gpus // ways, "tensor": ways}


def parse_mesh(text):
    """``"expert=8"`` or ``"data=2,expert=4"`` -> MeshConfig keywords (data defaults to 1)."""
    mesh = {"data": 1}
    for item in text.replace(",", " ").split():
        name, _, value = item.partition("=")
        if name not in ("data", "fsdp", "expert", "context", "tensor") or not value.strip("-")\
                .isdigit():
            raise SystemExit(f"--mesh: expected axis=size with an axis of data, fsdp, expert, "
                             f"context, tensor; got {item!r}")
        mesh[name] = int(value)
    return mesh


# ----------------------------------------------------------------------------- the plans

def int_list(text):
    return [int(x) for x in str(text).replace(",", " ").split()]


def scaling_runs(args, model, present):
    runs = [Run("init", "init", kind="init")]
    for gpus in [n for n in args.gpus if n <= present]:
        layouts = ["single"] if gpus == 1 else args.layouts
        for layout in layouts:
            mesh = scaling_mesh(layout, gpus, model)
            if mesh is None:
                continue
            for mode in args.modes:
                rows = args.rows_per_gpu * gpus if mode == "weak" else args.global_batch
                reference = "strong-single-1" if mode == "strong" and gpus > 1 else None
                runs.append(Run(f"{mode}-{layout}-{gpus}", mode, gpus, tuple(mesh.items()),
                                rows, args.seq_len, args.steps, reference))
    return runs


def context_lengths(args, shards, results):
    """The sweep's lengths for ``shards``: ``--lengths``, then doubling from the last while
    the previous length trained and ``--max-len`` allows."""
    lengths = list(args.lengths)
    while True:
        last = results.get(f"sweep-c{shards}-{lengths[-1]}", {})
        if last.get("status") != "ok" or lengths[-1] * 2 > args.max_len:
            return lengths
        lengths.append(lengths[-1] * 2)


def context_runs(args, model, present, results):
    runs = [Run("init", "init", kind="init")]
    shard_counts = [c for c in args.contexts if c <= present]
    if shard_counts:
        runs.append(Run("check-1", "check", 1, (("data", 1),), args.rows, args.check_len,
                        args.check_steps))
    for shards in shard_counts:
        mesh = (("data", 1), ("context", shards), ("context_microbatches", args.microbatches))
        runs.append(Run(f"check-c{shards}", "check", shards, mesh, args.rows, args.check_len,
                        args.check_steps, "check-1"))
    # The given lengths on every shard count first, then the pipe runs, then the doublings.
    meshes = {shards: (("data", 1), ("context", shards),
                       ("context_microbatches", args.microbatches)) for shards in shard_counts}
    for shards in shard_counts:
        for length in args.lengths:
            runs.append(Run(f"sweep-c{shards}-{length}", "sweep", shards, meshes[shards],
                            args.rows, length, args.steps))
    for shards in shard_counts:
        for length in args.pipe_lengths:
            rows = args.microbatches
            if rows > 1 and length % rows == 0:
                runs.append(Run(f"pipe-c{shards}-{length}", "pipe", shards, meshes[shards],
                                rows, length // rows, args.steps))
    for shards in shard_counts:
        for length in context_lengths(args, shards, results)[len(args.lengths):]:
            runs.append(Run(f"sweep-c{shards}-{length}", "sweep", shards, meshes[shards],
                            args.rows, length, args.steps))
    return runs


def moe_runs(args, model, present):
    mesh = parse_mesh(args.mesh)
    fixed = int(np.prod([v for v in mesh.values() if v != -1]))
    gpus = present if -1 in mesh.values() else fixed
    key = "moe7b-" + "-".join(f"{k}{v}" for k, v in mesh.items() if v != 1)
    return [Run(key, "moe7b", gpus, tuple(mesh.items()), args.rows_per_gpu * gpus,
                args.seq_len, args.steps, init_on_mesh=True, expert_load=True)]


def plan(args, model, present, results):
    if args.study == "scaling":
        return scaling_runs(args, model, present)
    if args.study == "context":
        return context_runs(args, model, present, results)
    return moe_runs(args, model, present)


# ----------------------------------------------------------------------------- the saved state

def save_state(state, folder, fingerprint):
    """The state's leaves as .npy files, then ``meta.json`` (written last: the state is
    complete when it exists)."""
    folder.mkdir(parents=True, exist_ok=True)
    leaves = jax.tree.leaves(jax.device_get(state))
    dtypes = []
    for index, leaf in enumerate(leaves):
        array = np.asarray(leaf)
        dtypes.append(str(array.dtype))
        if array.dtype.kind == "V":  # bfloat16 & co.: stored as raw unsigned integers
            array = array.view(f"u{array.dtype.itemsize}")
        np.save(folder / f"{index:05d}.npy", array)
    (folder / "meta.json").write_text(json.dumps({
        "fingerprint": fingerprint, "dtypes": dtypes,
        "shapes": [list(np.shape(leaf)) for leaf in leaves]}))


def load_state(folder, trainee, fingerprint):
    """The saved state in the structure of ``trainee``'s (host arrays, memory-mapped)."""
    meta = json.loads((folder / "meta.json").read_text())
    if meta["fingerprint"] != fingerprint:
        raise ValueError(f"the state in {folder} is of another model")
    abstract, treedef = jax.tree.flatten(jax.eval_shape(trainee.init_state))
    if [list(a.shape) for a in abstract] != meta["shapes"]:
        raise ValueError(f"the state in {folder} does not match the model's state")
    leaves = []
    for index, dtype in enumerate(meta["dtypes"]):
        array = np.load(folder / f"{index:05d}.npy", mmap_mode="r")
        leaves.append(array if str(array.dtype) == dtype else array.view(jnp.dtype(dtype)))
    return jax.tree.unflatten(treedef, leaves)


def corpus_batches(seq_len, rows, count):
    """``count`` batches of the embedded corpus; when it holds fewer (long rows: it is ~30 MB),
    the distinct ones repeat."""
    for distinct in range(count, 0, -1):
        try:
            batches = train_bench.text_batches(seq_len, rows, distinct)
        except IndexError:
            continue
        return [batches[i % distinct] for i in range(count)]
    raise ValueError(f"the corpus holds less than one batch of {rows} x {seq_len} tokens")


# ----------------------------------------------------------------------------- the worker

def is_collective(name) -> bool:
    lowered = name.lower().replace("_", "-")
    return any(word in lowered for word in COLLECTIVES)


def communication_share(events, steps, process_filter="GPU"):
    """Collectives' share of the kernel time in a trace (``trace_summary`` totals): over the
    stream timelines of the matching processes (every timeline where none is a stream)."""
    rows = trace_summary.summarize(events, process_filter, top=None)
    kernels = [row for row in rows if "stream" in row[1].lower()] or rows
    devices = max(1, len({row[0] for row in kernels}))
    per_name = collections.Counter()
    busy = 0.0
    for _, _, row_busy, _, ranked in kernels:
        busy += row_busy
        for name, total, _ in ranked:
            if is_collective(name):
                per_name[name] += total
    collective = sum(per_name.values())
    per_step = 1e3 * steps * devices  # µs -> ms per step and device
    return {"share": collective / busy if busy else None,
            "collective_ms_per_step": collective / per_step,
            "kernel_ms_per_step": busy / per_step, "devices": devices,
            "timelines": len(kernels),
            "top_collectives_ms_per_step": {name: total / per_step
                                            for name, total in per_name.most_common(5)}}


def device_peaks_gib(devices):
    peaks = []
    for device in devices:
        try:
            stats = device.memory_stats() or {}
        except Exception:  # noqa: BLE001 — not every backend reports it
            stats = {}
        peak = stats.get("peak_bytes_in_use")
        peaks.append(None if peak is None else peak / GiB)
    return peaks


def expert_load_spread(load):
    """Per-expert loads (layers x experts, rows summing to 1) -> their spread."""
    ratio = load / load.mean(axis=-1, keepdims=True)
    return {"max_over_mean": float(ratio.max(axis=-1).mean()),
            "min_over_mean": float(ratio.min(axis=-1).mean()),
            "worst_max_over_mean": float(ratio.max()), "worst_min_over_mean": float(ratio.min()),
            "cv": float((load.std(axis=-1) / load.mean(axis=-1)).mean()),
            "idle_experts": int((load == 0).sum()),
            "per_layer_max_over_mean": [round(float(x), 4) for x in ratio.max(axis=-1)],
            "per_layer_min_over_mean": [round(float(x), 4) for x in ratio.min(axis=-1)]}


def exit_with_parent():
    """Ends this process when its parent does (a run is in a process group of its own, so that
    its deadline kills the whole group; a killed command must not leave it holding the GPUs)."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(2)
        os._exit(3)

    threading.Thread(target=watch, daemon=True).start()


def worker(spec):
    """One run in this process (see ``Run``); writes its entry to the results file. (The
    parent process never touches a device: the GPUs' memory is the runs'.)"""
    run, common = Run(**{**spec["run"], "mesh": tuple(map(tuple, spec["run"]["mesh"]))}), \
        spec["common"]
    compile_cache.enable(common["compile_cache"])
    if not common["no_threefry_kernel"]:
        jax.config.update("jax_threefry_gpu_kernel_lowering", True)
    model = load_model(common["study"], common["tiny"], common["model"], common["overrides"])
    state_dir = pathlib.Path(common["state_dir"])
    report = train_bench.Report(common["results"])
    if len(jax.devices()) < run.gpus:
        raise ValueError(f"{run.key} needs {run.gpus} devices, found {len(jax.devices())}")
    devices = jax.devices()[:run.gpus]
    config = train_bench.train_config(model, run.rows, run.seq_len or 64, run.steps or 1,
                                      mesh=run.mesh_dict, remat=common["remat"])

    if run.kind == "init":
        state, times = train_bench.init_state(config, devices[0])
        save_state(state, state_dir, model_fingerprint(model))
        report.put("meta", "init", times)
        return

    mesh = sharding.make_mesh(config.mesh, devices)
    trainee = build_trainee(config, mesh)
    if spec.get("compile_only"):
        batch = {key: jax.ShapeDtypeStruct((1, run.rows, run.seq_len + 1), np.int32,
                                           sharding=sharding.batch_sharding(mesh, 3, leading=1))
                 for key in ("tokens", "segment_ids")}
        start = time.perf_counter()
        trainee.train_step.lower(trainee.abstract_state(), batch).compile()
        print(f"{run.key}: train step compiled in {time.perf_counter() - start:.1f} s",
              flush=True)
        return

    entry = {"group": run.group, "gpus": run.gpus, "mesh": run.mesh_dict, "rows": run.rows,
             "seq_len": run.seq_len, "steps": run.steps, "reference": run.reference,
             "remat": config.remat, "device_kind": devices[0].device_kind}
    axes = sharding.model_axes(mesh, context_microbatches=config.mesh.context_microbatches)
    shards = axes.size(axes.context)
    if shards > 1:
        count = microbatch_count(max(1, run.rows // axes.batch_size),
                                 config.mesh.context_microbatches)
        entry.update(context_shards=shards, microbatches=count,
                     idle_fraction=pipeline_idle_fraction(count, shards))
    report.put("runs", run.key, entry)
    print(f"\n-- {run.key}: {run.gpus} device(s), mesh {mesh_label(run.mesh_dict)}, "
          f"{run.rows} x {run.seq_len}, {run.steps} steps", flush=True)

    if run.init_on_mesh:
        state, entry["init"] = train_bench.init_state(config, devices)
    else:
        state = load_state(state_dir, trainee, model_fingerprint(model))
    batches = corpus_batches(run.seq_len, run.rows, run.steps + (1 if run.expert_load else 0))
    spare = batches.pop() if run.expert_load else None
    profile_dir = os.path.join(common["profile"], run.key) if common["profile"] else None
    is_moe = model.moe.enabled

    def after(trainee, state, placed, result):
        if not run.expert_load:
            return {}
        report.put("runs", run.key, {**entry, **result})  # the trajectory, before the forward
        bs = sharding.batch_sharding(trainee.mesh, 2)
        loads = jax.jit(lambda p, t, s: loss_terms(trainee.graphdef, p, t, s)[2]["expert_load"],
                        in_shardings=(trainee.state_shardings["params"], bs, bs),
                        out_shardings=sharding.replicated(trainee.mesh))
        load = np.asarray(loads(state["params"], *(jax.device_put(spare[k], bs)
                                                   for k in ("tokens", "segment_ids"))))
        return {"expert_load": np.round(load, 6).tolist(),
                "expert_load_spread": expert_load_spread(load)}

    result = train_bench.run_steps(config, devices, batches, state,
                                   profile=(profile_dir, 1) if profile_dir else None,
                                   metric_names=MOE_METRICS if is_moe else (), after=after)
    entry.update(result)
    entry["tokens_per_s"] = run.tokens / result["step_s"]
    entry["tokens_per_s_per_gpu"] = entry["tokens_per_s"] / run.gpus
    peaks = device_peaks_gib(devices)
    entry["device_peak_gib"] = peaks
    entry["peak_gib"] = None if None in peaks else max(peaks)
    peak = train_bench.peak_flops(common["peak_tflops"])
    entry["mfu"] = (sum(result["flops"].values()) * entry["tokens_per_s_per_gpu"] / peak
                    if peak else None)
    if profile_dir:
        events = trace_summary.read_events(trace_summary.find_trace(profile_dir))
        entry["communication"] = communication_share(
            events, 1, "GPU" if devices[0].platform == "gpu" else "")
    report.put("runs", run.key, entry)


# ----------------------------------------------------------------------------- the runner

class Runner:
    """Starts each run's process under its deadline and the command's budget."""

    def __init__(self, args, model, report, out):
        self.args, self.model, self.report, self.out = args, model, report, out
        self.start = time.monotonic()
        self.min_start = TINY_MIN_START_S if args.tiny else MIN_START_S
        self.state_dir = out / f"state-{model_fingerprint(model)}"
        self.logs = out / "logs"

    def left(self):
        return self.args.budget - (time.monotonic() - self.start) - TABLE_RESERVE_S

    def deadline(self, run):
        if self.args.deadline:
            return self.args.deadline
        if self.args.tiny:
            return TINY_DEADLINE
        return DEADLINES["init" if run.kind == "init" else self.args.study]

    def common(self):
        args = self.args
        return {"study": args.study, "tiny": args.tiny,
                "model": args.model, "overrides": args.overrides, "remat": args.remat,
                "state_dir": str(self.state_dir), "results": self.report.path,
                "profile": str(self.out / "profile") if args.profile else None,
                "compile_cache": args.compile_cache or str(self.out / "jax-cache"),
                "no_threefry_kernel": args.no_threefry_kernel,
                "peak_tflops": args.peak_tflops}

    def command(self, run, compile_only=False):
        spec = {"run": dataclasses.asdict(run), "common": self.common(),
                "compile_only": compile_only}
        return [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker",
                json.dumps(spec)]

    @staticmethod
    def environment(side_by_side):
        env = dict(os.environ)
        if side_by_side:  # several processes share the GPUs: none may take a pool up front
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        elif not any(env.get(name) for name in MEMORY_FRACTION_VARIABLES):  # a user's stands
            env[MEMORY_FRACTION_VARIABLES[0]] = "0.92"
        return env

    def done(self, run):
        if run.kind == "init":
            return (self.state_dir / "meta.json").exists()
        status = self.report.data.get("runs", {}).get(run.key, {}).get("status")
        if status is None or status.startswith(CUT):
            return False
        return status == "ok" or not self.args.retry_failed

    def run_one(self, run):
        """Runs ``run``'s process to its end or deadline; records and returns its status."""
        full = self.deadline(run)
        deadline = min(full, self.left())
        print(f"\n### {run.key} (deadline {deadline:.0f} s)", flush=True)
        began = time.monotonic()
        process = subprocess.Popen(self.command(run), env=self.environment(False),
                                   start_new_session=True)
        try:
            code = process.wait(timeout=deadline)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            status = f"{KILLED} of {full:.0f} s" if deadline >= full else \
                f"{CUT} at {deadline:.0f} s"
        seconds = time.monotonic() - began
        print(f"### {run.key}: {status} after {seconds:.0f} s", flush=True)
        if run.kind == "init":
            if status != "ok":
                self.report.data = train_bench.Report(self.report.path).data
                self.report.put("meta", "init_status", status)
            return status
        self.report.data = train_bench.Report(self.report.path).data  # the worker wrote it
        entry = self.report.data.get("runs", {}).get(run.key, {"group": run.group})
        if status == "ok" and "step_s" not in entry:
            status = "failed (no results)"
        entry.update(status=status, wall_s=seconds)
        self.report.put("runs", run.key, entry)
        return status

    def compile_side_by_side(self, runs):
        """Compiles ``runs``' train steps into the persistent cache (and makes the initial
        state), ``--compile-workers`` processes at a time, each under its deadline."""
        self.logs.mkdir(parents=True, exist_ok=True)
        queue = [(run, run.kind != "init") for run in runs]
        running = []
        print(f"\n### compiling {len(queue)} run(s) side by side, {self.args.compile_workers} "
              f"at a time (logs in {self.logs})", flush=True)
        while queue or running:
            # New compilations start only in the first part of the budget, so that the runs
            # they serve are measured in this command.
            while queue and len(running) < self.args.compile_workers and \
                    self.left() > self.min_start and \
                    time.monotonic() - self.start < COMPILE_WINDOW * self.args.budget:
                run, compile_only = queue.pop(0)
                log = open(self.logs / f"{run.key}{'-compile' if compile_only else ''}.log",
                           "w")
                process = subprocess.Popen(self.command(run, compile_only),
                                           env=self.environment(True), stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)
                running.append((run, process, log, time.monotonic(),
                                min(self.deadline(run), self.left())))
            if not running:
                break
            time.sleep(0.2)
            for item in list(running):
                run, process, log, began, deadline = item
                code = process.poll()
                if code is None and time.monotonic() - began > deadline:
                    os.killpg(process.pid, signal.SIGKILL)
                    code = process.wait()
                    print(f"### {run.key}: compile killed at {deadline:.0f} s", flush=True)
                if code is not None:
                    log.close()
                    running.remove(item)
                    print(f"### {run.key}: {'state written' if run.kind == 'init' else 'compiled'}"
                          f" (exit {code}) after {time.monotonic() - began:.0f} s", flush=True)

    def run_all(self, results_of):
        """Runs every pending run of the plan (re-planned after each: the context sweep grows
        while lengths train); returns the keys left pending."""
        present = self.args.present
        pending = [r for r in plan(self.args, self.model, present, results_of())
                   if not self.done(r)]
        trained = [r for r in pending if r.kind != "init"]
        if self.args.compile_workers > 0 and len(trained) > 1:
            self.compile_side_by_side(pending)
        tried = set()
        while True:
            pending = [r for r in plan(self.args, self.model, present, results_of())
                       if not self.done(r) and r.key not in tried]
            if not pending:
                return []
            run = pending[0]
            if self.left() < self.min_start:
                return [r.key for r in pending]
            tried.add(run.key)
            if self.run_one(run) != "ok" and run.kind == "init":
                print("the initial state could not be made; nothing else can run", flush=True)
                return [r.key for r in pending]


def probe_devices():
    """``(count, kind, platform)`` of this machine's devices, from a process of its own (this
    one must not take GPU memory that the runs need)."""
    code = ("import jax, json; d = jax.devices(); print(json.dumps([len(d), d[0].device_kind, "
            "d[0].platform]))")
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    found = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=300)
    if found.returncode:
        raise SystemExit(f"no devices: {found.stderr.strip().splitlines()[-1:]}")
    return tuple(json.loads(found.stdout.strip().splitlines()[-1]))


# ----------------------------------------------------------------------------- the tables

def fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def loss_match(entry, reference, tolerance):
    """``(max |Δloss|, within tolerance)`` against the reference run, or ``(None, None)``."""
    if not reference or "losses" not in entry or "losses" not in reference or \
            len(entry["losses"]) != len(reference["losses"]):
        return None, None
    ref = np.array(reference["losses"])
    diff = float(np.max(np.abs(np.array(entry["losses"]) - ref)))
    return diff, bool(diff <= tolerance * float(np.max(np.abs(ref))))


def annotate_losses(report, tolerance):
    """Writes each run's max |Δloss| against its reference into the results."""
    runs = report.data.get("runs", {})
    for key, entry in runs.items():
        diff, match = loss_match(entry, runs.get(entry.get("reference")), tolerance)
        if diff is not None:
            entry.update(max_abs_dloss=diff, loss_match=match, loss_tolerance=tolerance)
    report.save()


def status_of(entry):
    status = entry.get("status", "not run")
    return status if status == "ok" else status + (f": {entry['error']}" if entry.get("error")
                                                   else "")


def print_scaling(report, args):
    runs = report.data.get("runs", {})
    meta = report.data.get("meta", {})
    print(f"\n== scaling: {meta.get('model')} on {meta.get('devices')}; weak {args.rows_per_gpu} "
          f"rows/GPU, strong {args.global_batch} rows; seq {args.seq_len}; {args.steps} steps "
          f"from one initial state ==")
    print(f"{'mode':6s} {'layout':6s} {'GPUs':>4s} {'mesh':16s} {'rows':>4s} {'step ms':>8s} "
          f"{'tok/s':>9s} {'tok/s/GPU':>9s} {'eff':>5s} {'XLA GiB':>7s} {'peak GiB':>8s} "
          f"{'max|Δloss|':>10s} {'comm %':>6s}  status")
    for mode in args.modes:
        base = runs.get(f"{mode}-single-1", {}).get("tokens_per_s_per_gpu")
        for key, entry in runs.items():
            if entry.get("group") != mode:
                continue
            _, layout, gpus = key.split("-")
            per_gpu = entry.get("tokens_per_s_per_gpu")
            eff = per_gpu / base if per_gpu and base else None
            share = (entry.get("communication") or {}).get("share")
            diff, match = entry.get("max_abs_dloss"), entry.get("loss_match")
            loss = "-" if diff is None else f"{diff:.1e} {'ok' if match else 'NO'}"
            step_ms = None if "step_s" not in entry else entry["step_s"] * 1e3
            print(f"{mode:6s} {layout:6s} {gpus:>4s} {mesh_label(entry.get('mesh', {})):16s} "
                  f"{entry.get('rows', 0):4d} {fmt(step_ms, '8.1f'):>8s} "
                  f"{fmt(entry.get('tokens_per_s'), '9,.0f'):>9s} {fmt(per_gpu, '9,.0f'):>9s} "
                  f"{fmt(eff, '5.2f'):>5s} {fmt(entry.get('step_gib'), '7.1f'):>7s} "
                  f"{fmt(entry.get('peak_gib'), '8.1f'):>8s} {loss:>10s} "
                  f"{fmt(None if share is None else 100 * share, '6.1f'):>6s}  "
                  f"{status_of(entry)}")
    checked = [e for e in runs.values() if e.get("loss_match") is not None]
    if checked:
        bad = [e for e in checked if not e["loss_match"]]
        print(f"loss curves: {len(checked) - len(bad)} of {len(checked)} strong-scaling layouts "
              f"equal 1 GPU's")


def print_context(report, args):
    runs = report.data.get("runs", {})
    meta = report.data.get("meta", {})
    print(f"\n== context: {meta.get('model')} on {meta.get('devices')}; sequence split over C "
          f"GPUs; {args.microbatches} micro-batches requested; remat {args.remat} ==")
    print(f"{'run':22s} {'C':>2s} {'length':>7s} {'rows':>4s} {'M':>2s} {'idle':>5s} "
          f"{'step s':>7s} {'tok/s':>9s} {'tok/s/GPU':>9s} {'XLA GiB':>7s} {'peak GiB':>8s} "
          f"{'max|Δloss|':>10s}  status")
    for key, entry in runs.items():
        diff, match = entry.get("max_abs_dloss"), entry.get("loss_match")
        loss = "-" if diff is None else f"{diff:.1e} {'ok' if match else 'NO'}"
        print(f"{key:22s} {entry.get('context_shards', 1):2d} "
              f"{length_label(entry.get('seq_len', 0)):>7s} {entry.get('rows', 0):4d} "
              f"{fmt(entry.get('microbatches'), '2d'):>2s} "
              f"{fmt(entry.get('idle_fraction'), '5.2f'):>5s} "
              f"{fmt(entry.get('step_s'), '7.2f'):>7s} "
              f"{fmt(entry.get('tokens_per_s'), '9,.0f'):>9s} "
              f"{fmt(entry.get('tokens_per_s_per_gpu'), '9,.0f'):>9s} "
              f"{fmt(entry.get('step_gib'), '7.1f'):>7s} {fmt(entry.get('peak_gib'), '8.1f'):>8s}"
              f" {loss:>10s}  {status_of(entry)}")
    for shards in args.contexts:
        trained = [e["seq_len"] for k, e in runs.items()
                   if k.startswith(f"sweep-c{shards}-") and e.get("status") == "ok"]
        if trained:
            print(f"longest context trained on {shards} GPUs: {length_label(max(trained))} "
                  f"tokens x {args.rows} row(s)")


def print_moe(report, args):
    runs = report.data.get("runs", {})
    meta = report.data.get("meta", {})
    print(f"\n== moe7b: {meta.get('model')} on {meta.get('devices')}; remat {args.remat} ==")
    print(f"{'run':20s} {'GPUs':>4s} {'rows':>4s} {'step s':>7s} {'tok/s':>9s} {'MFU':>6s} "
          f"{'XLA GiB':>7s} {'peak GiB':>8s} {'comm %':>6s}  status")
    low, high = PLAN_7B["step_s"]
    for key, entry in runs.items():
        share = (entry.get("communication") or {}).get("share")
        print(f"{key:20s} {entry.get('gpus', 0):4d} {entry.get('rows', 0):4d} "
              f"{fmt(entry.get('step_s'), '7.3f'):>7s} "
              f"{fmt(entry.get('tokens_per_s'), '9,.0f'):>9s} {fmt(entry.get('mfu'), '6.1%'):>6s} {fmt(entry.get('step_gib'), '7.1f'):>7s} "
              f"{fmt(entry.get('peak_gib'), '8.1f'):>8s} "
              f"{fmt(None if share is None else 100 * share, '6.1f'):>6s}  {status_of(entry)}")
        print(f"{'plan (RESULTS.md)':20s} {8:4d} {16:4d} {f'{low}-{high}':>7s} "
              f"{PLAN_7B['tokens_per_s']:9,d} {PLAN_7B['mfu']:6.1%}")
        metrics = entry.get("metrics", {})
        if metrics.get("expert_load_max"):
            count = len(metrics["expert_load_max"])
            shown = sorted({0, *range(9, count, 10), count - 1})
            print("router (load / mean load over experts, averaged over layers; 1 = balanced; "
                  "aux loss summed over layers):")
            print(f"  {'step':>5s} {'aux loss':>9s} {'load max':>9s} {'load min':>9s} "
                  f"{'loss':>8s}")
            for i in shown:
                print(f"  {i + 1:5d} {metrics['moe_aux_loss'][i]:9.4f} "
                      f"{metrics['expert_load_max'][i]:9.3f} {metrics['expert_load_min'][i]:9.3f}"
                      f" {entry['losses'][i]:8.4f}")
        spread = entry.get("expert_load_spread")
        if spread:
            print(f"final state, one fresh batch: per layer max/mean {spread['max_over_mean']:.3f}"
                  f" and min/mean {spread['min_over_mean']:.3f} (averaged; worst "
                  f"{spread['worst_max_over_mean']:.3f} / {spread['worst_min_over_mean']:.3f}), "
                  f"coefficient of variation {spread['cv']:.3f}, experts with no token "
                  f"{spread['idle_experts']}")


# ----------------------------------------------------------------------------- main

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--study", choices=STUDIES, help="which measurement")
    p.add_argument("--out", default="runs/multi_gpu",
                   help="results folder: OUT/<study>*.json, the state, the compile cache")
    p.add_argument("--tiny", action="store_true", help="toy sizes on any devices (CPU tests)")
    p.add_argument("--model", default=None, help="ModelConfig YAML (or a train config)")
    p.add_argument("--gpus", type=int_list, default=[1, 2, 4, 8], help="scaling: GPU counts")
    p.add_argument("--layouts", default=",".join(SCALING_LAYOUTS), help="scaling: dp,fsdp,tp")
    p.add_argument("--modes", default="weak,strong", help="scaling: weak,strong")
    p.add_argument("--rows-per-gpu", type=int, default=None,
                   help="scaling weak (4) and moe7b (2): rows per GPU")
    p.add_argument("--global-batch", type=int, default=8, help="scaling strong: global rows")
    p.add_argument("--seq-len", type=int, default=None, help="scaling, moe7b (4096)")
    p.add_argument("--steps", type=int, default=None,
                   help="steps per run (scaling 8, context 3, moe7b 50)")
    p.add_argument("--contexts", type=int_list, default=[4, 8], help="context: shard counts")
    p.add_argument("--lengths", type=int_list, default=None,
                   help="context: lengths of one row (65536,262144), then doubling")
    p.add_argument("--max-len", type=int, default=None, help="context: doubling stops here (4M)")
    p.add_argument("--rows", type=int, default=1, help="context: rows of the sweep and check")
    p.add_argument("--microbatches", type=int, default=4,
                   help="context: mesh.context_microbatches (and the pipe runs' rows)")
    p.add_argument("--pipe-lengths", type=int_list, default=None,
                   help="context: tokens per step of the pipe runs (65536,262144); '' = none")
    p.add_argument("--check-len", type=int, default=None, help="context: check length (16384)")
    p.add_argument("--check-steps", type=int, default=None, help="context: check steps (4)")
    p.add_argument("--mesh", default="expert=8", help="moe7b: mesh axes, e.g. data=2,expert=4")
    p.add_argument("--remat", action=argparse.BooleanOptionalAction, default=None,
                   help="per-block remat (default: context and moe7b on, scaling off)")
    p.add_argument("--profile", action="store_true",
                   help="trace one more step per run: collectives' share of kernel time")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds after which no run starts (default {BUDGET_S})")
    p.add_argument("--deadline", type=float, default=None,
                   help=f"seconds one run may take (default {DEADLINES})")
    p.add_argument("--compile-workers", type=int, default=None,
                   help="processes compiling train steps side by side first (default one "
                        "per 12 CPU cores, at most 8; --tiny 0; 0 = each run compiles alone)")
    p.add_argument("--retry-failed", action="store_true", help="run failed runs again")
    p.add_argument("--compile-cache", default=None,
                   help="JAX's persistent cache: a folder (OUT/jax-cache), auto or off")
    p.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s per GPU")
    p.add_argument("--no-threefry-kernel", action="store_true",
                   help="leave jax_threefry_gpu_kernel_lowering off")
    p.add_argument("--loss-tolerance", type=float, default=None,
                   help="max |Δloss| allowed, relative to the loss (bf16 1e-2, float32 1e-4)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="ModelConfig overrides")
    args = p.parse_args(argv)
    if args.worker:
        return args
    if not args.study:
        p.error("--study is required")
    tiny, study = args.tiny, args.study
    args.layouts = [x.strip() for x in args.layouts.split(",") if x.strip()]
    args.modes = [x.strip() for x in args.modes.split(",") if x.strip()]
    bad = [x for x in args.layouts if x not in SCALING_LAYOUTS] + \
        [x for x in args.modes if x not in ("weak", "strong")]
    if bad:
        p.error(f"unknown --layouts/--modes entries {bad}")
    args.rows_per_gpu = args.rows_per_gpu or (2 if tiny or study == "moe7b" else 4)
    args.seq_len = args.seq_len or ((32 if study == "moe7b" else 64) if tiny else 4096)
    args.steps = args.steps or {"scaling": 2 if tiny else 8, "context": 1 if tiny else 3,
                                "moe7b": 2 if tiny else 50}[study]
    args.lengths = args.lengths or ([128, 256] if tiny else [65536, 262144])
    args.max_len = args.max_len or (512 if tiny else 4 * 2 ** 20)
    if args.pipe_lengths is None:
        args.pipe_lengths = [128] if tiny else [65536, 262144]
    args.check_len = args.check_len or (64 if tiny else 16384)
    args.check_steps = args.check_steps or (2 if tiny else 4)
    args.remat = (study in REMAT_STUDIES) if args.remat is None else args.remat
    args.budget = args.budget or (TINY_BUDGET_S if tiny else BUDGET_S)
    if args.compile_workers is None:  # one per ~12 host cores: 8 on a 128-core 8-GPU node
        args.compile_workers = 0 if tiny else max(1, min(8, (os.cpu_count() or 1) // 12))
    return args


def results_path(args, out) -> pathlib.Path:
    """``OUT/<study>.json``, or ``<study>-remat.json`` / ``<study>-no-remat.json`` when
    ``--remat`` departs from the study's default: runs measured both ways are never mixed."""
    if args.remat == (args.study in REMAT_STUDIES):
        return out / f"{args.study}.json"
    return out / f"{args.study}-{'remat' if args.remat else 'no-remat'}.json"


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        exit_with_parent()
        try:
            worker(json.loads(args.worker))
        except Exception as err:  # noqa: BLE001 — the error goes to the results, then exit 1
            traceback.print_exc()
            spec = json.loads(args.worker)
            report = train_bench.Report(spec["common"]["results"])
            entry = report.data.get("runs", {}).get(spec["run"]["key"], {})
            entry.update(group=spec["run"]["group"], error=train_bench.short_error(err))
            if spec["run"]["kind"] != "init" and not spec.get("compile_only"):
                report.put("runs", spec["run"]["key"], entry)
            return 1
        return 0

    model = load_model(args.study, args.tiny, args.model, args.overrides)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = train_bench.Report(str(results_path(args, out)))
    count, kind, platform = probe_devices()
    args.present = count
    tolerance = args.loss_tolerance or (1e-2 if model.compute_dtype == "bfloat16" else 1e-4)
    report.put("meta", "devices", f"{count} x {kind}")
    report.put("meta", "model", str(args.model or (TINY_MODELS if args.tiny else MODELS)
                                    [args.study]) + "".join(f" {o}" for o in args.overrides))
    report.put("meta", "shape", {k: getattr(args, k) for k in (
        "rows_per_gpu", "global_batch", "seq_len", "steps", "lengths", "max_len", "rows",
        "microbatches", "pipe_lengths", "check_len", "check_steps", "mesh", "remat", "tiny")})
    print(f"{args.study}: {count} x {kind} ({platform}); model {report.data['meta']['model']}; "
          f"results in {report.path}; budget {args.budget:.0f} s", flush=True)
    runner = Runner(args, model, report, out)
    left = runner.run_all(lambda: report.data.get("runs", {}))
    report.data = train_bench.Report(report.path).data
    annotate_losses(report, tolerance)
    {"scaling": print_scaling, "context": print_context, "moe7b": print_moe}[args.study](
        report, args)
    if left:
        print(f"\nnot run yet (time budget): {', '.join(left)}; rerun the same command")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
