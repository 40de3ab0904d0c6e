"""Compiles for a Hopper GPU on a machine without one: the Mosaic GPU kernels' registers, spills,
SMEM and occupancy (from ptxas), and how many kernels one decode token launches.

    pip install -e '.[hopper-compile]'     # JAX's CUDA plugin, without the CUDA libraries
    python benchmarks/hopper_compile.py kernels [--chunk-sizes 16 32] [--shape 4 4096 84]
    python benchmarks/hopper_compile.py decode [--batches 1 32] [--context 1024]

JAX runs on the CPU; XLA compiles deviceless for a described GPU (by default an H200: 132 SMs,
228 KiB of SMEM and 65,536 registers per SM, 4.8 TB/s), and Mosaic GPU lowers its kernels and
runs ptxas during that compile, so the figures are the compiled kernels' own; nothing runs.
Mosaic GPU takes ptxas from the CUDA toolkit at ``/usr/local/cuda`` (a CUDA 13 toolkit); another
ptxas version may allocate a few registers differently from the one on the GPU machine. XLA's
fusion choices depend on the description (at batch 1 the memory bandwidth decides whether a
matrix-vector product is one kernel or two): ``--target-config FILE`` takes the GPU's own, a
``GpuTargetConfigProto`` in text form.

``kernels``: the forward and backward of the op at ``--shape`` (B, S, N; bf16, K = 64, V = 16,
clipping 1, as the 400M hybrid trains) for each checkpoint interval, with and without packed
segments. CTAs/SM is the smaller of what the registers allow (one warpgroup of 128 threads per
CTA, 65,536 registers per SM, allocated per warp in units of 256) and what the SMEM allows
(233,472 bytes per SM, 1 KiB reserved per CTA); waves is the grid (B·N CTAs) over 132 SMs ×
CTAs/SM, rounded up: each wave costs about as long as the slowest CTA's whole sequence.

``decode``: the 400M hybrid's on-device decode loop (``Generator.decode``, bf16 parameters, greedy)
with caches at ``--context``: the kernels its loop body launches per token (fusions, library
calls such as cuBLAS GEMMs, copies), by the operation each was made from. At batch 1 a token's
time is mostly these launches.
"""

import argparse
import collections
import contextlib
import dataclasses
import math
import os
import pathlib
import re
import shutil
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

from m2rnn_jax import HybridLM, m2rnn
from pallas_kernels.m2rnn import platforms

# Hopper per-SM limits (the H100 and H200 share them; the H200 has more and faster memory).
SM_COUNT = 132
SMEM_PER_SM = 233_472
SMEM_PER_BLOCK = 232_448
SMEM_RESERVED_PER_CTA = 1024
REGISTERS_PER_SM = 65_536
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256
THREADS_PER_CTA = 128
H200 = {  # the fields of XLA's GpuTargetConfigProto that a compile reads
    "threads_per_block_limit": 1024, "threads_per_warp": 32,
    "shared_memory_per_block": 49_152, "shared_memory_per_core": SMEM_PER_SM,
    "shared_memory_per_block_optin": SMEM_PER_BLOCK, "threads_per_core_limit": 2048,
    "core_count": SM_COUNT, "fpus_per_core": 128, "block_dim_limit_x": 2**31 - 1,
    "block_dim_limit_y": 65_535, "block_dim_limit_z": 65_535,
    "memory_bandwidth": 4_800_000_000_000, "l2_cache_size": 50 * 2**20, "clock_rate_ghz": 1.98,
    "device_memory_size": 141 * 10**9, "registers_per_core_limit": REGISTERS_PER_SM,
    "registers_per_block_limit": REGISTERS_PER_SM,
}
# Instructions that launch work on the GPU (the rest are views, tuples and control).
LAUNCHING = ("fusion", "custom-call", "copy", "copy-start", "all-reduce", "all-gather",
             "reduce-scatter", "all-to-all", "collective-permute")


def target_config():
    """The H200 as a ``GpuTargetConfigProto`` in text form."""
    fields = "\n".join(f"  {name}: {value}" for name, value in H200.items())
    return (f"gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: 9 }}\n}}\n"
            'platform_name: "CUDA"\ndnn_version_info { major: 9 minor: 10 }\n'
            'runtime_version { major: 13 }\ndevice_description_str: "NVIDIA H200"\n')


