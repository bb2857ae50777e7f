"""Decode-phase mechanisms (queries over a KV cache).

  split_k.py  split_k_decode: split-K attention over the key axis with an exact log-sum-exp merge
              (Sanovar et al., "Lean Attention", arXiv:2405.10480).

Importing this package registers the mechanisms.
"""

from attnjax.ops.decode.split_k import split_k_decode

__all__ = ["split_k_decode"]
