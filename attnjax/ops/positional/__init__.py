"""Positional transforms applied to queries and keys before a mechanism (not mechanisms themselves).

  rope.py  rotary position embedding, half-split convention (Su et al., "RoFormer",
           arXiv:2104.09864); `attnjax.nn.MultiHeadAttention` applies it when `rope_base` is set.
"""

from attnjax.ops.positional.rope import (apply_rope, rope_frequencies, rotary_dim,
                                         segment_positions)

__all__ = ["apply_rope", "rope_frequencies", "rotary_dim", "segment_positions"]
