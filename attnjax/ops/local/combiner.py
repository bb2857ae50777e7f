"""Combiner-Fixed: full attention at O(L√L) as direct attention in the own block plus block summaries.

Combiner rewrites attention as a conditional expectation over a partition of each query's support
into its direct part Ω_i^0 and regions Ω_i^1..Ω_i^n, each region entering as one summary:

    A(x_i) = Σ_{j ∈ Ω_i^0} p(j | i) v_j + Σ_r p(Ω_i^r | i) Σ_{j ∈ Ω_i^r} q(j | Ω_i^r) v_j

with ONE softmax over the direct keys and the region summaries (logits `scale · q_i·k_j` and
`scale · q_i·k̄_r`). In Combiner-Fixed (the sparse-transformer "fixed" partition, the authors'
`sqrt_fixed_full`) the sequence is cut into aligned blocks of c tokens:

    Ω_i^0 = the block of i (causal: its keys j ≤ i)
    Ω_i^r = every other block r (causal: every earlier block r < block(i))
    k̄_r   = pool_{j ∈ r} k_j                                   (max, the default "identity-max")
    q̄_r   = pool_{j ∈ r} q_j
    ṽ_r   = Σ_{j ∈ r} softmax_j(scale · q̄_r·k_j) v_j            (q(j | Ω_r): the region's own attention)

so every key is reached from every query (full support) with c + L/c scores per query (c = √L gives
O(L√L)). Each summary is query-independent, so it is computed once per block.

Implementation (three `flex_attention` passes, all tiled by the `xla` path): (1) the summary values:
the pooled queries `q̄ [B, R, N, H]` attend to their block's keys; (2) the direct part: flex under the
contract's masks and "same block"; (3) the summary part: q against `k̄` (repeated to the query heads,
as ṽ has one summary per query head) with "other (earlier) block". (2) and (3) are disjoint key sets of
one softmax, so `merge_attention_states` of their (output, log-sum-exp) gives it exactly.

Interpretations: (a) non-causal, Ω_i^r ranges over the blocks other than i's, as the paper's
partition says (the authors' non-causal code path also scores the own block's summary, which double
counts it); (b) padded key slots (`kv_lengths`) are left out of the pools and the summaries, and a
block with no real key has no summary; the pooled query also skips them (padding tokens);
(c) `pooling="mean"` is the code's other summary. Self-attention over one whole sequence only: q̄_r
needs the queries of every earlier block, which a KV cache does not keep (no decoding), and the
blocks are cut over the packed row (no `segment_ids`).

Shapes: `q [B,T,N,H]`, `k [B,T,K,H]`, `v [B,T,K,h]` → `[B,T,N,h]`.
Paper: Ren, Dai, Dai, Chen, Yang, Leskovec, Schuurmans and Dai, "Combiner: Full Attention Transformer
with Sparse Computation Cost", arXiv:2107.05768 (section 4, Combiner-Fixed; authors' code
google-research/combiner, `approx_attention.sqrt_fixed_full`).
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core import flex
from attnjax.core import masks
from attnjax.core.contract import flex_with_contract, reject_causal_or_packing, valid_slots
from attnjax.core.merge import merge_attention_states
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["combiner_attention"]

_OP = "combiner_attention"
POOLINGS = ("max", "mean")


def _pool(x, real, pooling: str):
  """`x [B, R, c, heads, d]` pooled over c, skipping slots where `real [B, R, c]` is False."""
  where = real[..., None, None]
  if pooling == "max":
    pooled = jnp.max(jnp.where(where, x, -jnp.inf), axis=2)
    return jnp.where(jnp.isfinite(pooled), pooled, 0.0).astype(x.dtype)   # an empty block: masked later
  count = jnp.maximum(jnp.sum(real, axis=2), 1)[..., None, None]
  return (jnp.sum(jnp.where(where, x.astype(jnp.float32), 0.0), axis=2) / count).astype(x.dtype)


def combiner_attention(q: Query, k: Key, v: Value, *, causal: bool = False, segment_ids=None,
                       q_offset=0, kv_lengths: Optional[Lengths] = None,
                       scale: Optional[float] = None, implementation: Optional[str] = None,
                       block_size: int = 128, pooling: str = "max") -> Output:
  """Combiner-Fixed attention (see the module docstring): direct in-block attention and one summary
  per other (causal: earlier) block, under one softmax.

  Args:
    q, k, v: `[B,T,N,H]`, `[B,T,K,H]`, `[B,T,K,h]` (self-attention, T == S).
    block_size: c, the block length (√T gives the paper's O(T√T)).
    pooling: "max" (the paper's default) or "mean": how k̄_r and q̄_r summarize a block.
    Other keywords: the common contract (no `segment_ids`, `q_offset` 0).
  """
  B, T, S, N, K, H, h = checks.check_qkv(_OP, q, k, v)
  reject_causal_or_packing(_OP, causal=False, segment_ids=segment_ids,
                           why="the blocks and their summaries are cut over the whole row")
  if T != S or not checks.is_static_zero(q_offset):
    raise ValueError(f"{_OP}: self-attention over one whole sequence only (T == S, q_offset 0: the "
                     f"summaries need every block's queries); got T={T}, S={S}")
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f"{_OP}: `block_size` must be an int >= 1, got {block_size!r}")
  if pooling not in POOLINGS:
    raise ValueError(f"{_OP}: `pooling` must be one of {POOLINGS}, got {pooling!r}")
  c = int(block_size)
  R = -(-T // c)
  pad = R * c - T
  # Real slots: inside the sequence and below kv_lengths (the pools and summaries skip the rest).
  real = jnp.pad(valid_slots(B, T, kv_lengths), ((0, 0), (0, pad)))            # [B, R·c]
  padded = [jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v)]
  blocks = [x.reshape((B, R, c) + x.shape[2:]) for x in padded]
  real_blocks = real.reshape(B, R, c)
  q_bar = _pool(blocks[0], real_blocks, pooling)                                # [B, R, N, H]
  k_bar = _pool(blocks[1], real_blocks, pooling)                                # [B, R, K, H]
  has_key = jnp.any(real_blocks, axis=2)                                         # [B, R]

  # (1) ṽ_r: the pooled query of block r attends to the real keys of block r.
  def own_block(b, n, r, kv_idx):
    del n
    return (kv_idx // c == r) & real[b, kv_idx]

  v_tilde = flex.flex_attention(q_bar, padded[1], padded[2], mask_mod=own_block, scale=scale,
                                implementation=implementation)                  # [B, R, N, h]

  # (2) Direct part: the own block under the contract (causal keeps j <= i).
  out_direct, lse_direct = flex_with_contract(
      _OP, q, k, v, causal=causal, segment_ids=None, q_offset=0, kv_lengths=kv_lengths,
      scale=scale, implementation=implementation, mask_mod=masks.chunked(c), return_residuals=True)

  # (3) Summary part: one logit q_i·k̄_r per other (causal: earlier) block with a real key.
  def other_block(b, n, q_idx, r):
    del n
    own = q_idx // c
    return ((r < own) if causal else (r != own)) & has_key[b, r]

  k_bar_heads = jnp.repeat(k_bar, N // K, axis=2)                               # per query head
  out_summary, lse_summary = flex.flex_attention(
      q, k_bar_heads, v_tilde, mask_mod=other_block, scale=scale, implementation=implementation,
      return_residuals=True)
  out, _ = merge_attention_states([out_direct, out_summary], [lse_direct, lse_summary])
  return out.astype(q.dtype)


register(Mechanism(
    name="combiner_attention", fn=combiner_attention, family="sparse-trainable", seeds=(170,),
    paper="Combiner: Full Attention Transformer with Sparse Computation Cost", arxiv="2107.05768",
    # The summaries pool every block's queries: one whole self-attention sequence per call.
    patterns=frozenset({"self", "causal_self"}), decode=False, packed=False,
    complexity="O(T·(c + T/c))", defaults=dict(block_size=128, pooling="max"),
    example=dict(block_size=4)))
