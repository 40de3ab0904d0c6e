"""The throughput table of the README in one command: training, compile, op and decode speed.

From the repository root on one GPU, with the package installed:

    python benchmarks/throughput.py --out DIR [--only STEP,...] [--tiny]

Each step runs one of the other benchmark scripts in its own process under a deadline (a hung
or slow step is killed and reported, the others still run) and leaves its results in ``DIR``;
a step whose results are already there is skipped, so a run cut short continues where it
stopped. ``--deadline STEP=SECONDS`` replaces a step's deadline. The table is printed last.
Steps:

``train4``   ``train_bench.py --models hybrid`` at batch 4 × 4096: step time, tokens/s, MFU
             and where the step goes (each component alone, forward and forward+backward);
             ``--profile`` traces a few steps
``cold``     the batch-4 train step compiled by a new process without per-component timings
             before it, from an empty persistent cache in ``DIR/jax-cache`` (emptied first)
``warm``     the same command again, with that cache filled (only after ``cold`` finished)
``train8``   the hybrid at batch 8 × 4096
``op``       ``kernel_bench.py``: the M²RNN op at 8 × 4096 × 84, forward and forward+backward,
             and the bf16 errors of every output against the float64 recurrence
``decode``   ``decode_bench.py --models hybrid`` at batch 1 and 32, 1K and 64K contexts, each
             point also traced once (the GPU's busy time per step and its busiest kernels)
``attention`` cuDNN flash attention and XLA attention on packed documents (forward and
             gradients, bf16 inputs, the hybrid's attention shape), each against a float32
             softmax written out in the script: the check behind cuDNN being the hybrid's
             attention where it is supported

``--tiny`` runs every step at toy sizes on any machine (it checks this script, not speed).
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
STEPS = ("train4", "cold", "warm", "train8", "op", "decode", "attention")
# Where each step leaves its results, under --out (kernel_bench names its file itself).
RESULT_FILES = {"train4": "train4.json", "cold": "cold.json", "warm": "warm.json",
                "train8": "train8.json",
                "op": "op/kernel_bench.jsonl", "decode": "decode.jsonl",
                "attention": "attention.json"}
# Seconds each step may take on an H200 (compilation included), and on a CPU with --tiny.
DEADLINES = {"train4": 420, "cold": 240, "warm": 180, "train8": 300, "op": 240, "decode": 300,
             "attention": 120}
TINY_DEADLINE = 300
# The targets of the throughput work, shown beside the measurements.
TARGETS = {"train4": "≥ 85k tok/s", "train8": "scales with batch", "cold": "≤ 60 s",
           "warm": "≤ 10 s", "op": "≤ 2.0 / ≤ 8.0 ms", "decode1": "≥ 1,500 tok/s"}


def step_commands(step, out, tiny):
    """``(argv, environment additions)`` of one step."""
    python = sys.executable
    cache = {"JAX_COMPILATION_CACHE_DIR": str(out / "jax-cache")}
    size = ["--tiny", "--steps", "3"] if tiny else []
    if step in ("train4", "cold", "warm", "train8"):
        argv = [python, str(HERE / "train_bench.py"), "--models", "hybrid", "--json",
                str(out / RESULT_FILES[step]), *size]
        if step == "train4":
            return argv + ["--profile", str(out / "profile")], {}
        argv += ["--no-shares"] + (["--batch", "8"] if step == "train8" else [])
        if step == "train8":
            return argv, {}
        # Cold and warm run one command, so the second finds what the first cached; train4's
        # compile follows its per-component timings, which warm in-process caches first.
        return argv + (["--steps", "3"] if not tiny else []), cache
    if step == "op":
        argv = [python, str(HERE / "kernel_bench.py"), "--out",
                str((out / RESULT_FILES["op"]).parent)]
        return argv + (["--smoke", "--reps", "2", "--workers", "1"] if tiny else
                       ["--shapes", "first"]), {}
    if step == "decode":
        return [python, str(HERE / "decode_bench.py"), "--models", "hybrid", "--out",
                str(out / RESULT_FILES["decode"]), "--profile", str(out / "decode-profile"),
                "--batches", "1", "32", "--contexts",
                *(["16", "64", "--tiny", "--param-dtype", "float32", "--steps", "4"] if tiny
                  else ["1024", "65536"])], {}
    return [python, str(pathlib.Path(__file__)), "--attention-check",
            str(out / RESULT_FILES["attention"])] + (["--tiny"] if tiny else []), {}


def done(step, out) -> bool:
    path = out / RESULT_FILES[step]
    if not path.exists():
        return False
    if path.suffix == ".json":
        data = json.loads(path.read_text() or "{}")
        return "error" not in data and (step == "attention" or "hybrid" in
                                        data.get("train", {}))
    return bool(path.read_text().strip())


def run_step(step, out, tiny, deadlines=DEADLINES):
    argv, extra_env = step_commands(step, out, tiny)
    deadline = TINY_DEADLINE if tiny else deadlines[step]
    print(f"\n### {step} (deadline {deadline} s): {' '.join(argv[1:])}", flush=True)
    start = time.perf_counter()
    try:
        finished = subprocess.run(argv, env={**os.environ, **extra_env}, timeout=deadline)
        status = f"exit {finished.returncode}"
    except subprocess.TimeoutExpired:
        status = f"killed at its deadline of {deadline} s"
    seconds = time.perf_counter() - start
    print(f"### {step}: {status} after {seconds:.0f} s", flush=True)
    return status


# ----------------------------------------------------------------------------- the table

def _read_json(path):
    return json.loads(path.read_text()) if path.exists() else {}


def _read_lines(path):
    return ([json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if path.exists() else [])


def table_rows(out):
    """``(what, measured, target)`` rows from the step results in ``out``."""
    rows = []
    for step in ("train4", "train8"):
        report = _read_json(out / RESULT_FILES[step])
        hybrid = report.get("train", {}).get("hybrid", {})
        shape = report.get("meta", {}).get("shape", {})
        label = (f"train, batch {shape['batch']} × {shape['seq_len']}" if shape else
                 f"train ({step})")
        if "step_s" in hybrid:
            mfu = hybrid.get("mfu")
            rows.append((label, f"{hybrid['step_s'] * 1e3:.1f} ms/step, "
                         f"{hybrid['tokens_per_s'] / 1e3:.1f}k tok/s"
                         + ("" if mfu is None or mfu != mfu else f", MFU {mfu:.1%}"),
                         TARGETS[step]))
        else:
            rows.append((label, "not measured", TARGETS[step]))
    for step, label, target in (("cold", "train step compile, cold cache", "cold"),
                                ("warm", "train step compile, warm cache", "warm")):
        hybrid = _read_json(out / RESULT_FILES[step]).get("train", {}).get("hybrid", {})
        measured = "not measured"
        if "compile_s" in hybrid:
            measured = f"{hybrid['compile_s']:.1f} s" + (
                f" (tracing + lowering {hybrid['lower_s']:.1f} s)" if "lower_s" in hybrid else "")
        rows.append((label, measured, TARGETS[target]))
    op_rows = _read_lines(out / RESULT_FILES["op"])
    timing = [r for r in op_rows if r.get("kind") == "timing"]
    rows.append(("M²RNN op, forward / forward+backward",
                 " ; ".join(f"{'×'.join(map(str, r['shape']))}: {r['fwd_ms']:.2f} / "
                            f"{r['fwd_bwd_ms']:.2f} ms" for r in timing if "fwd_ms" in r)
                 or "not measured", TARGETS["op"]))
    accuracy = [r for r in op_rows if r.get("kind") == "accuracy_bf16"]
    if accuracy:
        worst = max(max(r["errors"].values()) for r in accuracy)
        rows.append(("op bf16 error vs float64 (worst output)", f"{worst:.2e}", "not larger"))
    for r in _read_lines(out / RESULT_FILES["decode"]):
        if "tokens_per_s" in r:
            trace = r.get("profile") or {}  # None: run without --profile, or no GPU timeline
            busy = (f"; GPU busy {trace['busy_us_per_token']:,.0f} of "
                    f"{trace['wall_us_per_token']:,.0f} µs per step"
                    if "busy_us_per_token" in trace else "")
            rows.append((f"decode, batch {r['batch']}, context {r['context']:,}",
                         f"{r['tokens_per_s']:,.0f} tok/s ({r['ms_per_step']:.2f} ms/step; one "
                         f"dispatch per token {r['dispatch_tokens_per_s']:,.0f}{busy})",
                         TARGETS["decode1"] if r["batch"] == 1 else ""))
        elif "skipped" in r:
            rows.append((f"decode, batch {r['batch']}, context {r['context']:,}", r["skipped"],
                         ""))
    check = _read_json(out / RESULT_FILES["attention"])
    if check:
        worst = {name: max(check[name].values()) for name in
                 ("xla_vs_float32", "cudnn_vs_float32", "cudnn_vs_xla") if name in check}
        rows.append(("attention on packed documents, worst error",
                     ", ".join(f"{name.replace('_vs_', ' vs ')} {value:.1e}"
                               for name, value in worst.items())
                     + (f" ({check['cudnn_error']})" if "cudnn_error" in check else ""),
                     "bf16 rounding"))
    return rows


def print_table(rows):
    width = max(len(r[0]) for r in rows)
    print(f"\n{'what':<{width}}  measured  |  target")
    for what, measured, target in rows:
        print(f"{what:<{width}}  {measured}" + (f"  |  {target}" if target else ""))


# ----------------------------------------------------------------------------- attention check

def attention_check(path, tiny):
    """cuDNN and XLA attention on packed rows (outputs and input gradients, bf16 inputs),
    each against a float32 softmax written out here, and against each other."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    batch, seq_len, heads, head_dim = (2, 64, 2, 16) if tiny else (2, 4096, 16, 64)
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v, probe = (jax.random.normal(key, (batch, seq_len, heads, head_dim), jnp.bfloat16)
                      for key in keys[:4])
    segments = jnp.cumsum(jax.random.bernoulli(keys[4], 4 / seq_len, (batch, seq_len)), axis=1)
    same_document = segments[:, :, None] == segments[:, None, :]
    causal = jnp.tril(jnp.ones((seq_len, seq_len), bool))

    def written_out(q, k, v):
        scores = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32),
                            precision=jax.lax.Precision.HIGHEST) / np.sqrt(head_dim)
        allowed = (same_document & causal)[:, None]
        weights = jax.nn.softmax(jnp.where(allowed, scores, -jnp.inf), axis=-1)
        return jnp.einsum("bhts,bshd->bthd", weights, v.astype(jnp.float32),
                          precision=jax.lax.Precision.HIGHEST)

    def library(implementation):
        def attend(q, k, v):
            return jax.nn.dot_product_attention(q, k, v, mask=same_document[:, None],
                                                is_causal=True, implementation=implementation)
        return attend

    def outputs(attend):
        def loss(q, k, v):
            out = attend(q, k, v)
            return jnp.sum(out.astype(jnp.float32) * probe), out
        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return [out, *grads]

    def errors(got, want):
        return {name: float(np.linalg.norm(np.asarray(g, np.float32) - np.asarray(w, np.float32))
                            / max(np.linalg.norm(np.asarray(w, np.float32)), 1e-30))
                for name, g, w in zip(("out", "dq", "dk", "dv"), got, want)}

    reference = outputs(written_out)
    xla = outputs(library("xla"))
    result = {"shape": [batch, seq_len, heads, head_dim], "xla_vs_float32": errors(xla, reference)}
    try:
        cudnn = outputs(library("cudnn"))
    except Exception as err:  # noqa: BLE001 — no cuDNN here (CPU): say so in the table
        result["cudnn_error"] = f"cuDNN attention unavailable: {str(err).splitlines()[0][:120]}"
    else:
        result["cudnn_vs_float32"] = errors(cudnn, reference)
        result["cudnn_vs_xla"] = errors(cudnn, xla)
    pathlib.Path(path).write_text(json.dumps(result))
    print(json.dumps(result))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="results folder (also what a rerun continues from)")
    parser.add_argument("--only", default=",".join(STEPS), help=f"steps to run: {STEPS}")
    parser.add_argument("--tiny", action="store_true", help="toy sizes (checks the script)")
    parser.add_argument("--deadline", action="append", default=[], metavar="STEP=SECONDS",
                        help="replace one step's deadline (repeatable), e.g. train4=300")
    parser.add_argument("--attention-check", metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.attention_check:
        return attention_check(args.attention_check, args.tiny)
    if not args.out:
        parser.error("--out is required")
    steps = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        parser.error(f"unknown steps {unknown}; known: {', '.join(STEPS)}")
    deadlines = dict(DEADLINES)
    for item in args.deadline:
        step, _, seconds = item.partition("=")
        if step not in STEPS or not seconds.isdigit():
            parser.error(f"--deadline {item!r}: expected STEP=SECONDS with STEP in {STEPS}")
        deadlines[step] = int(seconds)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    statuses = {}
    for step in STEPS:
        if step not in steps:
            continue
        if done(step, out):
            print(f"### {step}: results already in {out}, skipped", flush=True)
            continue
        if step == "cold":  # entries left by a cold run cut short would make this one warm
            shutil.rmtree(out / "jax-cache", ignore_errors=True)
        if step == "warm" and not done("cold", out):
            statuses[step] = "skipped: needs the cold step's results and cache"
            continue
        statuses[step] = run_step(step, out, args.tiny, deadlines)
    print_table(table_rows(out))
    failed = {s: v for s, v in statuses.items() if v != "exit 0"}
    if failed:
        print(f"\nsteps that did not finish: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
