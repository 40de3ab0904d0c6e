"""Static cost of the Mosaic GPU kernels' loops, on the CPU (no GPU, no ptxas).

    PYTHONPATH=. python3 benchmarks/mosaic_static_cost.py [--backward] [--variant NAME ...]
                                                          [--dump DIR] [--ops]

``jax.export(..., platforms=["cuda"])`` runs Mosaic GPU's Python pipeline (layout inference and
the lowering of the Mosaic GPU dialect to arith/vector/llvm/nvvm/memref/scf, "Lane" semantics);
the C++ rest of the pipeline (to LLVM IR, PTX, SASS) runs only when the kernel is compiled on a
GPU. This script wraps ``mosaic.gpu.core.lower_mgpu_module`` to capture that module, runs
``canonicalize, cse, loop-invariant-code-motion`` on a copy (what LLVM will at least do: the
lowering re-derives thread ids and layout index math inside every op, almost all of it loop
invariant), and prints for every ``scf.for`` loop the ops of one iteration (nested loops
reported separately) and an estimate of the SASS instructions per warp they become:

* vector<N x f32> arithmetic: N instructions (no packed f32 on Hopper); a ``mulf`` whose only
  use is a contracting ``addf``/``subf`` is fused into an FFMA (0);
* ``truncf`` f32→bf16: one F2FP per pair; ``extf`` bf16→f32: one per element;
* SMEM loads/stores (``llvm.load``/``memref.load``/``vector.load``/``nvvm.ldmatrix``/stores in
  address space 3), shuffles, MUFU (``tanh.approx``), wgmma, wgmma fence/commit/wait, barriers:
  one each;
* integer/index arithmetic and address math (``arith`` integer ops, ``llvm.add``/``mul``/
  ``getelementptr``, dynamic ``memref.subview`` offsets): one each — an upper bound, LLVM
  strength-reduces and folds some of it into addressing modes;
* Mosaic's empty "optimization barrier" inline asm: 0, but each constant fed into it becomes a
  MOV (the zero-initialised wgmma accumulator);
* casts, vector extract/insert/bitcast/interleave, llvm extract/insertvalue: 0 (register names);
* loop control: 3 per iteration (IADD, ISETP, BRA).

It is an estimate of the issue slots of one warp (every thread of a warp runs the same
instructions), not a measurement: ptxas may add moves, and the latency of the dependent chain
(split → wgmma → tanh → gate) is not modelled.
"""

import argparse
import collections
import functools
import os
import re
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pallas_kernels.m2rnn import mosaic_gpu  # noqa: E402

CATEGORIES = ("smem load", "smem store", "cvt", "fp32", "mufu", "shuffle", "wgmma",
              "wgmma sync", "acc init mov", "int/address", "barrier", "tma/mbarrier",
              "control", "exact math (≈20 each)", "other")


def capture_modules(fn, args):
    """The Mosaic GPU modules (after Mosaic's Python lowering, then canonicalize/CSE/LICM) of
    every kernel in ``fn(*args)``, as (name, text, loops) with ``loops`` from ``_loops``."""
    from jax._src.lib.mlir import ir, passmanager
    from jax._src.pallas.mosaic_gpu import lowering
    from jax.experimental.mosaic.gpu import core as mgpu_core

    captured = []
    original = mgpu_core.lower_mgpu_module

    def wrapped(module, *a, **k):
        out = original(module, *a, **k)
        copy = ir.Module.parse(str(module), context=module.context)
        with module.context:
            passmanager.PassManager.parse(
                "builtin.module(canonicalize,cse,loop-invariant-code-motion,canonicalize,cse)"
            ).run(copy.operation)
        name = next((op.attributes["sym_name"].value for op in copy.body.operations
                     if op.operation.name == "func.func"
                     and "init_tma_desc" not in op.attributes["sym_name"].value), "kernel")
        captured.append((name, str(copy), _loops(copy)))
        return out

    lowering.mgpu_core.lower_mgpu_module = wrapped
    try:
        jax.export.export(jax.jit(fn), platforms=["cuda"])(*args)
    finally:
        lowering.mgpu_core.lower_mgpu_module = original
    return captured


def _walk(op):
    for region in op.regions:
        for block in region.blocks:
            for inner in block.operations:
                yield inner.operation


