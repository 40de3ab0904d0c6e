"""Device mesh and the one table that maps the model's logical axis names onto it.

Parameters hold logical axis names (``vocab``, ``embed``, ``mlp``, ``mixer``, ``heads``,
``head_dim``, ``state``, ``conv``, ``norm``, ``experts``, ``expert_mlp``) in their
``out_sharding`` metadata. Everything sharded in training — parameters, optimizer state,
batches, activations — derives its ``PartitionSpec`` from :data:`LOGICAL_AXIS_RULES`, and the
``MeshAxes`` handed to the model (``model_axes``) from the same table; nothing else in
``train/`` names a mesh axis for a tensor.

The mesh axes, outermost first: ``data`` (replicas), ``fsdp`` (replicas that also shard every
weight along d_model), ``expert`` (shards the experts of MoE MLPs, and the batch everywhere
else), ``context`` (shards the sequence), ``tensor`` (shards heads and hidden units;
innermost, so that its collectives take the fastest links).
"""

import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from m2rnn_jax.parallel import MeshAxes
from m2rnn_jax.typed_config import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "context", "tensor")

# Logical axis -> mesh axis (a name, a tuple of names, or None for replicated).
LOGICAL_AXIS_RULES = {
    "batch": ("data", "fsdp", "expert"),  # rows of activations and token batches
    "sequence": "context",      # steps of activations
    "vocab": "tensor",
    "embed": "fsdp",            # d_model: FSDP shards every weight along it
    "mlp": "tensor",
    "mixer": "tensor",          # fused mixer projections (q|k|v|gates, attention qkv)
    "heads": "tensor",
    "head_dim": None,
    "state": None,
    "conv": None,
    "norm": None,
    "experts": "expert",
    "expert_mlp": None,
}


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, ...]:
    """Axis sizes in ``MESH_AXES`` order; one of them may be -1 (fill the remaining devices)."""
    sizes = {axis: getattr(mesh_config, axis) for axis in MESH_AXES}
    fill = [axis for axis, size in sizes.items() if size == -1]
    bad = [axis for axis, size in sizes.items() if size == 0 or size < -1]
    if bad:
        raise ConfigError(f"mesh.{bad[0]} must be a positive integer or -1 (fill), got "
                          f"{sizes[bad[0]]}")
    if len(fill) > 1:
        raise ConfigError(f"only one mesh axis may be -1 (fill); mesh.{fill[0]} and "
                          f"mesh.{fill[1]} both are")
    fixed = int(np.prod([size for size in sizes.values() if size != -1]))
    if fill:
        if num_devices % fixed:
            raise ConfigError(f"mesh.{fill[0]} = -1 cannot fill {num_devices} devices: the other "
                              f"axes {sizes} use {fixed}, which does not divide it")
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(f"mesh {sizes} needs {fixed} devices but {num_devices} are available; "
                          "set one axis (e.g. mesh.data) to -1 to fill")
    return tuple(sizes[axis] for axis in MESH_AXES)


def make_mesh(mesh_config, devices=None) -> jax.sharding.Mesh:
    """A mesh with the axes ``MESH_AXES`` over ``devices`` (all devices by default)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_mesh(logical_axes, shape, mesh, *, where="") -> PartitionSpec:
    """Maps a tuple of logical axis names to a ``PartitionSpec`` on ``mesh``.

    A dimension stays replicated when its size is not divisible by the mesh axes it maps to,
    or when an earlier dimension already uses that mesh axis (a mesh axis may appear once).
    """
    if len(logical_axes) != len(shape):
        raise ValueError(f"{where}: {len(logical_axes)} logical axes {tuple(logical_axes)} for "
                         f"a value of shape {tuple(shape)}")
    used = set()
    spec = []
    for name, size in zip(logical_axes, shape):
        if name is None:
            spec.append(None)
            continue
        if name not in LOGICAL_AXIS_RULES:
            raise ValueError(f"{where}: logical axis {name!r} is not in the sharding table "
                             f"train.sharding.LOGICAL_AXIS_RULES (known: "
                             f"{', '.join(LOGICAL_AXIS_RULES)})")
        target = LOGICAL_AXIS_RULES[name]
        axes = () if target is None else (target,) if isinstance(target, str) else tuple(target)
        axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
        ways = int(np.prod([mesh.shape[a] for a in axes])) if axes else 1
        if not axes or size % ways:
            spec.append(None)
            continue
        used.update(axes)
        spec.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def param_shardings(abstract_state, mesh):
    """NamedShardings (a pure dict) for an ``nnx.State`` of annotated Variables.

    Reads each Variable's logical axes with ``nnx.get_partition_spec`` (no rules applied, so
    the spec holds the logical names) and maps them through :data:`LOGICAL_AXIS_RULES`.
    """
    logical = nnx.to_pure_dict(nnx.get_partition_spec(abstract_state))
    shapes = jax.tree.map(lambda v: v.shape, nnx.to_pure_dict(abstract_state))
    paths_and_specs = jax.tree_util.tree_flatten_with_path(
        logical, is_leaf=lambda x: isinstance(x, PartitionSpec))[0]
    flat_shapes = jax.tree.leaves(shapes, is_leaf=lambda x: isinstance(x, tuple))
    shardings = []
    for (path, spec), shape in zip(paths_and_specs, flat_shapes):
        where = jax.tree_util.keystr(path, simple=True, separator=".")
        names = tuple(spec) if len(spec) else (None,) * len(shape)
        shardings.append(NamedSharding(mesh, logical_to_mesh(names, shape, mesh, where=where)))
    treedef = jax.tree.structure(logical, is_leaf=lambda x: isinstance(x, PartitionSpec))
    return jax.tree.unflatten(treedef, shardings)


def model_axes(mesh, *, context_microbatches=4) -> MeshAxes:
    """The ``MeshAxes`` of the model on ``mesh``, from the table (axes of size 1 left out)."""
    def split(logical):
        target = LOGICAL_AXIS_RULES[logical]
        names = (target,) if isinstance(target, str) else tuple(target or ())
        return tuple(name for name in names if mesh.shape[name] > 1)

    def single(logical):
        names = split(logical)
        return names[0] if names else None

    return MeshAxes(mesh=mesh, batch=split("batch"), tensor=single("heads"),
                    context=single("sequence"), expert=single("experts"),
                    pipeline_microbatches=context_microbatches)


def batch_sharding(mesh, ndim: int, *, leading=0) -> NamedSharding:
    """Shards axis ``leading`` (the batch axis) of an ``ndim`` array over the batch axes."""
    spec = [None] * ndim
    spec[leading] = LOGICAL_AXIS_RULES["batch"]
    return NamedSharding(mesh, PartitionSpec(*spec))


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def maybe_initialize_distributed() -> bool:
    """Starts ``jax.distributed`` when the environment describes several processes.

    Explicit: ``JAX_COORDINATOR_ADDRESS=host:port JAX_NUM_PROCESSES=N JAX_PROCESS_ID=i``.
    Auto-detected by JAX: SLURM (``SLURM_NTASKS`` > 1), Open MPI (``OMPI_COMM_WORLD_SIZE`` > 1).
    Returns whether it initialised.
    """
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in os.environ]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set, so {' and '.join(missing)} must "
                             f"be set too")
        jax.distributed.initialize(os.environ["JAX_COORDINATOR_ADDRESS"],
                                   num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["JAX_PROCESS_ID"]))
        return True
    for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if int(os.environ.get(var, "1") or "1") > 1:
            jax.distributed.initialize()
            return True
    return False
