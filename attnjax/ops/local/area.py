"""Area attention (YOLOv12's A2): self-attention inside l equal areas of the feature map.

The feature map of L = prod(spatial_shape) tokens is cut into `l = num_areas` equal areas by
reshaping along one spatial axis (YOLOv12's `qk.reshape(B * area, N // area, C)` over the row-major
flattened map: horizontal strips), and plain softmax attention runs inside each area:

    area(i) = ⌊p(i) · l / L⌋                 p(i): token i's index in the order with `axis` slowest
    o_i = Σ_{j: area(j) = area(i)} softmax_j(scale · q_i·k_j) v_j

`axis=0` is the reference code's split (the flattened row-major order, p(i) = i); another axis splits
across that axis (vertical strips for `axis=1` of an (H, W) map: the map transposed so that axis is
slowest, then reshaped). When l divides L this is exactly the reshape of the reference code; for
other lengths the areas are the nearest equal split (sizes ⌊L/l⌋ or ⌈L/l⌉), an extension that lets the
operator take any length. The receptive field stays large (an area is L/l tokens, a whole strip of
the image) while the cost drops from L² to L²/l, with no window partition or position bias.

Shapes: `q [B,T,N,H]`, `k [B,T,K,H]`, `v [B,T,K,h]` → `[B,T,N,h]` (self-attention over one map;
`kv_lengths` hides padded keys; areas are cut over the whole length T).
Implementation: one `flex_attention` pass whose `mask_mod` is "same area" (a static block mask, so the
`xla` path visits only the tiles inside the areas).

Interpretation: the catalog's row 232 is YOLOv12's area attention (not Li et al.'s "Area Attention",
arXiv:1810.10126, which pools keys over contiguous spans). The reference code's 7×7 depthwise
"position perceiver" on v and the output projection belong to the surrounding module, not to the
attention operator.

Paper: Tian, Ye and Doermann, "YOLOv12: Attention-Centric Real-Time Object Detectors",
arXiv:2502.12524 (section 3.2, "Area Attention").
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from attnjax.core import checks
from attnjax.core import grid
from attnjax.core.contract import flex_with_contract, reject_causal_or_packing
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["area_attention", "area_index"]

_OP = "area_attention"


def area_index(index, spatial_shape: Sequence[int], num_areas: int, axis: int = 0):
  """The area (0..l-1) of flat row-major token indices `index` (any int array, traced or not) on a
  grid `spatial_shape` cut into `num_areas` equal areas across `axis`."""
  shape = tuple(spatial_shape)
  length = int(np.prod(shape))
  if axis == 0:
    position = index
  else:
    coords = grid.coordinates(index, shape)
    # Order with `axis` slowest, the other axes row-major after it (the map transposed, flattened).
    order = (axis,) + tuple(d for d in range(len(shape)) if d != axis)
    position = grid.flat_index([coords[d] for d in order], [shape[d] for d in order])
  return (position * num_areas) // length


def area_attention(q: Query, k: Key, v: Value, *, causal: bool = False, segment_ids=None,
                   q_offset=0, kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                   implementation: Optional[str] = None, num_areas: int = 4,
                   spatial_shape: Optional[Sequence[int]] = None, axis: int = 0) -> Output:
  """Area attention: softmax attention inside `num_areas` equal strips of the map (module docstring).

  Args:
    q, k, v: `[B,T,N,H]`, `[B,T,K,H]`, `[B,T,K,h]`: self-attention over one feature map.
    num_areas: l, the number of areas (YOLOv12 uses 4; 1 is full attention).
    spatial_shape: the map's grid (row-major), e.g. (H, W); None: a 1-D sequence of length T.
    axis: the spatial axis the areas cut across (0: the reference code's reshape).
    Other keywords: the common contract (non-causal, unpacked: the areas cut the whole map).
  """
  B, T, S, _, _, _, _ = checks.check_qkv(_OP, q, k, v)
  reject_causal_or_packing(_OP, causal=causal, segment_ids=segment_ids,
                           why="the areas split a whole, non-causal feature map")
  if T != S or not checks.is_static_zero(q_offset):
    raise ValueError(f"{_OP}: self-attention over one map only (T == S, q_offset 0); got T={T}, "
                     f"S={S}")
  shape = grid.check_spatial_shape(_OP, spatial_shape, T)
  if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not 0 <= axis < len(shape):
    raise ValueError(f"{_OP}: `axis` must be an int in [0, {len(shape)}) for spatial_shape {shape}, "
                     f"got {axis!r}")
  if (isinstance(num_areas, bool) or not isinstance(num_areas, (int, np.integer))
      or not 1 <= num_areas <= T):
    raise ValueError(f"{_OP}: `num_areas` must be an int in [1, T={T}], got {num_areas!r}")
  num_areas, axis = int(num_areas), int(axis)

  def same_area(b, n, q_idx, kv_idx):
    del b, n
    return area_index(q_idx, shape, num_areas, axis) == area_index(kv_idx, shape, num_areas, axis)

  return flex_with_contract(_OP, q, k, v, causal=False, segment_ids=None, q_offset=0,
                            kv_lengths=kv_lengths, scale=scale, implementation=implementation,
                            mask_mod=same_area)


register(Mechanism(
    name="area_attention", fn=area_attention, family="local-window", seeds=(232,),
    paper="YOLOv12: Attention-Centric Real-Time Object Detectors", arxiv="2502.12524",
    # A vision encoder's attention over one whole map: the areas depend on the map's full length, so
    # there is no causal, cross, packed or cached form.
    patterns=frozenset({"self"}), decode=False, packed=False, complexity="O(T²/l)",
    defaults=dict(num_areas=4), example=dict(num_areas=3)))
