"""Registers, spills and programs per SM of the Pallas Triton kernels (``pallas_gpu_vector``, or
``pallas_gpu`` with ``--kernel sequence``) for an H100/H200, measured on a machine without a GPU.

Register pressure decides these kernels' speed (RESULTS.md, vector-state kernels), and the
device time to find it out is scarce. Pallas lowers a kernel to a Triton module on any machine
(the GPU's compute capability is supplied, as the CI lowering test does); this script captures
that module, compiles it with the ``triton`` package for sm_90 and reads ``ptxas -v``:

    python3 -m pip install triton==3.6.0     # once; not a dependency of the library
    PYTHONPATH=. python3 benchmarks/triton_registers.py \\
        [--configs "default;block_rows=16,num_warps=4"] [--batch 512 --seq-len 64 --heads 16 --value-dim 64]

Each ``--configs`` entry is ``VectorKernelConfig`` (``KernelConfig`` for ``--kernel sequence``,
e.g. ``--kernel sequence --batch 8 --seq-len 4096 --heads 84 --key-dim 64 --value-dim 16
--dtype bfloat16 --chunk 64``) keywords (``default`` = the defaults). Caveat:
XLA compiles the module with its own Triton, not this package's, so these are estimates; the
GPU's own PTX (``XLA_FLAGS=--xla_dump_to=DIR`` on the device writes ``*.ptx``) is the check:

    python3 benchmarks/triton_registers.py --ptx DIR/*.ptx     # ptxas -v per kernel, no jax
"""

import argparse
import dataclasses
import functools
import os
import re
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp

REGISTERS_PER_SM = 65536
THREADS_PER_SM = 2048
SHARED_PER_SM = 228 * 1024


def capture_triton_modules(fn, *args):
    """The Triton modules (MLIR text, no debug info) of the Pallas kernels in ``fn(*args)``,
    lowered for an H200 without one."""
    from jax._src.pallas.triton import gpu_info, pallas_call_registration

    registration = pallas_call_registration
    modules = []
    lower = registration.lowering.lower_jaxpr_to_triton_module
    get_info = registration.gpu_info_lib.get_gpu_info

    def capture(*a, **k):
        result = lower(*a, **k)
        modules.append(result.module.operation.get_asm(enable_debug_info=False))
        return result

    registration.lowering.lower_jaxpr_to_triton_module = capture
    registration.gpu_info_lib.get_gpu_info = lambda: gpu_info.get_gpu_info_from_version(
        gpu_info.GpuVersion.H200)
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    finally:
        registration.lowering.lower_jaxpr_to_triton_module = lower
        registration.gpu_info_lib.get_gpu_info = get_info
    return modules


def parse_ptxas(text):
    """``{entry function: {registers, spill_stores, spill_loads, stack}}`` (bytes) from
    ``ptxas -v`` output."""
    out = {}
    for block in re.split(r"Compiling entry function '", text)[1:]:
        name = block.split("'", 1)[0]

        def number(pattern, block=block):
            m = re.search(pattern, block)
            return int(m.group(1)) if m else 0
        out[name] = {"registers": number(r"Used (\d+) registers"),
                     "spill_stores": number(r"(\d+) bytes spill stores"),
                     "spill_loads": number(r"(\d+) bytes spill loads"),
                     "stack": number(r"(\d+) bytes stack frame")}
    if not out or not all(u["registers"] for u in out.values()):
        raise ValueError(f"no register counts in ptxas output: {text[-500:]}")
    return out


def find_ptxas():
    try:
        import triton
        bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                               "ptxas")
        if os.path.exists(bundled):
            return bundled
    except ImportError:
        pass
    found = shutil.which("ptxas")
    if not found:
        raise SystemExit("needs ptxas (the triton package bundles one, or a CUDA toolkit)")
    return found


def ptxas_usage(ptx_path, cubin_path=os.devnull):
    out = subprocess.run([find_ptxas(), "--gpu-name", "sm_90a", "-v", ptx_path, "-o",
                          cubin_path], capture_output=True, text=True, check=True)
    return parse_ptxas(out.stdout + out.stderr)


