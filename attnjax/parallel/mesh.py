"""Device mesh, logical-axis shardings and per-process data for training (MaxText-style).

The mesh has named axes `MESH_AXES = ("data", "fsdp", "tensor", "context")`; a config gives some of
their sizes (`{"data": 2, "fsdp": 2, "tensor": 2}`, `-1` meaning "all remaining devices") and the
rest
are 1, so logical-axis rules may always name any of the four. Parameters and activations carry
logical axis names ("embed", "mlp", "heads", ...); `rules` (pairs of logical name -> mesh axis or
None) turn them into `NamedSharding`s. Batches are split over ("data", "fsdp") along their first
dimension; each process loads only its own rows and `jax.make_array_from_process_local_data`
stitches
the global array.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor", "context")
# Mesh axes over which a batch's first dimension is split.
BATCH_AXES = ("data", "fsdp")

_ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
_ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
_ENV_PROCESS_ID = "JAX_PROCESS_ID"


def maybe_initialize_distributed(*, coordinator_address: Optional[str] = None,
                                 num_processes: Optional[int] = None,
                                 process_id: Optional[int] = None) -> bool:
  """Calls `jax.distributed.initialize` when arguments or the environment ask for multi-process.

  Arguments win over the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
  JAX_PROCESS_ID. With none of them set this is a no-op (single process), so the same entry point
  runs on a laptop and on a cluster. Must run before anything touches a JAX backend; a second call
  (the process is already initialised) is a no-op.

  Returns:
    True if `jax.distributed.initialize` was called.
  """
  coordinator_address = coordinator_address or os.environ.get(_ENV_COORDINATOR)
  if num_processes is None and os.environ.get(_ENV_NUM_PROCESSES):
    num_processes = int(os.environ[_ENV_NUM_PROCESSES])
  if process_id is None and os.environ.get(_ENV_PROCESS_ID):
    process_id = int(os.environ[_ENV_PROCESS_ID])
  if coordinator_address is None or jax.distributed.is_initialized():
    return False
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
  return True


def mesh_shape(mesh_config: Optional[Mapping[str, int]], device_count: int) -> dict[str, int]:
  """Resolves a mesh config to a size for every axis of MESH_AXES.

  Args:
    mesh_config: axis name -> size; at most one size may be -1 ("the remaining devices");
      missing axes are 1. None or {} means {"data": -1}.
    device_count: the number of devices the mesh must use exactly.

  Raises:
    ValueError naming `mesh` when an axis is unknown, a size is not positive, or the sizes do not
    multiply to `device_count`.
  """
  mesh_config = dict(mesh_config or {"data": -1})
  unknown = sorted(set(mesh_config) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"mesh: unknown axes {unknown}; the mesh axes are {MESH_AXES}")
  sizes = {a: int(mesh_config.get(a, 1)) for a in MESH_AXES}
  rest = [a for a, s in sizes.items() if s == -1]
  if len(rest) > 1:
    raise ValueError(f"mesh: only one axis may be -1 (the rest), got {rest}")
  bad = {a: s for a, s in sizes.items() if s != -1 and s < 1}
  if bad:
    raise ValueError(f"mesh: axis sizes must be >= 1 or -1, got {bad}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  if rest:
    if fixed > device_count or device_count % fixed:
      raise ValueError(f"mesh: the fixed axis sizes {dict(mesh_config)} (product {fixed}) do not "
                       f"divide the {device_count} available devices")
    sizes[rest[0]] = device_count // fixed
  elif fixed != device_count:
    raise ValueError(f"mesh: {dict(mesh_config)} needs {fixed} devices but jax.device_count() is "
                     f"{device_count}")
  return sizes


def make_mesh(mesh_config: Optional[Mapping[str, int]]) -> jax.sharding.Mesh:
  """A mesh over all devices with the axes MESH_AXES (Auto axis types: shardings by annotation)."""
  sizes = mesh_shape(mesh_config, jax.device_count())
  return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def _fit_spec(spec: P, shape: Sequence[int], mesh: jax.sharding.Mesh) -> P:
  """Drops mesh axes from `spec` on dimensions they do not divide (e.g. 10 classes over 4 devices):
  such a parameter is replicated along that dimension instead of failing to shard."""
  fitted = []
  padded = tuple(spec) + (None,) * (len(shape) - len(spec))
  for dim, axes in zip(shape, padded, strict=False):  # a longer spec: extra axes ignored
    if axes is None:
      fitted.append(None)
      continue
    names = (axes,) if isinstance(axes, str) else tuple(axes)
    kept, size = [], 1
    for name in names:
      if dim % (size * mesh.shape[name]) == 0:
        kept.append(name)
        size *= mesh.shape[name]
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*fitted)


def logical_shardings(abstract_tree: Any, mesh: jax.sharding.Mesh,
                      rules: Sequence[tuple[str, Any]]) -> Any:
  """NamedShardings for a tree whose leaves may be `nn.Partitioned` (logical axis names).

  `abstract_tree` is typically `jax.eval_shape(init_fn, ...)` before unboxing; leaves without
  names are replicated. The returned tree has the structure of `nn.unbox(abstract_tree)`.
  """
  specs = nn.get_partition_spec(abstract_tree)
  shardings = nn.logical_to_mesh_sharding(specs, mesh, tuple(rules))
  shapes = nn.unbox(abstract_tree)
  return jax.tree.map(lambda s, x: NamedSharding(mesh, _fit_spec(s.spec, x.shape, mesh)),
                      shardings, shapes)


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """Sharding of a batch array: first dimension over ("data", "fsdp"), the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_shards(mesh: jax.sharding.Mesh) -> int:
  """How many ways a batch's first dimension is split."""
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
                 global_batch_size: int) -> dict[str, jax.Array]:
  """Stitches each process's rows (`global_batch_size // process_count` of them) into global arrays
  sharded by `batch_sharding(mesh)`."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v),
                                                    (global_batch_size,) + np.shape(v)[1:])
          for k, v in local_batch.items()}
