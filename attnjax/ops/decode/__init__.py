"""Decode-phase mechanisms (queries over a KV cache).

  split_k.py  split_k_decode: split-K attention over the key axis with an exact log-sum-exp merge
              (Sanovar et al., "Lean Attention", arXiv:2405.10480).
  slim.py     slim_attention: only keys are cached, values are K · W_K⁻¹W_V; slim_kv_map
              (Graef and Wasielewski, "Slim attention", arXiv:2503.05840).
  round.py    round_attention: attention over the top-k dialogue rounds and the current one;
              select_rounds (Tang et al., "Round Attention", arXiv:2502.15294).

Importing this package registers the mechanisms.
"""

from attnjax.ops.decode.round import round_attention, select_rounds
from attnjax.ops.decode.slim import slim_attention, slim_kv_map
from attnjax.ops.decode.split_k import split_k_decode

__all__ = ["round_attention", "select_rounds", "slim_attention", "slim_kv_map", "split_k_decode"]
