"""Landmark attention: a landmark token closes each block; other blocks are reached through it.

Blocks are `block_size` consecutive positions whose last one is the block's landmark token (the
authors insert a landmark after every `block_size - 1` tokens; here the caller's sequence already
holds them, at the absolute positions p with p mod block_size = block_size - 1). For a query at
absolute position p in block c = p // block_size, with s_j = scale · q·k_j under the call contract:

    bucket   = {regular tokens j ≤ p of block c} ∪ {landmarks ℓ_β of the earlier blocks β < c}
    w_j      = e^{s_j} / Σ_{i∈bucket} e^{s_i}                          j a regular token of block c
    g_β      = e^{s_ℓβ} / Σ_{i∈bucket} e^{s_i}                         the landmark's gate
    w_j      = g_β · e^{s_j} / Σ_{i regular in β} e^{s_i}              j a regular token of block β < c
    w_ℓ      = 0                                                       landmarks carry no value
    o        = Σ_j w_j v_j

(the grouped softmax of the authors' `landmark_grouped_softmax`, github.com/epfml/landmark-attention,
`models/landmark.py`: its groups are the bucket and each earlier block's regular tokens; the current
block's landmark is hidden, also from the landmark query itself). Each row sums to 1 (the bucket's
softmax does); with a single block (no landmark before the query) it is the causal softmax.

Inference retrieval (`top_k`): each query head keeps, per query, its `top_k` earlier blocks by
landmark score q·k_ℓβ (the authors' `cache_selection_method="per_token_and_head"`) and applies the
same grouped softmax to its own block plus those blocks; `top_k=None` (or ≥ the earlier blocks) keeps
all, which is the training form. The authors also re-position retrieved blocks for long contexts;
positions are applied outside this contract, so none is done here.

The per-(query, block) normalizers make this a dense computation (materializes `[B, N, T, S]`):
the reference implementation only. Causal self-attention only (the grouped softmax is defined by the
causal block structure); positions are absolute, so decoding over a KV cache (`q_offset`,
`kv_lengths`) equals the full forward. Packed sequences are not supported (blocks are aligned to
absolute positions, not to documents).

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`. Paper: Mohtashami and Jaggi,
"Landmark Attention: Random-Access Infinite Context Length for Transformers", arXiv:2305.16300.
"""

from __future__ import annotations

from typing import Optional

import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import dense
from attnjax.core import sparse
from attnjax.registry import Mechanism, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, Value

__all__ = ["landmark_attention", "landmark_weights"]

OP = "landmark_attention"
Weights = Float[Array, "B N T S"]


def _exp_where(mask, x):
  """`e^x` where `mask`, else 0, with no exp (nor gradient) of a hidden entry."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, x, 0.0)), 0.0)


def landmark_weights(q: Query, k: Key, *, q_offset=0, kv_lengths: Optional[Lengths] = None,
                     scale: Optional[float] = None, block_size: int = 64,
                     top_k: Optional[int] = None) -> Weights:
  """The grouped-softmax weights `[B, N, T, S]` float32 of landmark attention (module docstring):
  causal self-attention of queries at `q_offset + t` over keys `[B, S, K, H]`."""
  if not isinstance(block_size, int) or block_size < 2:
    raise ValueError(f"{OP}: `block_size` must be an int >= 2 (a block holds its landmark and at "
                     f"least one token), got {block_size!r}")
  B, T, S, N, _, _, _ = checks.check_qkv(OP, q, k, k)
  s, visible = dense.contract_scores(OP, q, k, k, causal=True, q_offset=q_offset,
                                     kv_lengths=kv_lengths, scale=scale)
  own = (contract.query_positions(B, T, q_offset) // block_size)[:, None, :, None]   # [B,1,T,1]
  j = jnp.arange(S)
  blk = (j // block_size)[None, None, None, :]
  is_landmark = (j % block_size == block_size - 1)[None, None, None, :]
  current = visible & (blk == own) & ~is_landmark
  earlier = visible & (blk < own)
  nb = sparse.num_blocks(S, block_size)
  if top_k is not None:
    # Rank the earlier blocks by their landmark's score (a block whose landmark is past S is never
    # an earlier block of a query below S).
    pad = nb * block_size - S
    lm_s = jnp.pad(s, ((0, 0), (0, 0), (0, 0), (0, pad)))[..., block_size - 1::block_size]
    lm_ok = jnp.pad(earlier & is_landmark, ((0, 0), (0, 0), (0, 0), (0, pad)))[
        ..., block_size - 1::block_size]
    chosen = sparse.top_k_blocks(lm_s, top_k, candidates=lm_ok)                   # [B,N,T,nb]
    earlier = earlier & jnp.take(chosen, j // block_size, axis=-1)
  landmarks = earlier & is_landmark
  regular = earlier & ~is_landmark
  bucket = current | landmarks
  lse_bucket = dense.masked_logsumexp(s, bucket)                                  # [B,N,T,1]
  # Each earlier block's regular tokens: their own softmax, scaled by the landmark's bucket weight.
  pad = nb * block_size - S
  grouped = lambda x, fill: jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, pad)),
                                    constant_values=fill).reshape(B, N, T, nb, block_size)
  s_blocks, regular_blocks = grouped(s, 0.0), grouped(regular, False)
  lse_group = dense.masked_logsumexp(s_blocks, regular_blocks)                    # [B,N,T,nb,1]
  gate_logit = s_blocks[..., -1:] - lse_bucket[..., None]                         # landmark column
  gate_ok = grouped(landmarks, False)[..., -1:]
  w_blocks = _exp_where(regular_blocks & gate_ok, s_blocks - lse_group + gate_logit)
  w_earlier = w_blocks.reshape(B, N, T, nb * block_size)[..., :S]
  return w_earlier + _exp_where(current, s - lse_bucket)


def landmark_attention(q: Query, k: Key, v: Value, *, causal: bool = True, segment_ids=None,
                       q_offset=0, kv_lengths: Optional[Lengths] = None,
                       scale: Optional[float] = None, implementation: Optional[str] = None,
                       block_size: int = 64, top_k: Optional[int] = None) -> Output:
  """Landmark attention (see the module docstring): the grouped softmax over the current block and
  the earlier blocks' landmarks, each earlier block's tokens weighted by its landmark."""
  checks.check_implementation(OP, implementation, ("reference",))
  checks.check_qkv(OP, q, k, v)
  if not causal:
    raise ValueError(f"{OP}: causal self-attention only (the grouped softmax follows the causal "
                     "block structure)")
  if segment_ids is not None:
    raise ValueError(f"{OP}: packed sequences (`segment_ids`) are not supported (blocks and "
                     "landmarks sit at absolute positions)")
  contract.check_self_attention(OP, T=q.shape[1], S=k.shape[1], q_offset=q_offset,
                                kv_lengths=kv_lengths)
  w = landmark_weights(q, k, q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                       block_size=block_size, top_k=top_k)
  return dense.weighted_values(w, v).astype(q.dtype)


register(Mechanism(
    name=OP, fn=landmark_attention, family="sparse-trainable", seeds=(228,),
    paper="Landmark Attention: Random-Access Infinite Context Length for Transformers",
    arxiv="2305.16300", patterns=frozenset({"causal_self"}), decode=True, packed=False,
    implementations=("reference",), complexity="O(T·S)", defaults=dict(block_size=64),
    example=dict(block_size=4, top_k=2)))
