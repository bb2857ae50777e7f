"""Attention over point sets and group-valued poses, each a pure function of its inputs and weights
with a Flax Linen class, registered in `attnjax.modules` (kind "points"). Geometric sequence
mechanisms with per-token poses are in `attnjax.ops.geometric`.

  apes.py                APES (#180): attention-based edge sampling of point clouds (N2P, P2P)
  geometric_algebra.py   geometric algebra attention (#209): rotation-invariant pair products
  gravnet.py             GravNetNorm (#51): a Gaussian kernel over neighbours in a learned space
"""

from attnjax.geometry import apes
from attnjax.geometry import geometric_algebra
from attnjax.geometry import gravnet
from attnjax.geometry.apes import APESDownsample, apes_downsample, knn_indices
from attnjax.geometry.geometric_algebra import (GeometricAlgebraAttention,
                                                geometric_algebra_attention, pair_invariants)
from attnjax.geometry.gravnet import GravNetNorm, gravnet_norm, learned_space_weights

__all__ = ["APESDownsample", "GeometricAlgebraAttention", "GravNetNorm", "apes",
           "apes_downsample", "geometric_algebra", "geometric_algebra_attention", "gravnet",
           "gravnet_norm", "knn_indices", "learned_space_weights", "pair_invariants"]
