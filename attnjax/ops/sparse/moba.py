"""MoBA: mixture of block attention, each query attending to its top-k key blocks.

Keys are split into blocks of `block_size` tokens. Query token t (absolute position p = q_offset + t)
scores every block by its gate, the dot product with the block's mean key,

    s_tj = q_t · mean(k_{j·B .. (j+1)·B - 1})          (the real keys of block j; padding excluded)

and attends, with one softmax, to the union of its `top_k` best blocks:

    I_t = {own(t)} ∪ top_{k-1}{ s_tj : j < own(t) }    own(t) = p // block_size
    o_t = Σ_{j ∈ keys of I_t, visible} softmax_j(scale · q_t·k_j) v_j

As in the authors' code (`moba_naive.py` of github.com/MoonshotAI/MoBA: the gate of a query's own
block is set to +inf and those of blocks not wholly in its past to -inf before `topk`), the own block
is always selected and counts as one of the `top_k`; causal attention applies inside it, and a block
that ends after the query is never selected. The gate is the unscaled q · mean(k) (the scale does not
change a ranking). Ties go to the lower block index. Each query head chooses its own blocks (GQA: the
head's key head's block means). Non-causal self-attention (`causal=False`) is the same rule with every
block a candidate (the own block still forced); the paper itself is causal. Selecting every block
(`top_k >= ceil(S / block_size)`) gives exactly full attention.

The selection is the table `selected [B, N, T, nb]` of `attnjax.core.sparse`. The attention runs, by
default (`implementation="gathered"`), as the authors' efficient form: the queries that chose each block
gathered into dense tiles and the partial results merged by log-sum-exp
(`attnjax.core.block_gather`), so the work is T·top_k blocks; `"xla"` / `"reference"` run
`flex_attention` under the traced `BlockMask` of the tiles any of whose queries chose the block.
Decoding over a KV cache equals the full forward (block means over the real keys, blocks by
absolute position). Packed documents are not supported: the authors' varlen code restarts the blocks
at each document, which global blocks only match when every document starts at a multiple of
`block_size`; pass separate rows instead.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`.
Paper: Lu et al., "MoBA: Mixture of Block Attention for Long-Context LLMs", arXiv:2502.13189.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import sparse
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["moba_attention", "moba_selection"]


def moba_selection(q: Query, k: Key, *, block_size: int, top_k: int, causal: bool = False,
                   q_offset=0, kv_lengths: Optional[Lengths] = None):
  """bool `[B, N, T, nb]`: the blocks each query token of each head attends to (see the module
  docstring): its own block, plus the `top_k - 1` best-gated earlier (causal) or other blocks."""
  B, T, S = q.shape[0], q.shape[1], k.shape[1]
  dims = dict(B=B, T=T, S=S, q_block=1, block_size=block_size)
  # The gate q · mean(k_block), unscaled as in the authors' code.
  gate = sparse.block_scores(q, sparse.pool_blocks(k, block_size, lengths=kv_lengths), scale=1.0)
  candidates = sparse.candidate_blocks(**dims, causal=causal, q_offset=q_offset, kv_lengths=kv_lengths)
  own = sparse.own_and_first(**dims, q_offset=q_offset, include=("own",))
  # +inf on the own block: it wins one of the top_k places, as in moba_naive.py.
  gate = jnp.where(own, jnp.inf, gate)
  return sparse.top_k_blocks(gate, top_k, candidates=candidates, always=own)


def moba_attention(q: Query, k: Key, v: Value, *, causal: bool = False, segment_ids=None,
                   q_offset=0, kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                   implementation: Optional[str] = None, block_size: int = 512,
                   top_k: int = 3) -> Output:
  """MoBA (see the module docstring): softmax attention over each query's own block and its top-k
  gated key blocks."""
  op = "moba_attention"
  B, T, S, _, _, _, _ = checks.check_qkv(op, q, k, v)
  for name, value, low in (("block_size", block_size, 1), ("top_k", top_k, 1)):
    if not isinstance(value, int) or value < low:
      raise ValueError(f"{op}: `{name}` must be an int >= {low}, got {value!r}")
  if segment_ids is not None:
    raise ValueError(f"{op}: packed sequences (`segment_ids`) are not supported (MoBA's blocks "
                     "restart at each document); pass documents as separate rows")
  contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths)
  selected = moba_selection(q, k, block_size=block_size, top_k=top_k, causal=causal,
                            q_offset=q_offset, kv_lengths=kv_lengths)
  return sparse.attend_selected(op, q, k, v, selected, q_block=1, block_size=block_size,
                                causal=causal, q_offset=q_offset, kv_lengths=kv_lengths,
                                scale=scale, implementation=implementation, per_query=top_k)


register(Mechanism(
    name="moba_attention", fn=moba_attention, family="sparse-trainable", seeds=(191,),
    paper="MoBA: Mixture of Block Attention for Long-Context LLMs", arxiv="2502.13189",
    patterns=frozenset({"self", "causal_self"}), packed=False,
    complexity="O(T·(S/block_size + top_k·block_size))",
    implementations=(sparse.GATHERED, "xla", "reference"),
    defaults=dict(block_size=512, top_k=3),
    example=dict(block_size=4, top_k=2)))
