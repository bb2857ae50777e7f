"""Tokens laid out on an N-D grid: the coordinates a `mask_mod` or `score_mod` reads from flat indices.

A sequence of `L = prod(spatial_shape)` tokens is a grid `spatial_shape = (H, W)` (an image) or
`(T, H, W)` (a video) in row-major order: token `i` sits at `unravel(i)`, the last axis fastest, as
`x.reshape(B, *spatial_shape, C)` lays it out. Local and window mechanisms compare the coordinates of
a query and a key (inside their window or not; their offset for a relative bias), so one helper
turns the flat `q_idx` / `kv_idx` a mask_mod receives (any broadcastable int arrays, traced or not)
into per-axis coordinates. `spatial_shape=None` means a 1-D sequence of the call's length.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

__all__ = ["check_spatial_shape", "coordinates", "flat_index", "per_axis"]


def check_spatial_shape(op: str, spatial_shape: Optional[Sequence[int]], length: int,
                        *, argument: str = "spatial_shape", max_dims: int = 3) -> tuple[int, ...]:
  """`spatial_shape` as a tuple of positive ints whose product is `length` (None: `(length,)`).
  Raises a short error naming `op` and `argument` otherwise."""
  if spatial_shape is None:
    return (int(length),)
  shape = tuple(spatial_shape) if isinstance(spatial_shape, (tuple, list)) else None
  if (shape is None or not 1 <= len(shape) <= max_dims
      or not all(isinstance(d, (int, np.integer)) and d > 0 for d in shape)):
    raise ValueError(f"{op}: `{argument}` must be a tuple of 1 to {max_dims} positive ints, got "
                     f"{spatial_shape!r}")
  shape = tuple(int(d) for d in shape)
  if int(np.prod(shape)) != length:
    raise ValueError(f"{op}: `{argument}` {shape} holds {int(np.prod(shape))} tokens but the "
                     f"sequence has {length}")
  return shape


def coordinates(index, spatial_shape: Sequence[int]) -> tuple:
  """Row-major coordinates `(c_0, ..., c_{d-1})` of flat token indices `index` (int array, any
  shape) on a grid `spatial_shape`; each has `index`'s shape."""
  index = jnp.asarray(index)
  coords = []
  for size in reversed(tuple(spatial_shape)[1:]):
    coords.append(index % size)
    index = index // size
  coords.append(index)
  return tuple(reversed(coords))


def flat_index(coords: Sequence, spatial_shape: Sequence[int]):
  """The inverse of `coordinates`: the row-major flat index of per-axis coordinates."""
  index = jnp.asarray(coords[0])
  for c, size in zip(coords[1:], tuple(spatial_shape)[1:], strict=True):
    index = index * size + c
  return index


def per_axis(value, ndim: int, op: str, argument: str) -> tuple[int, ...]:
  """An int (the same on every axis) or a sequence of `ndim` ints, as a tuple of `ndim` ints (e.g. a
  window size, stride or dilation per grid axis)."""
  if isinstance(value, (int, np.integer)):
    return (int(value),) * ndim
  values = tuple(value) if isinstance(value, (tuple, list)) else None
  if values is None or len(values) != ndim or not all(isinstance(v, (int, np.integer)) for v in values):
    raise ValueError(f"{op}: `{argument}` must be an int or {ndim} ints (one per grid axis), got "
                     f"{value!r}")
  return tuple(int(v) for v in values)
