"""HiP: hierarchically pruned attention, a tree search for each query block's top-k key blocks.

Keys are grouped into blocks of `block_size` (b_k) tokens; queries into units of `q_block` (b_q)
tokens. For each unit of each head, over the n key blocks it may see (causal: up to its last query;
`kv_lengths`: below the length):

  1. split the n blocks into 2k contiguous chunks (boundaries ⌊j·n / 2k⌋, j = 0..2k);
  2. score each chunk by its representative key, the centre token of its tokens (the lower middle,
     ⌊(a + c - 1) / 2⌋ for tokens [a, c)): the largest `q · k_rep` over the unit's queries;
  3. keep the k best chunks, halve each (the first half takes the extra block), score the 2k halves
     and keep the k best again, until every kept chunk is a single key block;
  4. attend with one softmax to the kept blocks (block-sparse attention under the call contract).

Empty chunks (n < 2k) score -inf and are never kept, so with k ≥ n every block is kept: exact
attention. The search costs O(k · log(n / k)) representative scores per unit: O(T log T) time.
Interpretations: the paper scores a branch by one representative (the centre token) and prunes per
query block; the score of a block of queries is taken as the maximum over its queries. Attention
sinks and a sliding window (HiP's later serving options) are not added.

Selection uses absolute positions; with `q_block = 1` (each query its own unit, as HiP's decoding)
decoding over a KV cache equals the full forward. Packed documents are not supported (the key
blocks are global). The selection table runs on `flex_attention` through the traced `BlockMask` of
`attnjax.core.sparse.selection_mask` (the `xla` path visits only kept tiles).

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`.
Paper: Lee et al., "HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention
Pruning" (later "A Training-Free Sub-quadratic Cost Transformer Model Serving Framework with
Hierarchically Pruned Attention"), arXiv:2406.09827.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import sparse
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["hip_attention", "hip_selection", "hip_iterations"]


def hip_iterations(num_key_blocks: int, top_k: int) -> int:
  """Halvings after the first 2k-way split until every chunk of `num_key_blocks` is one block."""
  width, steps = -(-num_key_blocks // (2 * top_k)), 0
  while width > 1:
    width, steps = (width + 1) // 2, steps + 1
  return steps


def _chunk_scores(q_units, k, starts, ends, span, block_size: int):
  """Max over each unit's queries of q · k_rep, the centre key of chunk [starts, ends) (blocks),
  clipped to the unit's `span` tokens; -inf for an empty chunk. Shapes: q_units `[B, U, qb, N, H]`,
  starts/ends `[B, N, U, C]`, span `[B, U]` → `[B, N, U, C]` float32."""
  B, U, _, N, H = q_units.shape
  G = N // k.shape[2]
  first = starts * block_size
  last = jnp.minimum(ends * block_size, span[:, None, :, None])
  rep = jnp.clip((first + last - 1) // 2, 0, k.shape[1] - 1)
  b = jnp.arange(B)[:, None, None, None]
  head = (jnp.arange(N) // G)[None, :, None, None]
  k_rep = k.astype(jnp.float32)[b, rep, head]                                # [B, N, U, C, H]
  s = jnp.einsum("buqnh,bnuch->bnucq", q_units, k_rep)
  return jnp.where(last > first, jnp.max(s, axis=-1), -jnp.inf)


def hip_selection(q: Query, k: Key, *, block_size: int, top_k: int, q_block: int = 1,
                  causal: bool = False, q_offset=0, kv_lengths: Optional[Lengths] = None):
  """bool `[B, N, U, nb]` (U = ceil(T / q_block), nb = ceil(S / block_size)): the key blocks HiP's
  tree search keeps for each query unit of each head (see the module docstring)."""
  B, T, N, H = q.shape
  S = k.shape[1]
  nb = sparse.num_blocks(S, block_size)
  U = sparse.num_blocks(T, q_block)
  lengths = contract.lengths_or_full("hip_attention", kv_lengths, B, S)
  span = jnp.broadcast_to(lengths[:, None], (B, U))                           # tokens a unit sees
  if causal:
    pos = contract.query_positions(B, T, q_offset)
    last = jnp.pad(pos, ((0, 0), (0, U * q_block - T)), mode="edge").reshape(B, U, q_block)[..., -1]
    span = jnp.minimum(span, last + 1)
  span = jnp.clip(span, 0, S)
  n = -(-span // block_size)                                                  # [B, U] blocks
  qf = jax.lax.stop_gradient(q.astype(jnp.float32))
  # Edge-padded queries repeat the unit's last query: they do not change its maximum.
  q_units = jnp.pad(qf, ((0, 0), (0, U * q_block - T), (0, 0), (0, 0)), mode="edge")
  q_units = q_units.reshape(B, U, q_block, N, H)
  kf = jax.lax.stop_gradient(k)
  bounds = (jnp.arange(2 * top_k + 1)[None, None] * n[..., None]) // (2 * top_k)  # [B, U, 2k+1]
  starts = jnp.broadcast_to(bounds[:, None, :, :-1], (B, N, U, 2 * top_k))
  ends = jnp.broadcast_to(bounds[:, None, :, 1:], (B, N, U, 2 * top_k))
  for step in range(hip_iterations(nb, top_k) + 1):
    if step:  # halve every kept chunk: [s, e) → [s, m), [m, e), m = s + ceil((e - s) / 2)
      mid = starts + (ends - starts + 1) // 2
      starts = jnp.concatenate([starts, mid], axis=-1)
      ends = jnp.concatenate([mid, ends], axis=-1)
    scores = _chunk_scores(q_units, kf, starts, ends, span, block_size)
    top, idx = jax.lax.top_k(scores, min(top_k, scores.shape[-1]))
    kept = jnp.isfinite(top)
    starts = jnp.where(kept, jnp.take_along_axis(starts, idx, axis=-1), 0)
    ends = jnp.where(kept, jnp.take_along_axis(ends, idx, axis=-1), 0)
  # Every kept chunk is now one block [s, s + 1) (an empty one has s = e = 0).
  chosen = (starts[..., None] == jnp.arange(nb)) & (ends > starts)[..., None]
  return jnp.any(chosen, axis=-2)


def hip_attention(q: Query, k: Key, v: Value, *, causal: bool = False, segment_ids=None,
                  q_offset=0, kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                  implementation: Optional[str] = None, block_size: int = 64, top_k: int = 8,
                  q_block: int = 1) -> Output:
  """HiP (see the module docstring): softmax attention over the key blocks a hierarchical top-k
  search keeps for each query block."""
  op = "hip_attention"
  B, T, S, _, _, _, _ = checks.check_qkv(op, q, k, v)
  for name, value in (("block_size", block_size), ("top_k", top_k), ("q_block", q_block)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{op}: `{name}` must be a positive int, got {value!r}")
  if segment_ids is not None:
    raise ValueError(f"{op}: packed sequences (`segment_ids`) are not supported (the key blocks "
                     "are global); pass documents as separate rows")
  selected = hip_selection(q, k, block_size=block_size, top_k=top_k, q_block=q_block,
                           causal=causal, q_offset=q_offset, kv_lengths=kv_lengths)
  return sparse.attend_selected(op, q, k, v, selected, q_block=q_block, block_size=block_size,
                                causal=causal, q_offset=q_offset, kv_lengths=kv_lengths,
                                scale=scale, implementation=implementation)


register(Mechanism(
    name="hip_attention", fn=hip_attention, family="sparse-inference", seeds=(84,),
    paper="HiP Attention: Sparse Sub-Quadratic Attention with Hierarchical Attention Pruning",
    arxiv="2406.09827", packed=False,
    complexity="O(T·top_k·(log(S / block_size)·H + block_size·H))",
    defaults=dict(block_size=64, top_k=8, q_block=1),
    example=dict(block_size=2, top_k=2, q_block=1)))
