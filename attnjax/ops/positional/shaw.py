"""Relative position representations (Shaw, Uszkoreit and Vaswani): clipped relative-distance
embeddings added to the keys inside the logits and to the values inside the weighted sum.

    r(i, j) = clip(j - i, -c, c)                          i, j absolute positions
    e_ij    = scale · q_i·(k_j + a^K_{r(i,j)})             α_ij = softmax_j(e_ij)
    o_i     = Σ_j α_ij (v_j + a^V_{r(i,j)})

`rel_k: [2c+1, H]` and `rel_v: [2c+1, h]` are the learned tables w^K, w^V (row r + c for distance r),
shared by every head as in the paper (Section 3.3); the clipping distance c is read from their shape
(2c + 1 rows). Distances use absolute positions (a query at row t sits at `q_offset + t`), so a decode
step over a KV cache equals the full forward and packed documents see their own distances.

How it is computed (paper Section 3.3's efficient split, without its [T, T, H] embedding tensors):
  key term    q_i·a^K_r is a `[B, T, N, 2c+1]` table gathered by a score_mod: one flex pass gives the
              output Σ_j α_ij v_j and the log-normalizer lse_i;
  value term  Σ_j α_ij a^V_{r(i,j)} = Σ_r W_ir a^V_r with W_ir the weight mass of bucket r. The 2c - 1
              inner buckets hold one key each (j = i + r): their weights exp(e_ij - lse_i) come from
              the 2c - 1 gathered keys, O(T·c·H). The two edge buckets collect every key at distance
              ≥ c: their masses exp(lse^edge_i - lse_i) come from flex passes restricted to
              j ≤ i - c and j ≥ i + c (the second is skipped under `causal`, where it is empty).
Every pass streams (`xla`: tiles, block skipping, memory linear in length). The `reference` is a dense
float32 form: full weights, then the bucket sum by a gather of a^V per pair.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`, `rel_k [2c+1,H]`, `rel_v [2c+1,h]` → `[B,T,N,h]`.
Self-attention only (distances between a query's and a key's positions in one sequence).
Paper: Shaw, Uszkoreit and Vaswani, "Self-Attention with Relative Position Representations",
arXiv:1803.02155.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import flex
from attnjax.core import implementations
from attnjax.core import masks
from attnjax.core import param_tables
from attnjax.core.relative import (clipped_relative_index, query_position, relative_key_score_mod,
                                   relative_query_table)
from attnjax.registry import Mechanism, example_arrays, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, Value

__all__ = ["relative_position_attention", "SHAW_TABLE", "DEFAULT_MAX_DISTANCE"]

# The layer's clipping distance: k = 16 in the paper's experiments (its ablation over k finds little
# change for k ≥ 2). A table passed directly may have any odd number of rows.
DEFAULT_MAX_DISTANCE = 16

# Shapes in the signature (jaxtyping; letters of `attnjax.typing`, R = 2c + 1 table rows).
KeyTable = Float[Array, "R H"]
ValueTable = Float[Array, "R h"]

_glorot = jax.nn.initializers.glorot_uniform()
# (name, shape(N, K, H, h, c), shape in letters, init): see `attnjax.core.param_tables`.
SHAW_TABLE = (
    ("rel_k", lambda N, K, H, h, c=DEFAULT_MAX_DISTANCE: (2 * c + 1, H), "[2c+1, H]", _glorot),
    ("rel_v", lambda N, K, H, h, c=DEFAULT_MAX_DISTANCE: (2 * c + 1, h), "[2c+1, h]", _glorot),
)


def relative_position_attention(q: Query, k: Key, v: Value, *, rel_k: KeyTable,
                                rel_v: ValueTable, causal: bool = False, segment_ids=None,
                                q_offset=0, kv_lengths: Optional[Lengths] = None,
                                scale: Optional[float] = None,
                                implementation: Optional[str] = None) -> Output:
  """Shaw et al.'s relative position attention (see the module docstring)."""
  op = "relative_position_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  if jnp.ndim(rel_k) != 2 or jnp.shape(rel_k)[0] % 2 != 1:
    raise ValueError(f"{op}: `rel_k` must have shape [2c+1, H] = [odd, {H}], got {jnp.shape(rel_k)}")
  c = (rel_k.shape[0] - 1) // 2
  param_tables.check_table(op, SHAW_TABLE, {"rel_k": rel_k, "rel_v": rel_v}, N=N, K=K, H=H, h=h, c=c)
  contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths,
                                segment_ids=segment_ids)
  scale = H ** -0.5 if scale is None else scale
  # The key term: q_i·a^K_r for every bucket r, read per pair by the score_mod.
  table_qr = relative_query_table(q, rel_k)                                   # [B, T, N, 2c+1]
  score_mod = relative_key_score_mod(table_qr, lambda pos, j: clipped_relative_index(pos, j, c),
                                     q_offset=q_offset, scale=scale)
  mask_mod = contract.contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset,
                                    segment_ids=segment_ids, kv_lengths=kv_lengths, op=op)
  out = implementations.dispatch(op, _IMPLEMENTATIONS, implementation, q, k, v, rel_v, c=c,
                                 table_qr=table_qr, score_mod=score_mod, mask_mod=mask_mod,
                                 causal=causal, q_offset=q_offset, scale=scale)
  return out.astype(q.dtype)


