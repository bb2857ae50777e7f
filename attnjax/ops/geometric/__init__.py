"""Geometric attention: sequence mechanisms whose tokens carry poses or positions on a manifold."""

from attnjax.ops.geometric import gta  # noqa: F401
from attnjax.ops.geometric import spherical  # noqa: F401
