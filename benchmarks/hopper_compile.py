"""Compiles for a Hopper GPU on a machine without one: the Mosaic GPU kernels' registers, spills,
SMEM and occupancy (from ptxas), and how many kernels one decode token launches.

    pip install -e '.[hopper-compile]'     # JAX's CUDA plugin, without the CUDA libraries
    python benchmarks/hopper_compile.py kernels [--chunk-sizes 16 32] [--shape 4 4096 84]
    python benchmarks/hopper_compile.py decode [--batches 1 32] [--context 1024]
    python benchmarks/hopper_compile.py step [--batch 4] [--top 25] [key=value ...]

JAX runs on the CPU; XLA compiles deviceless for a described GPU (by default an H200: 132 SMs,
228 KiB of SMEM and 65,536 registers per SM, 4.8 TB/s), and Mosaic GPU lowers its kernels and
runs ptxas during that compile, so the figures are the compiled kernels' own; nothing runs.
Mosaic GPU runs the first ``ptxas`` on PATH (else the CUDA toolkit's under ``/usr/local/cuda``);
the table names its version, since another ptxas may allocate a few registers differently.
XLA's fusion choices depend on the description (at batch 1 the memory bandwidth decides whether
a matrix-vector product is one kernel or two): ``--target-config FILE`` takes the GPU's own, a
``GpuTargetConfigProto`` in text form. With the plugin installed, a plain ``import jax`` on a
machine without CUDA libraries warns at length unless ``JAX_PLATFORMS=cpu``: install it in an
environment of its own.

``kernels``: the forward and backward of the op at ``--shape`` (B, S, N; bf16, K = 64, V = 16,
clipping 1, as the 400M hybrid trains) for each checkpoint interval, with and without packed
segments. CTAs/SM is the least of what the registers allow (one warpgroup of 128 threads per
CTA, 65,536 registers per SM, allocated per warp in units of 256), what the SMEM allows (233,472
bytes per SM, 1 KiB reserved per CTA; a kernel's SMEM is its dynamic allocation plus ptxas'
static bytes) and the SM's 2,048 threads; waves is the grid (B·N CTAs) over 132 SMs × CTAs/SM,
rounded up: each wave costs about as long as the slowest CTA's whole sequence. Step loops are
the instructions (per warp) of each innermost SASS loop that issues a wgmma: the forward's one
step, the backward's state recomputation and walk back (2 and 4 steps); they need nvdisasm beside
ptxas in the CUDA toolkit Mosaic GPU finds (pip's nvidia-cuda-nvdisasm has one).

``decode``: the 400M hybrid's on-device decode loop (``Generator.decode``, bf16 parameters,
greedy) with caches as ``benchmarks/decode_bench.py`` builds them at ``--context``: the kernels
its loop body launches per token (fusions, library calls such as cuBLAS GEMMs, copies), by the
operation each was made from. It counts kernels; their time comes from the GPU.

``step``: the 400M hybrid's train step (``benchmarks/train_bench.py``'s, batch × 4096 tokens;
``key=value`` overrides the model config as there) with its M²RNN layers on the Mosaic GPU
kernels and XLA attention (cuDNN's fused attention cannot compile without the cuDNN library):
its kernels, each with the bytes its operands and output span, the largest first. A static map
of where memory traffic goes, not a profile: an operand the kernel reads only a slice of counts
whole, and compute-bound kernels (the GEMMs) cost more than their bytes say.
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
import subprocess
import sys
import tempfile
import warnings

import jax
import jax.numpy as jnp
from flax import nnx

import decode_bench  # benchmarks/ is on sys.path when run as a script
import train_bench
from kernel_bench import CLIP, KEY_DIM, VALUE_DIM
from m2rnn_jax import HybridLM, ModelConfig, m2rnn
from m2rnn_jax.generation import Generator
from m2rnn_jax.typed_config import load_yaml, override
from pallas_kernels import platforms
from train import sharding as sharding_lib
from train.step import build_trainee

# Hopper per-SM limits (the H100 and H200 share them; the H200 has more and faster memory).
SM_COUNT = 132
SMEM_PER_SM = 233_472
SMEM_PER_BLOCK = 232_448
SMEM_RESERVED_PER_CTA = 1024
REGISTERS_PER_SM = 65_536
REGISTER_UNIT = 256  # registers are allocated per warp in units of 256
THREADS_PER_SM = 2048
THREADS_PER_CTA = 128  # the kernels' one warpgroup
SEQ_LEN = 4096  # the training benchmark's rows
H200 = {  # the fields of XLA's GpuTargetConfigProto that a compile reads
    "threads_per_block_limit": 1024, "threads_per_warp": 32,
    "shared_memory_per_block": 49_152, "shared_memory_per_core": SMEM_PER_SM,
    "shared_memory_per_block_optin": SMEM_PER_BLOCK, "threads_per_core_limit": THREADS_PER_SM,
    "core_count": SM_COUNT, "fpus_per_core": 128, "block_dim_limit_x": 2**31 - 1,
    "block_dim_limit_y": 65_535, "block_dim_limit_z": 65_535,
    "memory_bandwidth": 4_800_000_000_000, "l2_cache_size": 50 * 2**20, "clock_rate_ghz": 1.98,
    "device_memory_size": 141 * 10**9, "registers_per_core_limit": REGISTERS_PER_SM,
    "registers_per_block_limit": REGISTERS_PER_SM,
}
# Instructions that launch work on the GPU (the rest are views, tuples and control flow).
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
LAUNCHING = ("fusion", "custom-call", "copy", "copy-start", *COLLECTIVES,
             *(f"{name}-start" for name in COLLECTIVES))
# Instructions whose launches live in another computation: the loop parser refuses them.
NESTING = ("call", "conditional", "while", "async-start")
# One HLO instruction: its name, output shape, opcode and operands.
INSTRUCTION = re.compile(r"(?:ROOT )?(\S+) = (.*?) ([\w-]+)\((.*?)\)(?:,|$)")


def target_config():
    """The H200 as a ``GpuTargetConfigProto`` in text form."""
    fields = "\n".join(f"  {name}: {value}" for name, value in H200.items())
    return (f"gpu_device_info {{\n{fields}\n  cuda_compute_capability {{ major: 9 }}\n}}\n"
            'platform_name: "CUDA"\ndnn_version_info { major: 9 minor: 10 }\n'
            'runtime_version { major: 13 }\ndevice_description_str: "NVIDIA H200"\n')


def hopper_mesh(target_config_file=None):
    """A one-device mesh of a deviceless GPU (the H200 above, or the description in
    ``target_config_file``): arguments placed on it compile for it."""
    from jax.experimental import topologies
    description = (target_config() if target_config_file is None else
                   pathlib.Path(target_config_file).read_text())
    try:
        topology = topologies.get_topology_desc(platform="cuda", target_config=description,
                                                topology="1x1x1")
    except NotImplementedError:  # no CUDA backend registered: the plugin is missing
        raise SystemExit("error: JAX's CUDA plugin is not installed; install it with: "
                         "pip install -e '.[hopper-compile]'") from None
    return topologies.make_mesh(topology, (1,), ("device",))


def abstract(tree, sharding):
    """Shapes and dtypes of ``tree`` placed on ``sharding``."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)