def programs_per_sm(registers, num_warps, shared_bytes):
    """Resident programs per SM as registers (allocated per warp in units of 256), threads and
    shared memory allow."""
    per_warp = -(-registers * 32 // 256) * 256
    limits = [REGISTERS_PER_SM // (per_warp * num_warps), THREADS_PER_SM // (32 * num_warps)]
    if shared_bytes:
        limits.append(SHARED_PER_SM // shared_bytes)
    return min(limits)


def compile_for_sm90(module_text, num_warps, num_stages, workdir):
    """``parse_ptxas`` of the module compiled by the triton package, plus its shared memory."""
    import triton
    from triton.backends.compiler import GPUTarget

    path = os.path.join(workdir, "kernel.ttir")
    with open(path, "w") as fh:
        fh.write(module_text)
    kernel = triton.compile(path, target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = os.path.join(workdir, "kernel.ptx")
    with open(ptx, "w") as fh:
        fh.write(kernel.asm["ptx"])
    (usage,) = ptxas_usage(ptx).values()
    return {**usage, "shared": int(kernel.metadata.shared)}


def _kernel_calls(kernels, config, batch, seq_len, heads, key_dim, value_dim, dtype,
                  checkpoints_shape, chunk):
    """(name, function, abstract args, num_warps) of ``kernels``' forward and backward (one q/k
    group, no reset mask)."""
    spec = jax.ShapeDtypeStruct
    qk = spec((batch, seq_len, 1, key_dim), dtype)
    v = spec((batch, seq_len, heads, value_dim), dtype)
    w = spec((heads, value_dim, value_dim), dtype)
    f = spec((batch, seq_len, heads), dtype)
    h0 = spec((batch, heads, key_dim, value_dim), jnp.float32)
    checkpoints = spec(checkpoints_shape, jnp.float32)
    forward = functools.partial(kernels.forward, chunk_size=chunk, config=config)
    backward = functools.partial(kernels.backward, chunk_size=chunk, gradient_clipping=1.0,
                                 config=config)
    return [("forward", forward, (qk, qk, v, w, f, h0, None), config.num_warps),
            ("backward", backward, (qk, qk, v, w, f, h0, None, checkpoints, v, h0),
             getattr(config, "backward_num_warps", config.num_warps))]


def vector_kernel_calls(config, batch, seq_len, heads, value_dim, chunk, dtype):
    """``_kernel_calls`` of ``gpu_vector`` (K = 1)."""
    from pallas_kernels.m2rnn import gpu, gpu_vector

    # The checkpoints' padded layout (N, S/C, Bp, Vp), as gpu_vector's forward writes them.
    batch_pad = -(-batch // config.block_rows) * config.block_rows
    value_pad = max(16, gpu._next_pow2(value_dim))
    return _kernel_calls(gpu_vector, config, batch, seq_len, heads, 1, value_dim, dtype,
                         (heads, seq_len // chunk, batch_pad, value_pad), chunk)


def sequence_kernel_calls(config, batch, seq_len, heads, key_dim, value_dim, chunk, dtype):
    """``_kernel_calls`` of ``gpu.py``."""
    from pallas_kernels.m2rnn import gpu

    # The checkpoints' layout (B, S/C, Kp, N·Vp), as gpu.forward writes them.
    key_pad, value_pad = (max(16, gpu._next_pow2(n)) for n in (key_dim, value_dim))
    return _kernel_calls(gpu, config, batch, seq_len, heads, key_dim, value_dim, dtype,
                         (batch, seq_len // chunk, key_pad, heads * value_pad), chunk)


def parse_configs(text):
    """``"default;block_rows=16,num_warps=4"`` -> [(label, keywords)]."""
    out = []
    for entry in (e.strip() for e in text.split(";") if e.strip()):
        if entry == "default":
            out.append(("default", {}))
            continue
        keywords = {}
        for pair in entry.split(","):
            key, value = pair.split("=", 1)
            keywords[key.strip()] = value.strip() if not value.strip().isdigit() else int(value)
        out.append((entry, keywords))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kernel", choices=("vector", "sequence"), default="vector",
                   help="pallas_gpu_vector (K = 1) or pallas_gpu (gpu.py)")
    p.add_argument("--configs", default="default")
    p.add_argument("--key-dim", type=int, default=64, help="K (--kernel sequence)")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--value-dim", type=int, default=64)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--ptx", nargs="+", metavar="FILE",
                   help="only ptxas -v of these PTX files (e.g. XLA's dump from the GPU)")
    args = p.parse_args(argv)
    if args.ptx:
        for path in args.ptx:
            for name, u in ptxas_usage(path).items():
                print(f"{os.path.basename(path)} {name}: {u['registers']} registers, spill "
                      f"stores/loads {u['spill_stores']}/{u['spill_loads']} B, stack "
                      f"{u['stack']} B")
        return
    from pallas_kernels.m2rnn import gpu, gpu_vector
    try:
        import triton  # noqa: F401
    except ImportError:
        raise SystemExit("needs the triton package: python3 -m pip install triton==3.6.0")
    # The GPU path, not the interpreter.
    gpu._interpret = gpu_vector._interpret = lambda: False
    rows = []
    for label, keywords in parse_configs(args.configs):
        if args.kernel == "vector":
            calls = vector_kernel_calls(gpu_vector.VectorKernelConfig(**keywords), args.batch,
                                        args.seq_len, args.heads, args.value_dim, args.chunk,
                                        jnp.dtype(args.dtype))
        else:
            calls = sequence_kernel_calls(gpu.KernelConfig(**keywords), args.batch,
                                          args.seq_len, args.heads, args.key_dim,
                                          args.value_dim, args.chunk, jnp.dtype(args.dtype))
        num_stages = keywords.get("num_stages", 1)
        for name, fn, fn_args, warps in calls:
            (module,) = capture_triton_modules(fn, *fn_args)
            with tempfile.TemporaryDirectory() as workdir:
                usage = compile_for_sm90(module, warps, num_stages, workdir)
            usage["programs_per_sm"] = programs_per_sm(usage["registers"], warps,
                                                       usage["shared"])
            rows.append((label, name, warps, usage))
            print(label, name, usage, flush=True)
    print(f"\n{'config':<40} {'kernel':<9} {'warps':>5} {'regs':>5} {'spill st/ld B':>14} "
          f"{'smem KiB':>8} {'progs/SM':>8}")
    for label, name, warps, u in rows:
        print(f"{label:<40} {name:<9} {warps:>5} {u['registers']:>5} "
              f"{u['spill_stores']:>6}/{u['spill_loads']:<7} {u['shared'] / 1024:>8.1f} "
              f"{u['programs_per_sm']:>8}")


if __name__ == "__main__":
    main()
