"""Attention that pools a sequence into a few vectors (sentence embeddings): functions outside the
registry's q, k, v contract, which have no per-token queries and return M vectors per sequence.

  dynamic_routing.py     dynamic_self_attention_pooling, Dynamic Self-Attention's routing-by-
                         agreement weights over words (arXiv:1808.07383).
  low_rank_multihead.py  low_rank_multihead_pooling, LAMA's M distributions from a low-rank bilinear
                         affinity against a global context vector (arXiv:1912.00835).

Each function declares the catalog rows it serves (`attnjax.catalog.serves`).
"""

from attnjax.ops.pooling.dynamic_routing import dynamic_self_attention_pooling
from attnjax.ops.pooling.low_rank_multihead import low_rank_multihead_pooling, parameter_counts

__all__ = ["dynamic_self_attention_pooling", "low_rank_multihead_pooling", "parameter_counts"]
