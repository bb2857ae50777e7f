"""Sharding for training: device mesh, logical-axis rules -> shardings, per-process batches, and
context parallelism (attention over a sequence sharded along T: `context.py`; the gated linear
recurrence across devices: `recurrence.py`)."""

from attnjax.parallel import context
from attnjax.parallel import recurrence
from attnjax.parallel.context import context_parallel_attention, layout_positions, tile_counts
from attnjax.parallel.mesh import BATCH_AXES
from attnjax.parallel.mesh import MESH_AXES
from attnjax.parallel.mesh import batch_sharding
from attnjax.parallel.mesh import batch_shards
from attnjax.parallel.mesh import global_batch
from attnjax.parallel.mesh import logical_shardings
from attnjax.parallel.mesh import make_mesh
from attnjax.parallel.mesh import maybe_initialize_distributed
from attnjax.parallel.mesh import mesh_shape
from attnjax.parallel.recurrence import context_parallel_linear_attention
from attnjax.parallel.rules import DEFAULT_LOGICAL_AXIS_RULES

__all__ = [
    "BATCH_AXES", "DEFAULT_LOGICAL_AXIS_RULES", "MESH_AXES", "batch_sharding", "batch_shards",
    "context", "context_parallel_attention", "context_parallel_linear_attention", "global_batch",
    "layout_positions", "logical_shardings", "make_mesh", "maybe_initialize_distributed",
    "mesh_shape", "recurrence", "tile_counts",
]