@dataclasses.dataclass(frozen=True)
class KernelResources:
    name: str
    registers: int
    spill_bytes: int  # stores + loads
    smem_bytes: int  # dynamic + static
    wgmma_loops: tuple = ()  # (instructions, wgmmas) of each innermost loop with a wgmma

    def occupancy_limits(self):
        """CTAs per SM that the registers, the SMEM and the threads each allow."""
        per_warp = math.ceil(self.registers * 32 / REGISTER_UNIT) * REGISTER_UNIT
        return {"registers": REGISTERS_PER_SM // (per_warp * THREADS_PER_CTA // 32),
                "SMEM": SMEM_PER_SM // (self.smem_bytes + SMEM_RESERVED_PER_CTA),
                "threads": THREADS_PER_SM // THREADS_PER_CTA}

    def ctas_per_sm(self):
        return min(self.occupancy_limits().values())

    def waves(self, grid):
        """Rounds of ``grid`` CTAs over every SM (None when not one CTA fits)."""
        per_sm = self.ctas_per_sm()
        return math.ceil(grid / (SM_COUNT * per_sm)) if per_sm else None


def parse_ptxas(text):
    """``(registers, spill bytes, static SMEM bytes)`` from a ptxas ``-v`` report of one kernel."""
    registers = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    static_smem = re.search(r"(\d+) bytes smem", text)
    if registers is None or spills is None:
        raise ValueError(f"not a ptxas report: {text[:200]!r}")
    return (int(registers.group(1)), int(spills.group(1)) + int(spills.group(2)),
            int(static_smem.group(1)) if static_smem else 0)


def parse_dynamic_smem(module_text):
    """The dynamic SMEM bytes a lowered Mosaic GPU module launches its kernel with."""
    match = re.search(r"dynamic_shared_memory_size %c(\d+)_i32", module_text)
    if match is None:
        raise ValueError("no kernel launch with a constant dynamic SMEM size in the module")
    return int(match.group(1))


def sass_wgmma_loops(sass):
    """``(instructions, wgmma instructions)`` of each innermost loop of a kernel's SASS (as
    nvdisasm prints it) that issues a wgmma: the recurrence's step loops. A loop is a branch back
    to a label above it; innermost, it holds no other."""
    lines = sass.splitlines()
    labels = {m.group(1): i for i, line in enumerate(lines)
              if (m := re.match(r"\s*(\.L_x_\d+):", line))}
    loops = [(labels[m.group(1)], i) for i, line in enumerate(lines)
             if (m := re.search(r"BRA `?\((\.L_x_\d+)\)", line))
             and labels.get(m.group(1), i) < i]
    found = []
    for start, end in loops:
        if any(start <= s and e <= end and (s, e) != (start, end) for s, e in loops):
            continue
        body = [line for line in lines[start:end + 1] if re.search(r"/\*[0-9a-f]{4,}\*/", line)]
        wgmmas = sum("HGMMA" in line for line in body)
        if wgmmas:
            found.append((len(body), wgmmas))
    return tuple(found)


def collect_kernel_reports(folder):
    """The resources of each kernel whose reports Mosaic GPU wrote into ``folder``."""
    found = []
    for ptxas in sorted(pathlib.Path(folder).glob("*.ptxas")):
        stem = ptxas.name[:-len(".ptxas")]
        registers, spills, static_smem = parse_ptxas(ptxas.read_text())
        # The lowered module: after layout inference, or (lowered without it, as with Lane
        # semantics) in the pass log.
        module = next(path for path in (ptxas.parent / f"{stem}.after_layout_inference.txt",
                                        ptxas.parent / f"{stem}.mlir-passes.log")
                      if path.exists())
        dynamic_smem = parse_dynamic_smem(module.read_text())
        sass = ptxas.parent / f"{stem}.sass_ctrl"  # written where Mosaic GPU finds nvdisasm
        loops = sass_wgmma_loops(sass.read_text()) if sass.exists() else ()
        found.append(KernelResources(re.sub(r"_\d+$", "", stem), registers, spills,
                                     dynamic_smem + static_smem, loops))
    if not found:
        raise RuntimeError(f"Mosaic GPU wrote no ptxas report into {folder}: were the kernels "
                           "compiled for the GPU?")
    return found


@contextlib.contextmanager
def kernel_reports():
    """Yields a folder into which Mosaic GPU writes each kernel it compiles in the block (its
    ptxas report and lowered module among other dumps). The compile's own output (Mosaic GPU
    also tries to disassemble each kernel, which needs nvdisasm) is swallowed unless the block
    fails; then it goes to stderr before the error."""
    previous = os.environ.get("MOSAIC_GPU_DUMP_TO")
    leftovers_before = set(pathlib.Path("/tmp").glob("mosaic-gpu-*"))
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="hopper_compile_"))
        log = stack.enter_context(tempfile.TemporaryFile())
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        try:
            os.environ["MOSAIC_GPU_DUMP_TO"] = folder  # read by each lowering and compile
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
            yield folder
        except BaseException:
            os.dup2(saved[1], 2)
            log.seek(0)
            sys.stderr.buffer.write(log.read())
            sys.stderr.flush()
            raise
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if previous is None:
                os.environ.pop("MOSAIC_GPU_DUMP_TO", None)
            else:
                os.environ["MOSAIC_GPU_DUMP_TO"] = previous
            # Each disassembly Mosaic GPU tries leaves a /tmp/mosaic-gpu-* folder holding the
            # kernel's binary; ours are the new ones that hold just that (another process
            # compiling at the same time could leave one too).
            for path in set(pathlib.Path("/tmp").glob("mosaic-gpu-*")) - leftovers_before:
                if [p.name for p in path.iterdir()] == ["kernel.bin"]:
                    shutil.rmtree(path, ignore_errors=True)