def _loops(module):
    """Every scf.for: (depth, trip count or None, op-name histogram, cost histogram)."""
    out = []

    def visit(op, depth):
        for inner in _walk(op):
            if inner.name == "scf.for":
                out.append(_loop_summary(inner, depth + 1))
                visit(inner, depth + 1)
            else:
                visit(inner, depth)

    visit(module.operation, 0)
    return out


def _const_int(value):
    owner = value.owner
    try:
        if owner.name in ("arith.constant", "llvm.mlir.constant"):
            return int(str(owner.attributes["value"]).split(":")[0])
    except Exception:  # noqa: BLE001
        return None
    return None


def _elements(type_):
    m = re.match(r"vector<([0-9x]+)x", str(type_))
    if not m:
        return 1
    n = 1
    for d in m.group(1).split("x"):
        n *= int(d)
    return n


def _is_smem(type_):
    return "address_space<workgroup>" in str(type_) or "ptr<3>" in str(type_)


def _loop_summary(loop, depth):
    lb, ub, step = (_const_int(loop.operands[i]) for i in range(3))
    trips = (ub - lb) // step if None not in (lb, ub, step) else None
    ops = collections.Counter()
    cost = collections.Counter()

    def body_ops(op):  # the loop's own ops (scf.if regions included, nested loops not)
        for inner in _walk(op):
            yield inner
            if inner.name != "scf.for":
                yield from body_ops(inner)

    for op in body_ops(loop):
        ops[op.name] += 1
        for cat, n in _cost(op).items():
            cost[cat] += n
    cost["control"] += 3
    return {"depth": depth, "trips": trips, "ops": ops, "cost": cost}


_ZERO = ("arith.constant", "arith.index_cast", "arith.bitcast", "llvm.mlir.constant",
         "llvm.mlir.undef", "llvm.mlir.poison", "llvm.bitcast", "llvm.extractvalue",
         "llvm.insertvalue", "llvm.extractelement", "llvm.insertelement", "llvm.ptrtoint",
         "llvm.inttoptr", "builtin.unrealized_conversion_cast", "vector.extract",
         "vector.insert", "vector.bitcast", "vector.broadcast", "vector.interleave",
         "vector.from_elements", "vector.extract_strided_slice", "vector.insert_strided_slice",
         "vector.shuffle", "vector.splat", "scf.yield", "scf.for", "memref.expand_shape",
         "memref.collapse_shape", "memref.cast", "memref.reinterpret_cast", "memref.transpose",
         "memref.extract_strided_metadata", "memref.view", "gpu.dynamic_shared_memory")


def _fused_mul(op):
    """A contracting mulf whose only use is a contracting addf/subf (one FFMA)."""
    result = op.results[0]
    uses = list(result.uses)
    if len(uses) != 1:
        return False
    user = uses[0].owner
    return user.name in ("arith.addf", "arith.subf") and "contract" in str(
        user.attributes["fastmath"] if "fastmath" in user.attributes else "")


