"""Graph-family sequence mechanisms: attention read as a graph over the tokens (GIN-Attention, #192).
Attention over explicit edge lists is `attnjax.graph`."""

from attnjax.ops.graph import gin_attention  # noqa: F401