def ptxas_version():
    """The version line of the ptxas Mosaic GPU runs (the first on PATH, else the toolkit's)."""
    for ptxas in (shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas"):
        if ptxas and os.path.exists(ptxas):
            lines = subprocess.run([ptxas, "--version"], capture_output=True,
                                   text=True).stdout.strip().splitlines()
            return f"{ptxas}: {lines[-1] if lines else 'unknown version'}"
    return "no ptxas found"


def op_gradient_args(batch, seq_len, heads, segments, sharding):
    """The op's inputs as the 400M hybrid passes them: bf16 q, k, v, W, float32 f."""
    bf16 = jnp.bfloat16
    shapes = [((batch, seq_len, 1, KEY_DIM), bf16), ((batch, seq_len, 1, KEY_DIM), bf16),
              ((batch, seq_len, heads, VALUE_DIM), bf16), ((heads, VALUE_DIM, VALUE_DIM), bf16),
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
                y, _ = m2rnn(q, k, v, w, f, None, CLIP, segment_ids=segment_ids,
                             backend="mosaic_gpu", chunk_size=chunk_size)
                return y.astype(jnp.float32).sum()

            with kernel_reports() as folder:
                jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4))).lower(
                    *op_gradient_args(batch, seq_len, heads, segments, sharding)).compile()
                rows += [(kernel, chunk_size, segments)
                         for kernel in collect_kernel_reports(folder)]
    return rows


