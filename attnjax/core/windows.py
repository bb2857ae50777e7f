"""Non-overlapping windows on a token grid (`attnjax.core.grid`): which window a token is in (Swin's
shifted windows included), the relative offset of two tokens of a window, and window reductions of a
key/value stream (average pooling, a strided convolution).

Windows of size `w_a` tile each grid axis `a` from the origin; a side that is not a multiple of `w_a`
ends in a smaller window (what zero-padding the map to a multiple and masking the padded tokens out
gives). A cyclic shift `s_a` (Swin's SW-MSA: roll the map by `-s_a`, partition, mask tokens of
different original regions apart, roll back) is, on the original coordinates, the same tiling started
at `s_a - w_a` instead of 0:

    window_a(c) = (c + (w_a - s_a) mod w_a) // w_a          tokens attend iff equal on every axis

(after the roll, the last window along an axis holds the map's last `w_a - s_a` rows and its first
`s_a` rows; Swin's region mask keeps those two apart, which is exactly the two edge windows above).
Inside one window the rolled and original coordinates differ by a constant, so relative offsets, and
Swin's relative position bias, read the same on the original coordinates.

  window_index       per-axis window index of (traced) coordinates
  window_mask        mask_mod: the query's and the key's tokens lie in one window
  relative_bias_mod  score_mod adding Swin's relative position bias `table[idx(Δh, Δw), n]`
  reduce_windows     `[B, S, K, D]` → one vector per window: masked mean, or a strided convolution
  window_settings    validated per-axis grid shape, window sizes and shifts

Swin: Liu et al., "Swin Transformer: Hierarchical Vision Transformer using Shifted Windows",
arXiv:2103.14030.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp

from attnjax.core import contract
from attnjax.core import grid
from attnjax.core.relative import query_position

__all__ = ["window_index", "window_mask", "relative_bias_mod", "bias_table_window", "num_windows",
           "reduce_windows", "window_settings"]


def window_index(coord, window: int, shift: int = 0):
  """Index of the window holding coordinate `coord` on one axis (windows of `window`, tiling shifted
  by `shift` as in Swin's SW-MSA; see the module docstring)."""
  return (coord + (window - shift) % window) // window


def window_mask(spatial_shape: Sequence[int], window: Sequence[int], shift: Sequence[int],
                *, offset=0, starts: Optional[jax.Array] = None):
  """mask_mod: the query (at absolute position `offset + q_idx`) and the key lie in one window of
  the grid `spatial_shape` (per-axis `window` sizes and `shift`s). `starts` `[B, S]` (1-D only):
  each token's document start, so windows restart at every packed document."""
  shape, window, shift = tuple(spatial_shape), tuple(window), tuple(shift)

  def mask_mod(b, n, q_idx, kv_idx):
    del n
    q_pos, kv_pos = query_position(offset, b, q_idx), kv_idx
    if starts is not None:
      q_pos, kv_pos = q_pos - starts[b, q_idx], kv_pos - starts[b, kv_idx]
    q_coords, kv_coords = grid.coordinates(q_pos, shape), grid.coordinates(kv_pos, shape)
    keep = None
    for qc, kc, w, s in zip(q_coords, kv_coords, window, shift, strict=True):
      same = window_index(qc, w, s) == window_index(kc, w, s)
      keep = same if keep is None else jnp.logical_and(keep, same)
    return keep

  return mask_mod


def bias_table_window(op: str, table, num_heads: int) -> int:
  """C for a Swin relative position bias `table [(2C-1)^2, N]` (covers windows up to C x C)."""
  rows = jnp.shape(table)[0] if jnp.ndim(table) == 2 else -1
  side = int(math.isqrt(max(rows, 0)))
  if jnp.ndim(table) != 2 or side * side != rows or side % 2 != 1 or table.shape[1] != num_heads:
    raise ValueError(f"{op}: `relative_position_bias` must have shape [(2C-1)^2, N] (Swin's table "
                     f"for windows up to C x C) with N = {num_heads}, got {jnp.shape(table)}")
  return (side + 1) // 2


def relative_bias_mod(table, spatial_shape: Sequence[int], *, offset=0):
  """score_mod adding Swin's relative position bias: `s + table[(Δ_0 + C-1)(2C-1) + Δ_1 + C-1, n]`
  with `Δ = coords(query) - coords(key)` on a 2-D grid (a 1-D grid is the grid (1, L)); `table`
  `[(2C-1)^2, N]` float32. Offsets are clipped into the table (pairs of one window of at most C x C
  never are; the clip only keeps masked pairs' lookups in range)."""
  shape = tuple(spatial_shape)
  if len(shape) == 1:
    shape = (1,) + shape
  side = int(math.isqrt(table.shape[0]))
  c = (side + 1) // 2

  def score_mod(score, b, n, q_idx, kv_idx):
    q_coords = grid.coordinates(query_position(offset, b, q_idx), shape)
    kv_coords = grid.coordinates(kv_idx, shape)
    idx = [jnp.clip(qc - kc, 1 - c, c - 1) + c - 1
           for qc, kc in zip(q_coords, kv_coords, strict=True)]
    return score + table[idx[0] * side + idx[1], n]

  return score_mod


def num_windows(spatial_shape: Sequence[int], window: Sequence[int]) -> int:
  """Windows tiling the grid from the origin (a partial window at each far edge counts)."""
  return math.prod(-(-d // w) for d, w in zip(spatial_shape, window, strict=True))


def reduce_windows(x: jax.Array, spatial_shape: Sequence[int], window: Sequence[int], *,
                   kernel: Optional[jax.Array] = None, kv_lengths=None
                   ) -> tuple[jax.Array, jax.Array]:
  """One vector per window of `x [B, S, K, D]` on the grid `spatial_shape` (S tokens, row-major),
  windows in row-major order (those of `window_mask` with no shift).

  `kernel=None`: the mean over the window's real tokens (average pooling; a partial window at an
  edge averages the tokens it has: `AvgPool(ceil_mode=True, count_include_pad=False)`).
  `kernel [P, K, D, E]` (P = prod(window), offsets in row-major order inside the window): the strided
  convolution `Σ_p kernel[p, k] x_{window, p}` per key/value head k (kernel = stride = window),
  missing tokens contributing zero. Slots at or past `kv_lengths` count as missing.

  Returns `(reduced [B, W, K, D or E] float32, lengths [B] int32)`: W = `num_windows`, and the number
  of windows holding a real token, which are the first ones in row-major window order (the real
  slots are a prefix of the row-major tokens, and a window's first token grows with its index).
  """
  B, S, K, D = x.shape
  shape, window = tuple(spatial_shape), tuple(window)
  d = len(shape)
  counts_per_axis = [-(-n // w) for n, w in zip(shape, window, strict=True)]
  x = contract.zero_padded(x, kv_lengths)
  real = contract.valid_slots(B, S, kv_lengths).astype(jnp.float32)

  def windows_of(a, trailing):
    a = a.reshape((B,) + shape + trailing)
    pad = [(0, 0)] + [(0, c * w - n) for c, w, n in zip(counts_per_axis, window, shape, strict=True)]
    a = jnp.pad(a, pad + [(0, 0)] * len(trailing))
    split = [B]
    for c, w in zip(counts_per_axis, window, strict=True):
      split += [c, w]
    a = a.reshape(tuple(split) + trailing)
    # [B, c_0, w_0, c_1, w_1, ...] -> [B, c_0, c_1, ..., w_0, w_1, ..., *trailing]
    order = [0] + [1 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)]
    order += list(range(1 + 2 * d, 1 + 2 * d + len(trailing)))
    a = a.transpose(order)
    return a.reshape((B, math.prod(counts_per_axis), math.prod(window)) + trailing)

  xw = windows_of(x, (K, D))                      # [B, W, P, K, D]
  counts = windows_of(real, ()).sum(-1)           # [B, W] real tokens per window
  if kernel is None:
    reduced = xw.sum(2) / jnp.maximum(counts, 1.0)[..., None, None]
  else:
    reduced = jnp.einsum("bwpkd,pkde->bwke", xw, kernel.astype(jnp.float32))
  return reduced, jnp.sum(counts > 0, axis=1).astype(jnp.int32)


def window_settings(op: str, spatial_shape, length: int, window_size, shift=0
                    ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
  """`(spatial_shape, window, shift)` as per-axis int tuples, validated: the grid holds `length`
  tokens (None: a 1-D sequence), every window >= 1 and every shift in [0, window)."""
  shape = grid.check_spatial_shape(op, spatial_shape, length)
  window = grid.per_axis(window_size, len(shape), op, "window_size")
  shifts = grid.per_axis(shift, len(shape), op, "shift")
  if any(w < 1 for w in window):
    raise ValueError(f"{op}: `window_size` must be >= 1 on every axis, got {window_size!r}")
  if any(not 0 <= s < w for s, w in zip(shifts, window, strict=True)):
    raise ValueError(f"{op}: `shift` must lie in [0, window_size) on every axis, got shift "
                     f"{shift!r} for window_size {window_size!r}")
  return shape, window, shifts
