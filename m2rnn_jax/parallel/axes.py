"""``MeshAxes``: which mesh axes split what, for the layers that place collectives themselves.

Most of the model is sharded by XLA from the parameters' logical axes (``layers/params.py``)
and needs no mesh names. A few computations cannot be split that way and run under
``jax.shard_map`` instead: the M²RNN recurrence over a split sequence (each shard starts from
the previous shard's final state), the causal conv's window from the previous shard, attention
across sequence shards, and the mixture-of-experts token exchange. Those layers take a
``MeshAxes`` from their caller (the trainer derives one from its logical-axis table); the
default, ``MeshAxes()``, splits nothing and adds no ``shard_map``.
"""

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class MeshAxes:
    """Mesh axis names by role; ``None`` or ``()`` = not split. Hashable (a static attribute)."""

    mesh: jax.sharding.Mesh | None = None
    batch: tuple[str, ...] = ()  # rows of a batch (data parallel and FSDP; the expert axis too)
    tensor: str | None = None  # heads and MLP hidden units
    context: str | None = None  # the sequence
    expert: str | None = None  # the experts of a mixture-of-experts MLP
    # Micro-batches of the M²RNN recurrence's pipeline over context shards (each shard's rows
    # are cut into this many, fewer when they do not divide evenly; parallel/recurrence.py).
    pipeline_microbatches: int = 4

    def __post_init__(self):
        if (not isinstance(self.pipeline_microbatches, int)
                or isinstance(self.pipeline_microbatches, bool) or self.pipeline_microbatches < 1):
            raise ValueError(f"MeshAxes.pipeline_microbatches must be a positive integer, got "
                             f"{self.pipeline_microbatches!r}")
        named = [*self.batch, self.tensor, self.context, self.expert]
        named = [name for name in named if name is not None]
        if named and self.mesh is None:
            raise ValueError(f"MeshAxes names mesh axes {named} but has no mesh")
        if self.mesh is not None:
            unknown = [name for name in named if name not in self.mesh.axis_names]
            if unknown:
                raise ValueError(f"MeshAxes names {unknown}, which the mesh (axes "
                                 f"{self.mesh.axis_names}) does not have")
        # The expert axis usually splits the batch too (outside the expert layers); the
        # tensor and context axes never do, and no axis has two of those roles.
        roles = [name for name in (self.tensor, self.context, self.expert) if name is not None]
        clashes = sorted({name for name in roles if roles.count(name) > 1}
                         | {name for name in (self.tensor, self.context) if name in self.batch}
                         | {name for name in self.batch if self.batch.count(name) > 1})
        if clashes:
            raise ValueError(f"a mesh axis may have one role; {clashes} have several in {self}")

    def size(self, name) -> int:
        """Devices along axis ``name`` (1 for ``None``)."""
        return 1 if name is None else self.mesh.shape[name]

    @property
    def batch_size(self) -> int:
        """Ways the batch is split."""
        out = 1
        for name in self.batch:
            out *= self.mesh.shape[name]
        return out

    @property
    def splits_anything(self) -> bool:
        return bool(self.batch or self.tensor or self.context or self.expert)

    def batch_spec(self):
        """The ``PartitionSpec`` entry of a batch dimension (``None`` when unsplit)."""
        return self.batch if self.batch else None