def print_kernel_table(rows, grid):
    print(f"ptxas: {ptxas_version()}")
    print(f"{'kernel':<22} {'chunk':>5} {'segments':>8} {'registers':>9} {'spills':>6} "
          f"{'SMEM KiB':>8} {'CTAs/SM (registers, SMEM)':>25} {'waves':>5}  step loops")
    for kernel, chunk_size, segments in rows:
        limits = kernel.occupancy_limits()
        waves = kernel.waves(grid)
        per_sm = f"{kernel.ctas_per_sm()} ({limits['registers']}, {limits['SMEM']})"
        loops = (", ".join(f"{n} ({w} wgmma)" for n, w in kernel.wgmma_loops)
                 if kernel.wgmma_loops else "no nvdisasm")
        print(f"{kernel.name:<22} {chunk_size or 'auto':>5} {str(segments):>8} "
              f"{kernel.registers:>9} {kernel.spill_bytes:>6} {kernel.smem_bytes / 1024:>8.1f} "
              f"{per_sm:>25} {waves or '-':>5}  {loops}")


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


def operation_name(line):
    """The JAX operation's name an instruction's metadata records (``op_name``), or ""."""
    found = re.search(r'op_name="([^"]+)"', line)
    return found.group(1) if found else ""


def without_layouts(shape):
    """An HLO shape without its layouts: ``f32[8,64]{1,0}`` -> ``f32[8,64]``."""
    return re.sub(r"\{[^}]*\}", "", shape)