def _streamed(q, k, v, rel_v, *, c, table_qr, score_mod, mask_mod, causal, q_offset, scale):
  """Flex passes (output, lse, edge-bucket masses) plus the gathered inner buckets."""
  B, T, N, _ = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K

  def call(values, extra_mask=None):
    return flex.flex_attention(q, k, values, score_mod=score_mod,
                               mask_mod=masks.combine_masks(mask_mod, extra_mask), scale=scale,
                               return_residuals=True, implementation="xla")

  out, lse = call(v)
  empty = jnp.logical_not(jnp.isfinite(lse))
  lse = jnp.where(empty, 0.0, lse)                                              # [B, T, N]
  no_values = jnp.zeros(k.shape[:3] + (1,), q.dtype)   # the edge passes need only their lse

  def edge_mass(edge):
    _, lse_edge = call(no_values, edge)
    return jnp.exp(lse_edge - lse)                # lse_edge = -inf when the edge holds no key

  pos_of = lambda b, qi: query_position(q_offset, b, qi)
  mass = [jnp.zeros((B, T, N), jnp.float32) for _ in range(2 * c + 1)]
  mass[0] = edge_mass(lambda b, n, qi, ki: ki <= pos_of(b, qi) - c)
  if not causal:
    # With c = 0 the one bucket takes both sides: j ≥ i + 1 keeps j = i out of the second pass.
    mass[2 * c] = mass[2 * c] + edge_mass(lambda b, n, qi, ki: ki >= pos_of(b, qi) + max(c, 1))
  if c > 0:
    # Inner buckets r = -c+1 .. c-1: key j = i + r, weight exp(e_ij - lse_i) where visible.
    d = jnp.arange(-c + 1, c, dtype=jnp.int32)                                 # [D]
    pos = contract.query_positions(B, T, q_offset)                            # [B, T]
    j = pos[:, :, None] + d                                                   # [B, T, D]
    jc = jnp.clip(j, 0, S - 1)
    visible = (j >= 0) & (j < S)
    if mask_mod is not None:
      b = jnp.arange(B)[:, None, None]
      t = jnp.arange(T, dtype=jnp.int32)[None, :, None]
      visible = visible & mask_mod(b, 0, t, jc)
    kg = jax.vmap(lambda kb, jb: kb[jb])(k.astype(jnp.float32), jc)           # [B, T, D, K, H]
    qg = q.astype(jnp.float32).reshape(B, T, K, G, -1)
    s = jnp.einsum("btkgh,btdkh->btkgd", qg, kg).reshape(B, T, N, -1) * scale
    s = s + scale * table_qr[..., 1:2 * c]                                   # rows r + c
    s = jnp.where(visible[:, :, None, :], s, -jnp.inf)
    inner = jnp.exp(s - lse[..., None])                                       # [B, T, N, D]
    for r in range(1, 2 * c):
      mass[r] = mass[r] + inner[..., r - 1]
  weights = jnp.stack(mass, axis=-1)                                          # [B, T, N, 2c+1]
  value_term = jnp.einsum("btnr,rh->btnh", weights, rel_v.astype(jnp.float32))
  return out.astype(jnp.float32) + value_term


def _dense(q, k, v, rel_v, *, c, table_qr, score_mod, mask_mod, causal, q_offset, scale):
  """Dense float32 reference: every weight α_ij, then Σ_j α_ij (v_j + a^V_{r(i,j)})."""
  del table_qr, causal  # in score_mod and mask_mod
  B, T, N, _ = q.shape
  S, K = k.shape[1], k.shape[2]
  w, _ = flex.attention_weights(q, k, score_mod=score_mod, mask_mod=mask_mod, scale=scale)
  vf = jnp.repeat(v.astype(jnp.float32), N // K, axis=2)                     # [B, S, N, h]
  pos = contract.query_positions(B, T, q_offset)
  r = clipped_relative_index(pos[:, :, None], jnp.arange(S, dtype=jnp.int32), c)   # [B, T, S]
  av = rel_v.astype(jnp.float32)[r]                                           # [B, T, S, h]
  return jnp.einsum("bnts,bsnh->btnh", w, vf) + jnp.einsum("bnts,btsh->btnh", w, av)


_IMPLEMENTATIONS = (
    ("xla", _streamed, ()),
    ("reference", _dense, ()),
)


def _example(*, N, K, H, h):
  # c = 3 at the conformance lengths (19, 23): most pairs lie beyond c, in the edge buckets.
  del N, K
  return example_arrays(71, {"rel_k": ((7, H), 0.0, 0.5), "rel_v": ((7, h), 0.0, 0.5)})


register(Mechanism(
    name="relative_position_attention", fn=relative_position_attention, family="positional",
    seeds=(71,), paper="Self-Attention with Relative Position Representations", arxiv="1803.02155",
    patterns=frozenset({"self", "causal_self"}), params=param_tables.param_specs(SHAW_TABLE),
    example=_example))
