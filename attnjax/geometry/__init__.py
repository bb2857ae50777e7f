"""Attention over point sets and group-valued poses, each a pure function of its inputs and weights
with a Flax Linen class, registered in `attnjax.modules` (kind "points"). Geometric sequence
mechanisms with per-token poses are in `attnjax.ops.geometric`.

  apes.py                APES (#180): attention-based edge sampling of point clouds (N2P, P2P)
  geometric_algebra.py   geometric algebra attention (#209): rotation-invariant pair products
"""

from attnjax.geometry import apes
from attnjax.geometry import geometric_algebra
from attnjax.geometry.apes import APESDownsample, apes_downsample, knn_indices
from attnjax.geometry.geometric_algebra import (GeometricAlgebraAttention,
                                                geometric_algebra_attention, pair_invariants)

__all__ = ["APESDownsample", "GeometricAlgebraAttention", "apes", "apes_downsample",
           "geometric_algebra", "geometric_algebra_attention", "knn_indices", "pair_invariants"]