def launches(instructions):
    """The kernel-launching instructions among ``instructions``, as ``(opcode, op_name, shape)``
    (the last part of the JAX operation's name, the output shape without layouts)."""
    found = []
    for line in instructions:
        match = INSTRUCTION.match(line)
        if match and match.group(3) in LAUNCHING:
            found.append((match.group(3), operation_name(line).rsplit("/", 1)[-1],
                          without_layouts(match.group(2))))
    return found


def called_computation(line, attribute):
    """The computation an instruction names in ``attribute`` (``body``, ``condition``,
    ``to_apply``)."""
    return re.search(rf"{attribute}=%?([\w.\-]+)", line).group(1)


def while_loop_launches(hlo_text):
    """The launches of one iteration (body and condition) of the one while loop of the entry
    computation, or of a computation it calls; a ValueError for any other structure, whose
    launches this would miscount."""
    computations, entry = hlo_computations(hlo_text)
    loops = [line for line in computations[entry] if " while(" in line]
    if not loops:  # XLA's CPU compiler (JAX >= 0.12) wraps the loop alone in a called computation
        called = [called_computation(line, "to_apply")
                  for line in computations[entry] if " call(" in line]
        loops = [line for name in called for line in computations[name] if " while(" in line]
    if len(loops) != 1:
        raise ValueError(f"expected one while loop in the entry computation or one it calls, "
                         f"found {len(loops)}")
    body, condition = (called_computation(loops[0], key) for key in ("body", "condition"))
    iteration = computations[body] + computations[condition]
    nested = {m.group(3) for line in iteration
              if (m := INSTRUCTION.match(line)) and m.group(3) in NESTING}
    if nested:
        raise ValueError(f"the loop body holds {sorted(nested)}: its launches would be missed")
    return launches(iteration)


def decode_launches(batch, context, sharding, steps=32):
    bench_args = decode_bench.parse_args(["--models", "hybrid", "--steps", str(steps)])
    config = decode_bench.model_configs(bench_args)["hybrid"]
    model = nnx.eval_shape(lambda: HybridLM(config, rngs=nnx.Rngs(0)))
    built = []

    def generator_state():  # traced: the 400M parameters are never allocated
        built.append(Generator(HybridLM(config, rngs=nnx.Rngs(0))))
        return built[0]._state

    state = jax.eval_shape(generator_state)
    generator = built[0]  # for its loop function; its own state holds tracers, unused
    max_len = decode_bench.cache_length(context, bench_args)
    caches = jax.eval_shape(
        lambda: decode_bench.synthetic_caches(model, batch, context, max_len))
    key = jax.eval_shape(lambda: jax.random.key(0))
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    args = abstract((state, jax.ShapeDtypeStruct((batch,), jnp.int32), caches, key,
                     jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((batch,), bool),
                     scalar, scalar), sharding)
    # Jitted as Generator jits it on a GPU, where the caches are donated (off a GPU it does not
    # donate, which would add the copies that donation saves).
    decode = jax.jit(generator._decode_fn, static_argnames=("sampling", "block", "fixed"),
                     donate_argnums=(1, 2))
    # The abstract mesh names the target GPU to the Triton lowering (the fused M²RNN decode
    # step), which otherwise looks for a GPU on this machine.
    with warnings.catch_warnings(), jax.sharding.use_abstract_mesh(sharding.mesh.abstract_mesh):
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")  # the tokens
        compiled = decode.lower(*args, sampling=(0.0, None, None), block=steps,
                                fixed=True).compile()  # decode_bench's loop: count = block
    return while_loop_launches(compiled.as_text())


DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
               "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8}


def shape_bytes(shape):
    """Bytes of an HLO shape (a tuple shape: of all its parts)."""
    total = 0
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", shape):
        if dtype in DTYPE_BYTES:
            total += math.prod(int(d) for d in dims.split(",") if d) * DTYPE_BYTES[dtype]
    return total


