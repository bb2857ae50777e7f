"""Disentangled attention (DeBERTa): content and relative position scored separately.

    δ(i, j) = clamp(bucket(i - j) + k, 0, 2k - 1)                 i, j absolute positions
    s_ij    = scale · (Q_i·K_j  +  Q_i·K^r_{δ(i,j)}  +  K_j·Q^r_{δ(i,j)})
              content→content   content→position     position→content
    o_i     = Σ_j softmax_j(s_ij) v_j                              scale = 1/sqrt(3H) by default

`pos_q: [2k, N, H]` and `pos_k: [2k, K, H]` are the projected relative position embeddings Q^r, K^r
per head. In the paper they are P W_{q,r} and P W_{k,r} of one table P: [2k, D] shared by the layers
(DeBERTa-v3 projects P with the layer's own W_q, W_k: `share_att_key`); here each layer takes the
projected arrays directly, which every such product is (only the tie of P across layers is not kept).
k, the number of position buckets (`position_buckets` in the authors' code), is read from their shape.

The index convention is the authors' code (microsoft/DeBERTa, `disentangled_attention.py` and
`da_utils.py`), which trained the released models: c2p gathers Q_i·K^r at clamp(bucket(i - j) + k) and
p2c gathers K_j·Q^r at clamp(-bucket(j - i) + k), the same row since the buckets are odd in the
distance. (The paper's text writes the p2c index as δ(j, i) with δ(i, j) = i - j + k; the code's
p2c reads row i - j + k.) `bucket` is `make_log_bucket_position`: exact for |d| ≤ k/2, then
logarithmic, `sign(d)·(ceil(log(|d|/m) / log((M-1)/m) · (m-1)) + m)` with m = k/2 and
M = `max_relative_positions`, computed in float64 as the authors' numpy code does (a table over
|d| ≤ M, beyond which every distance clamps to the edge rows). `log_buckets=False` is DeBERTa v1's
plain clipping, bucket(d) = d (then k = `max_relative_positions` in their terms).

Both position terms are `[B, L, N, 2k]` tables (Q·K^r over queries, K·Q^r over keys) read by a
score_mod, so every `flex_attention` path serves the mechanism (`xla`: tiles and block skipping, memory
linear in length); decode over a KV cache equals the full forward (absolute positions) and packed
documents see their own distances.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`, `pos_q [2k,N,H]`, `pos_k [2k,K,H]` →
`[B,T,N,h]`. Self-attention only.
Paper: He, Liu, Gao and Chen, "DeBERTa: Decoding-enhanced BERT with Disentangled Attention",
arXiv:2006.03654.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import param_tables
from attnjax.core.relative import query_position, relative_query_table
from attnjax.registry import Mechanism, example_arrays, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, Value

__all__ = ["disentangled_attention", "log_bucket_position", "DEBERTA_TABLE",
           "DEFAULT_POSITION_BUCKETS", "DEFAULT_MAX_RELATIVE_POSITIONS"]

# DeBERTa-v3's configuration: 256 position buckets over relative positions up to 512.
DEFAULT_POSITION_BUCKETS = 256
DEFAULT_MAX_RELATIVE_POSITIONS = 512

# Shapes in the signature (jaxtyping; letters of `attnjax.typing`, R = 2k rows).
QueryPositions = Float[Array, "R N H"]
KeyPositions = Float[Array, "R K H"]

# The projected embeddings start at the scale of the layer's queries and keys (unit entries), as
# P W_r does in DeBERTa (layer-normed P, projections of the content projections' init).
_normal = jax.nn.initializers.normal(1.0)
# (name, shape(N, K, H, h, k), shape in letters, init): see `attnjax.core.param_tables`.
DEBERTA_TABLE = (
    ("pos_q", lambda N, K, H, h, k=DEFAULT_POSITION_BUCKETS: (2 * k, N, H), "[2k, N, H]", _normal),
    ("pos_k", lambda N, K, H, h, k=DEFAULT_POSITION_BUCKETS: (2 * k, K, H), "[2k, K, H]", _normal),
)


def _bucket_magnitudes(position_buckets: int, max_relative_positions: int) -> np.ndarray:
  """`bucket(d)` for d = 0 .. M (int32 `[M + 1]`), float64 as `make_log_bucket_position`."""
  mid = position_buckets // 2
  d = np.arange(max_relative_positions + 1)
  abs_pos = np.where(d < mid, mid - 1, d)
  with np.errstate(divide="ignore", invalid="ignore"):   # log(0) where mid = 1: not selected
    log_pos = np.ceil(np.log(abs_pos / mid) / np.log((max_relative_positions - 1) / mid)
                      * (mid - 1)) + mid
  return np.where(abs_pos <= mid, d, log_pos).astype(np.int32)


def log_bucket_position(relative_pos, *, position_buckets: int = DEFAULT_POSITION_BUCKETS,
                        max_relative_positions: int = DEFAULT_MAX_RELATIVE_POSITIONS,
                        log_buckets: bool = True):
  """DeBERTa's bucket of an integer relative position `i - j` (any shape; int32 out), before the clamp
  to `[-k, k - 1]` that indexing applies: exact up to k/2, logarithmic up to `max_relative_positions`,
  and equal to that of `max_relative_positions` beyond it once clamped (see the module docstring)."""
  d = jnp.asarray(relative_pos, jnp.int32)
  if not log_buckets:
    return d
  table = jnp.asarray(_bucket_magnitudes(position_buckets, max_relative_positions))
  return jnp.sign(d) * table[jnp.minimum(jnp.abs(d), max_relative_positions)]


def disentangled_attention(q: Query, k: Key, v: Value, *, pos_q: QueryPositions,
                           pos_k: KeyPositions, causal: bool = False, segment_ids=None,
                           q_offset=0, kv_lengths: Optional[Lengths] = None,
                           scale: Optional[float] = None,
                           max_relative_positions: int = DEFAULT_MAX_RELATIVE_POSITIONS,
                           log_buckets: bool = True, implementation: Optional[str] = None) -> Output:
  """DeBERTa's disentangled attention c2c + c2p + p2c (see the module docstring)."""
  op = "disentangled_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  if jnp.ndim(pos_q) != 3 or jnp.shape(pos_q)[0] % 2 or jnp.shape(pos_q)[0] == 0:
    raise ValueError(f"{op}: `pos_q` must have shape [2k, N, H] = [even, {N}, {H}], got "
                     f"{jnp.shape(pos_q)}")
  buckets = pos_q.shape[0] // 2
  param_tables.check_table(op, DEBERTA_TABLE, {"pos_q": pos_q, "pos_k": pos_k}, N=N, K=K, H=H, h=h,
                           k=buckets)
  if log_buckets and (buckets % 2 or max_relative_positions <= buckets // 2 + 1):
    raise ValueError(f"{op}: log buckets need an even number of buckets k (rows of `pos_q` / 2, got "
                     f"{buckets}) and `max_relative_positions` > k/2 + 1 (got "
                     f"{max_relative_positions}); or pass log_buckets=False")
  contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths,
                                segment_ids=segment_ids)
  # Both position terms take the same 1/sqrt(3H) as the content term (scale_factor 3 in the code).
  scale = (3 * H) ** -0.5 if scale is None else scale
  G = N // K
  c2p = relative_query_table(q, pos_k, heads_axis=1)                             # [B, T, N, 2k]
  kp = jnp.einsum("bskh,rkgh->bskgr", k.astype(jnp.float32),
                  pos_q.astype(jnp.float32).reshape(2 * buckets, K, G, H))
  p2c = kp.reshape(B, S, N, 2 * buckets)                                        # [B, S, N, 2k]

  def score_mod(s, b, n, q_idx, kv_idx):
    # Indices broadcast as [B, ., ., T, .]: b batch, n query head, q_idx query row, kv_idx key slot.
    d = query_position(q_offset, b, q_idx) - kv_idx                            # i - j
    bucket = log_bucket_position(d, position_buckets=buckets,
                                 max_relative_positions=max_relative_positions,
                                 log_buckets=log_buckets)
    r = jnp.clip(bucket + buckets, 0, 2 * buckets - 1)
    return s + scale * (c2p[b, q_idx, n, r] + p2c[b, kv_idx, n, r])

  return contract.flex_with_contract(op, q, k, v, causal=causal, segment_ids=segment_ids,
                                     q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                                     implementation=implementation, score_mod=score_mod)


def _example(*, N, K, H, h):
  # k = 8 buckets: exact up to distance 4, log buckets beyond, reached at the conformance lengths.
  del h
  return example_arrays(163, {"pos_q": ((16, N, H), 0.0, 0.5), "pos_k": ((16, K, H), 0.0, 0.5)})


register(Mechanism(
    name="disentangled_attention", fn=disentangled_attention, family="positional", seeds=(163,),
    paper="DeBERTa: Decoding-enhanced BERT with Disentangled Attention", arxiv="2006.03654",
    patterns=frozenset({"self", "causal_self"}), params=param_tables.param_specs(DEBERTA_TABLE),
    example=_example))
