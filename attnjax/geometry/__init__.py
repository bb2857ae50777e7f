"""Attention over point sets and group-valued poses, each a pure function of its inputs and weights
with a Flax Linen class, registered in `attnjax.modules` (kind "points"). Geometric sequence
mechanisms with per-token poses are in `attnjax.ops.geometric`.

  apes.py   APES (#180): attention-based edge sampling of point clouds (local N2P and global P2P)
"""

from attnjax.geometry import apes
from attnjax.geometry.apes import APESDownsample, apes_downsample, knn_indices

__all__ = ["APESDownsample", "apes", "apes_downsample", "knn_indices"]