def _cost(op):
    name = op.name
    if name in _ZERO:
        return {}
    res_t = op.results[0].type if len(op.results) else None
    n = _elements(res_t) if res_t is not None else 1
    if name in ("arith.addf", "arith.subf", "arith.mulf", "arith.maximumf", "arith.minimumf",
                "arith.maxnumf", "arith.minnumf", "arith.negf", "arith.divf", "math.fma",
                "arith.cmpf"):
        if name == "arith.mulf" and _fused_mul(op):
            return {}
        return {"fp32": n}
    if name == "arith.truncf":
        return {"cvt": -(-n // 2)}
    if name in ("arith.extf", "arith.sitofp", "arith.fptosi", "arith.uitofp"):
        return {"cvt": n}
    if name.startswith("arith.") or name in ("llvm.add", "llvm.mul", "llvm.getelementptr",
                                             "llvm.and", "llvm.or", "llvm.shl", "llvm.lshr",
                                             "llvm.select", "llvm.icmp", "llvm.sub"):
        return {"int/address": n}
    if name == "memref.subview":
        dynamic = sum(1 for v in op.operands[1:])
        return {"int/address": dynamic}
    if name in ("llvm.load", "memref.load", "vector.load", "nvvm.ldmatrix"):
        src = op.operands[0].type
        return {"smem load" if _is_smem(src) else "other": 1}
    if name in ("llvm.store", "memref.store", "vector.store", "nvvm.stmatrix"):
        dst = op.operands[1].type
        return {"smem store" if _is_smem(dst) else "other": 1}
    if name == "nvvm.shfl.sync":
        return {"shuffle": 1}
    if name in ("nvvm.wgmma.fence.aligned", "nvvm.wgmma.commit.group.sync.aligned",
                "nvvm.wgmma.wait.group.sync.aligned"):
        return {"wgmma sync": 1}
    if name in ("nvvm.barrier", "nvvm.barrier0", "gpu.barrier", "nvvm.bar.warp.sync"):
        return {"barrier": 1}
    if name.startswith("nvvm.mbarrier") or name.startswith("nvvm.cp.async") or name in (
            "nvvm.fence.proxy", "nvvm.elect.sync"):
        return {"tma/mbarrier": 1}
    if name in ("scf.if", "scf.index_switch", "cf.cond_br", "cf.br"):
        return {"control": 1}
    if name in ("math.tanh", "math.exp", "math.log"):
        return {"exact math (≈20 each)": 20 * n}
    if name == "llvm.inline_asm":
        asm = str(op.attributes["asm_string"])
        if asm.strip('"') == "":
            consts = sum(1 for v in op.operands if _const_int(v) is not None
                         or v.owner.name in ("arith.constant", "llvm.mlir.constant"))
            return {"acc init mov": consts} if consts else {}
        if "tanh.approx" in asm or "ex2.approx" in asm or "rcp.approx" in asm:
            return {"mufu": 1}
        if "wgmma.mma_async" in asm:
            return {"wgmma": 1}
        if "wgmma." in asm:
            return {"wgmma sync": 1}
        if "bar.sync" in asm or "barrier" in asm:
            return {"barrier": 1}
        if "cp.async" in asm or "mbarrier" in asm or "fence" in asm:
            return {"tma/mbarrier": 1}
        return {"other": max(1, asm.count(";"))}
    if name.startswith("gpu.") or name.startswith("nvvm.read"):
        return {"int/address": 1}
    return {"other": 1}


# ------------------------------------------------------------------------------- the kernels

def _forward_args(batch, seq_len, heads, with_keep=False):
    sds = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    return [sds((batch, seq_len, 1, 64), bf), sds((batch, seq_len, 1, 64), bf),
            sds((batch, seq_len, heads, 16), bf), sds((heads, 16, 16), bf),
            sds((batch, seq_len, heads), bf), sds((batch, heads, 64, 16), jnp.float32),
            sds((batch, seq_len), jnp.float32) if with_keep else None]


# Forward variants: mosaic_gpu.forward keywords (steps per loop iteration = ``unroll``).
# "default" is what mosaic_check.py times (chunk 64, no checkpoints, approx tanh, warp partials).
FORWARD_VARIANTS = {
    "default": {},
    "unroll4_nab": {"unroll": 4, "no_auto_barriers": True},
    "per_step_y": {"y_reduction": "per_step"},
    "heads2": {"heads_per_cta": 2},
    "heads2_nab": {"heads_per_cta": 2, "no_auto_barriers": True},
    "acc_kv": {"acc_init": "kv"},
    "heads2_acc_kv": {"heads_per_cta": 2, "acc_init": "kv"},
}


def forward_modules(options, shape=(8, 4096, 84)):
    fn = functools.partial(mosaic_gpu.forward, chunk_size=64, save_checkpoints=False,
                           interpret=False, **options)
    return capture_modules(fn, _forward_args(*shape))


def backward_modules(options=None, shape=(8, 4096, 84), chunk=32):
    sds = jax.ShapeDtypeStruct
    batch, seq_len, heads = shape
    args = _forward_args(batch, seq_len, heads)[:6] + [
        None, sds((batch, seq_len // chunk, 64, heads * 16), jnp.float32),
        sds((batch, seq_len, heads, 16), jnp.bfloat16), sds((batch, heads, 64, 16), jnp.float32)]
    fn = functools.partial(mosaic_gpu.backward, gradient_clipping=1.0, chunk_size=chunk,
                           interpret=False, **(options or {}))
    return capture_modules(fn, args)


def step_cost(loops, steps_per_iteration):
    """The innermost (deepest) loop's estimated instructions per step, by category, plus the
    enclosing loop's own ops spread over its steps."""
    deepest = max(loops, key=lambda l: l["depth"])
    per_step = collections.Counter({k: v / steps_per_iteration
                                    for k, v in deepest["cost"].items()})
    outer = [l for l in loops if l["depth"] == deepest["depth"] - 1]
    amortised = collections.Counter()
    if outer and deepest["trips"]:
        steps = deepest["trips"] * steps_per_iteration
        amortised = collections.Counter({k: v / steps for k, v in outer[0]["cost"].items()})
    return deepest, per_step, amortised


def _print_loop_table(title, loops):
    print(f"\n{title}: {len(loops)} scf.for loops")
    for i, loop in enumerate(loops):
        total = sum(loop["cost"].values())
        print(f"  loop {i}: depth {loop['depth']}, {loop['trips']} iterations, "
              f"{sum(loop['ops'].values())} ops, ≈{total:.0f} instructions per iteration")


def _print_histogram(label, counter, width=14):
    total = sum(counter.values())
    parts = "  ".join(f"{k} {counter[k]:.1f}" for k in CATEGORIES if counter.get(k))
    print(f"  {label:{width}s} total ≈ {total:6.1f}   {parts}")


def report_forward(name, options, show_ops=False, dump=None):
    modules = forward_modules(options)
    kname, text, loops = modules[0]
    if dump:
        with open(os.path.join(dump, f"forward_{name}.mlir"), "w") as fh:
            fh.write(text)
    unroll = options.get("unroll", 1)
    heads = options.get("heads_per_cta", 1)
    deepest, per_step, amortised = step_cost(loops, unroll)
    print(f"\nforward '{name}' {options or ''} ({kname}; {heads} head(s) per CTA, "
          f"step loop {deepest['trips']} iterations × {unroll} step(s))")
    _print_histogram("per step", per_step)
    _print_histogram("+ per chunk/32", amortised)
    total = sum(per_step.values()) + sum(amortised.values())
    print(f"  ≈ {total:.0f} instructions per warp per step, {total / heads:.0f} per head-step")
    if show_ops:
        print("  MLIR ops of one step-loop iteration:")
        for op, count in deepest["ops"].most_common():
            print(f"    {count:5d}  {op}")
    return total / heads


def report_backward(options, show_ops=False, dump=None):
    modules = backward_modules(options)
    kname, text, loops = modules[0]
    if dump:
        with open(os.path.join(dump, "backward.mlir"), "w") as fh:
            fh.write(text)
    _print_loop_table(f"backward {options or ''} ({kname})", loops)
    # The two loops over sub-chunks (4 steps each): phase 1 (recompute the sub-chunk start
    # states: 4 forward steps) and phase 2 (4 forward recomputations + 4 backward steps).
    inner = [l for l in loops if l["depth"] == max(x["depth"] for x in loops)]
    for label, loop in zip(("phase 1 (record), per step", "phase 2 (walk back), per step"),
                           inner):
        _print_histogram(label, collections.Counter(
            {k: v / mosaic_gpu.SUBCHUNK for k, v in loop["cost"].items()}), width=30)
        if show_ops:
            for op, count in loop["ops"].most_common(25):
                print(f"    {count:5d}  {op}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variant", action="append",
                        help=f"forward variants (default: all of {list(FORWARD_VARIANTS)})")
    parser.add_argument("--backward", action="store_true", help="also the backward's loops")
    parser.add_argument("--ops", action="store_true", help="print the MLIR op histograms")
    parser.add_argument("--dump", metavar="DIR", help="write the captured modules here")
    args = parser.parse_args()
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
    print(f"jax {jax.__version__}; shapes 8×4096×84 bf16, estimated SASS instructions per warp "
          f"(see the module docstring for the cost model)")
    for name in args.variant or list(FORWARD_VARIANTS):
        try:
            report_forward(name, FORWARD_VARIANTS[name], args.ops, args.dump)
        except TypeError as err:  # a variant this version of the kernel does not have
            print(f"\nforward '{name}': skipped ({err})")
    if args.backward:
        report_backward(None, args.ops, args.dump)
        report_backward({"reductions": "warp_sums", "qk_grad_sum": "kernel",
                         "no_auto_barriers": True, "approx_tanh": True}, args.ops, args.dump)


if __name__ == "__main__":
    main()