def entry_traffic(hlo_text):
    """``(bytes, opcode, output shape, op_name)`` of each launch of the entry computation: the
    bytes of its operands (whole, as defined in the entry computation) and of its output."""
    computations, entry = hlo_computations(hlo_text)
    shapes, found = {}, []
    for line in computations[entry]:
        match = INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode, operands = match.groups()
        shapes[name] = shape
        if opcode in LAUNCHING:
            read = sum(shape_bytes(shapes.get(operand.split()[-1], ""))
                       for operand in operands.split(",") if operand.strip())
            found.append((read + shape_bytes(shape), opcode, without_layouts(shape),
                          operation_name(line)))
    return found


def step_traffic(batch, overrides, device_mesh):
    model_config = override(load_yaml(ModelConfig, train_bench.HYBRID_CONFIG), overrides)
    model_config = dataclasses.replace(  # as train_bench trains it, on the kernels it would run
        model_config, m2rnn=dataclasses.replace(model_config.m2rnn, backend="mosaic_gpu"),
        attention=dataclasses.replace(model_config.attention, implementation="xla"),
        compute_dtype="bfloat16", param_dtype="float32")
    config = train_bench.train_config(model_config, batch, SEQ_LEN, steps=1)
    mesh = sharding_lib.make_mesh(config.mesh, list(device_mesh.devices.flat))
    trainee = build_trainee(config, mesh)
    rows = jax.ShapeDtypeStruct((1, batch, SEQ_LEN + 1), jnp.int32,
                                sharding=sharding_lib.batch_sharding(mesh, 3, leading=1))
    compiled = trainee.train_step.lower(trainee.abstract_state(), {
        "tokens": rows, "segment_ids": rows}).compile()
    return entry_traffic(compiled.as_text())


def print_step_table(batch, found, top):
    total = sum(row[0] for row in found)
    print(f"train step, batch {batch} x {SEQ_LEN}: {len(found)} kernels, {total / 1e9:.1f} GB "
          f"spanned by their operands and outputs; the {top} largest:")
    for spanned, opcode, shape, op_name in sorted(found, key=lambda row: -row[0])[:top]:
        print(f"  {spanned / 1e9:7.2f} GB  {opcode:<12} {shape[:48]:<48} {op_name[-70:]}")


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
    kernels.add_argument("--chunk-sizes", type=int, nargs="+", default=[None],
                         help="checkpoint intervals (default: the backend's)")
    kernels.add_argument("--shape", type=int, nargs=3, default=[4, 4096, 84],
                         metavar=("B", "S", "N"), help="batch, sequence length, heads")
    decode = sub.add_parser("decode", help="kernels launched per decode token")
    decode.add_argument("--batches", type=int, nargs="+", default=[1, 32],
                        help="rows decoded together")
    decode.add_argument("--context", type=int, default=1024,
                        help="tokens already in the caches")
    step = sub.add_parser("step", help="the train step's kernels by the bytes they span")
    step.add_argument("--batch", type=int, default=4, help="rows of 4096 tokens")
    step.add_argument("--top", type=int, default=25, help="kernels listed")
    step.add_argument("overrides", nargs="*", metavar="key=value",
                      help="model config overrides, e.g. layer_pattern=MMMA")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    # JAX itself on the CPU: the CUDA plugin then registers (for the deviceless topology) without
    # looking for a GPU or the CUDA libraries.
    jax.config.update("jax_platforms", "cpu")
    mesh = hopper_mesh(args.target_config)
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    with platforms.lowered_for("gpu"):
        if args.command == "kernels":
            print_kernel_table(kernel_rows(args, sharding), args.shape[0] * args.shape[2])
        elif args.command == "step":
            print_step_table(args.batch, step_traffic(args.batch, args.overrides, mesh),
                             args.top)
        else:
            for batch in args.batches:
                print_decode_table(batch, args.context,
                                   decode_launches(batch, args.context, sharding))


if __name__ == "__main__":
    main()