def hopper_sharding(target_config_file=None):
    """A one-device sharding on a deviceless GPU (the H200 below, or the description in
    ``target_config_file``): arguments placed on it compile for it."""
    from jax.experimental import topologies
    description = (target_config() if target_config_file is None else
                   pathlib.Path(target_config_file).read_text())
    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=description,
                                                topology="1x1x1")
    except (NotImplementedError, RuntimeError) as err:
        raise SystemExit(f"error: no CUDA compiler ({str(err).splitlines()[0]}); install it "
                         f"with: pip install -e '.[hopper-compile]'") from None
    mesh = topologies.make_mesh(topology, (1,), ("device",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def abstract(tree, sharding):
    """Shapes and dtypes of ``tree`` placed on ``sharding``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


@dataclasses.dataclass(frozen=True)
class KernelResources:
    name: str
    registers: int
    spill_bytes: int  # stores + loads
    smem_bytes: int

    def ctas_per_sm(self):
        """(limit from registers, limit from SMEM)."""
        per_warp = math.ceil(self.registers * 32 / REGISTER_UNIT) * REGISTER_UNIT
        by_registers = REGISTERS_PER_SM // (per_warp * THREADS_PER_CTA // 32)
        by_smem = SMEM_PER_SM // (self.smem_bytes + SMEM_RESERVED_PER_CTA)
        return by_registers, by_smem


def parse_ptxas(text):
    """``(registers, spill bytes)`` from a ptxas ``-v`` report of one kernel."""
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    if registers is None or spills is None:
        raise ValueError(f"not a ptxas report: {text[:200]!r}")
    return int(registers.group(1)), int(spills.group(1)) + int(spills.group(2))


def parse_smem(text):
    """Scratch SMEM bytes from Mosaic GPU's resources report of one kernel."""
    match = re.search(r"smem_scratch_bytes=(\d+)", text)
    if match is None:
        raise ValueError(f"not a Mosaic GPU resources report: {text[:200]!r}")
    return int(match.group(1))


def collect_kernel_reports(folder):
    """The resources of each kernel whose reports Mosaic GPU wrote into ``folder``."""
    found = []
    for ptxas in sorted(pathlib.Path(folder).glob("*.ptxas")):
        stem = ptxas.name[:-len(".ptxas")]
        registers, spills = parse_ptxas(ptxas.read_text())
        smem = parse_smem((ptxas.parent / f"{stem}.resources.txt").read_text())
        found.append(KernelResources(re.sub(r"_\d+$", "", stem), registers, spills, smem))
    return found


@contextlib.contextmanager
def kernel_reports():
    """Yields a folder into which Mosaic GPU writes each kernel it compiles in the block (its
    ptxas report and resources among other dumps). The compile's own output (Mosaic GPU also
    disassembles each kernel, which needs nvdisasm) is swallowed unless the block fails."""
    folder = tempfile.mkdtemp(prefix="hopper_compile_")
    # Mosaic GPU leaves a /tmp/mosaic-gpu-* folder per disassembly it tries: removed below.
    leftovers_before = set(pathlib.Path("/tmp").glob("mosaic-gpu-*"))
    os.environ["MOSAIC_GPU_DUMP_TO"] = folder  # read by each Mosaic GPU lowering and compile
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    try:
        with tempfile.TemporaryFile(mode="w+") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            try:
                yield folder
            except BaseException:
                os.dup2(saved[1], 2)
                log.seek(0)
                sys.stderr.write(log.read())
                raise
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved:
            os.close(fd)
        del os.environ["MOSAIC_GPU_DUMP_TO"]
        for path in [folder, *set(pathlib.Path("/tmp").glob("mosaic-gpu-*")) - leftovers_before]:
            shutil.rmtree(path, ignore_errors=True)


def op_gradient_args(batch, seq_len, heads, segments, sharding):
    bf16 = jnp.bfloat16
    shapes = [((batch, seq_len, 1, 64), bf16), ((batch, seq_len, 1, 64), bf16),
              ((batch, seq_len, heads, 16), bf16), ((heads, 16, 16), bf16),
              ((batch, seq_len, heads), jnp.float32)]
    if segments:
        shapes.append(((batch, seq_len), jnp.int32))
    return [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in shapes]


def kernel_rows(args, sharding):
    batch, seq_len, heads = args.shape
    rows = []
    for segments in (False, True):
        for chunk_size in args.chunk_sizes:
            def loss(q, k, v, w, f, segment_ids=None):
                y, _ = m2rnn(q, k, v, w, f, None, 1.0, segment_ids=segment_ids,
                             backend="mosaic_gpu", chunk_size=chunk_size)
                return y.astype(jnp.float32).sum()

            with kernel_reports() as folder:
                jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(
                    *op_gradient_args(batch, seq_len, heads, segments, sharding)).compile()
                rows += [(kernel, chunk_size, segments)
                         for kernel in collect_kernel_reports(folder)]
    return rows


def print_kernel_table(rows, grid):
    print(f"{'kernel':<22} {'chunk':>5} {'segments':>8} {'registers':>9} {'spills':>6} "
          f"{'SMEM KiB':>8} {'CTAs/SM (regs, SMEM)':>20} {'waves':>5}")
    for kernel, chunk_size, segments in rows:
        by_registers, by_smem = kernel.ctas_per_sm()
        per_sm = min(by_registers, by_smem)
        waves = math.ceil(grid / (SM_COUNT * per_sm)) if per_sm else "-"
        print(f"{kernel.name:<22} {chunk_size or 'auto':>5} {str(segments):>8} "
              f"{kernel.registers:>9} {kernel.spill_bytes:>6} {kernel.smem_bytes / 1024:>8.1f} "
              f"{f'{per_sm} ({by_registers}, {by_smem})':>20} {waves:>5}")


def hlo_computations(hlo_text):
    """``({computation name: [instruction lines]}, the entry computation's name)`` of an HLO
    module's text."""
    computations, current, entry = {}, None, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header:
            current = computations.setdefault(header.group(2), [])
            entry = header.group(2) if header.group(1) else entry
        elif line.startswith("}"):
            current = None
        elif current is not None and line.strip():
            current.append(line.strip())
    return computations, entry


def launches(instructions):
    """The kernel-launching instructions among ``instructions``, as ``(opcode, op_name, shape)``
    (the last part of the JAX operation's name, the output shape without layouts)."""
    found = []
    for line in instructions:
        match = re.match(r"(?:ROOT )?\S+ = (.*?) ([\w-]+)\(", line)
        if match and match.group(2) in LAUNCHING:
            op_name = re.search(r'op_name="([^"]+)"', line)
            shape = re.sub(r"\{[^}]*\}", "", match.group(1))
            found.append((match.group(2), op_name.group(1).rsplit("/", 1)[-1] if op_name else "",
                          shape))
    return found


def while_loop_launches(hlo_text):
    """The launches of one iteration (body and condition) of the entry computation's while
    loop."""
    computations, entry = hlo_computations(hlo_text)
    loop = next(line for line in computations[entry] if " while(" in line)
    body = re.search(r"body=%?([\w.\-]+)", loop).group(1)
    condition = re.search(r"condition=%?([\w.\-]+)", loop).group(1)
    return launches(computations[body]) + launches(computations[condition])


def decode_launches(batch, context, sharding):
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import decode_bench  # the benchmark's model and synthetic caches

    from m2rnn_jax.generation import Generator
    config = decode_bench.model_configs(decode_bench.parse_args(["--models", "hybrid"]))["hybrid"]
    model = nnx.eval_shape(lambda: HybridLM(config, rngs=nnx.Rngs(0)))
    built = []

    def generator_state():  # traced: the 400M parameters are never allocated
        built.append(Generator(HybridLM(config, rngs=nnx.Rngs(0))))
        return built[0]._state

    state = jax.eval_shape(generator_state)
    generator = built[0]  # for its loop function; its own state holds tracers, unused
    steps = 32
    caches = jax.eval_shape(
        lambda: decode_bench.synthetic_caches(model, batch, context, context + steps + 1))
    key = jax.eval_shape(lambda: jax.random.key(0))
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    args = abstract((state, jax.ShapeDtypeStruct((batch,), jnp.int32), caches, key,
                     jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((batch,), bool),
                     scalar, scalar), sharding)
    warnings.filterwarnings("ignore", "Some donated buffers were not usable")  # the tokens
    # Jitted as Generator jits it on a GPU, where the caches are donated (off a GPU it does not
    # donate, which would add the copies that donation saves).
    decode = jax.jit(generator._decode_fn, static_argnames=("sampling", "block"),
                     donate_argnums=(1, 2))
    compiled = decode.lower(*args, sampling=(0.0, None, None), block=steps).compile()
    return while_loop_launches(compiled.as_text())


def print_decode_table(batch, context, found):
    print(f"decode, batch {batch}, context {context}: {len(found)} kernels per token "
          "(count, instruction, JAX operation, output shape)")
    for (opcode, op_name, shape), count in collections.Counter(found).most_common():
        print(f"  {count:>4}  {opcode:<12} {op_name:<22} {shape}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target-config", metavar="FILE",
                        help="a GpuTargetConfigProto in text form instead of the built-in H200 "
                             "(XLA's fusion choices depend on it, e.g. on the memory bandwidth)")
    sub = parser.add_subparsers(dest="command", required=True)
    kernels = sub.add_parser("kernels", help="registers, spills, SMEM, occupancy of the kernels")
    kernels.add_argument("--chunk-sizes", type=int, nargs="*", default=[None],
                         help="checkpoint intervals (default: the backend's)")
    kernels.add_argument("--shape", type=int, nargs=3, default=[4, 4096, 84],
                         metavar=("B", "S", "N"))
    decode = sub.add_parser("decode", help="kernels launched per decode token")
    decode.add_argument("--batches", type=int, nargs="*", default=[1, 32])
    decode.add_argument("--context", type=int, default=1024)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # JAX itself on the CPU: the CUDA plugin then registers (for the deviceless topology) without
    # looking for a GPU or the CUDA libraries.
    jax.config.update("jax_platforms", "cpu")
    sharding = hopper_sharding(args.target_config)
    with platforms.lowered_for("gpu"):
        if args.command == "kernels":
            print_kernel_table(kernel_rows(args, sharding), args.shape[0] * args.shape[2])
        else:
            for batch in args.batches:
                print_decode_table(batch, args.context,
                                   decode_launches(batch, args.context, sharding))


if __name__ == "__main__":
    main()
