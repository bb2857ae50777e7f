"""Softmax attention within aligned blocks of the sequence, as a batch of small problems.

    out[b, t] = softmax_j(scale · q[b, t] · k[b, j]) v[b, j],   j in t's block  [⌊t/c⌋c, ⌊t/c⌋c + c)

(with `causal`, only j <= t), for a full forward (T == S, queries at positions 0..T-1). The sequence
is padded to a multiple of the block length c and folded into the batch, `[B, T] -> [B·⌈T/c⌉, c]`,
so the cost is O(T·c) with no `[T, T]` intermediate; `kv_lengths` become per-block lengths. Used by
the mechanisms whose attention is confined to chunks or segments (Mega's chunked attention, Infini-
attention's local segments); a call with packed documents, a cache offset or T != S uses the masked
flex form instead (`attnjax.core.masks.chunked`).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import contract
from attnjax.core import flex

__all__ = ["block_local_attention"]


def block_local_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, block: int, causal: bool,
                          kv_lengths: Optional[jax.Array], scale: Optional[float],
                          op: str = "block_local_attention") -> jax.Array:
  """Softmax attention within aligned blocks of `block` positions (formula in the module docstring).

  Args:
    q: `[B, T, N, H]`; k: `[B, T, K, H]`; v: `[B, T, K, h]` (self-attention, T == S).
    block: the block length c >= 1 (the last block may be shorter).
    causal: hide keys after the query within its block.
    kv_lengths: `[B]` valid lengths or None; positions at or past a length are hidden.
    scale: the logit scale (None: `H ** -0.5`).
    op: the calling operator's name, for error messages.

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  B, T, N, _ = q.shape
  nb = -(-T // block)
  pad = nb * block - T
  fold = lambda x: jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).reshape(
      (B * nb, block) + x.shape[2:])
  lengths = contract.lengths_or_full(op, kv_lengths, B, T)
  starts = jnp.arange(nb, dtype=jnp.int32) * block
  block_lengths = jnp.clip(lengths[:, None] - starts[None], 0, block).reshape(B * nb)
  mask = contract.contract_mask(B=B * nb, T=block, S=block, causal=causal,
                                kv_lengths=block_lengths, op=op)
  out = flex.flex_attention(fold(q), fold(k), fold(v), mask_mod=mask, scale=scale,
                            implementation="xla")
  return out.reshape(B, nb * block, N, -1)[:, :T]
