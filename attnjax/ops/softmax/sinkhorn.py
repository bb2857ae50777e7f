"""Sinkhorn attention (OTSeg's Multi-Prompts Sinkhorn Attention): the softmax's row normalization
replaced by Sinkhorn's alternating row and column normalizations, toward an entropic optimal-transport
plan between the queries and the keys with uniform marginals.

    L_ij = s_ij / ε         s_ij = scale · q_i·k_j     (or cos(q_i, k_j) with `cosine=True`)
    f = 0, g = 0; repeat `iterations` times:
      g_j = log b_j - log Σ_i e^{L_ij + f_i}            (columns toward b: keys)
      f_i = log a_i - log Σ_j e^{L_ij + g_j}            (rows toward a: queries)
    f_i = log a_i - log Σ_j e^{L_ij + g_j}              (a no-op after an iteration; softmax at 0)
    P_ij = e^{L_ij + f_i + g_j},   o_i = Σ_j P_ij v_j

over the visible pairs, in the log domain (log-sum-exp) as in the authors' `Sinkhorn_log_exp_sum`.
The loop is theirs: potentials from zero, the key side first, then the query side, so every row of
P sums exactly to a_i and, as the iterations converge, every column to b_j. Marginals: a_i = 1 for
each query (P is row-stochastic, an attention; `unit_rows=False` gives the authors' plan of total
mass 1 instead, a_i = 1/T', b_j = 1/S', the output divided by T') and b_j = T'/S' for each visible
key, T' queries and S' visible keys (keys past `kv_lengths` are outside both marginals; a query with
no visible key gets zeros). `iterations=0` is softmax(s/ε).

OTSeg's decoder (github.com/cubeyoung/OTSeg, `models/decode_heads/decode_seg.py`, `AttentionOT`)
uses text-prompt queries against pixel keys with L2-normalized q and k, cost 1 - cos(q_i, k_j)
(the constant 1 cancels in the normalizations), ε = 0.05, up to 100 iterations (stopping early once
the key potentials move by less than 1e-6; a fixed count here, which agrees once converged) and
multiplies the values by the plan itself: `sinkhorn_attention(q, k, v, cosine=True, epsilon=0.05,
unit_rows=False)`. The defaults instead keep the dot-product logits (ε = 1: softmax's temperature)
and row-stochastic weights, Sinkformer's convention (Sander et al., arXiv:2110.11773).

Gradients go through the iterations (as the authors' autograd does), each iteration rematerialized
in the backward pass (`jax.checkpoint`), so memory holds one score matrix plus the potentials of
every iteration. Reference-only: every column sum needs every query, so this is a dense float32
form (`core.dense`), O(iterations·T·S). For the same reason it is not causal (a doubly-stochastic
plan on a causal triangle is forced toward the diagonal, not an attention), does not decode over a
KV cache (a new query changes the earlier rows), and takes no packed sequences: self and cross
attention only, as OTSeg's cross-attention and Sinkformer's encoder self-attention.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`; one transport problem per example
and query head (GQA: query head n reads key/value head n // (N/K)).
Paper: Kim, Oh and Ye, "OTSeg: Multi-prompt Sinkhorn Attention for Zero-Shot Semantic Segmentation",
arXiv:2403.14183 (ECCV 2024).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import dense
from attnjax.core.feature_maps import unit_rows as _unit
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["sinkhorn_attention", "ITERATIONS"]

_F32 = jnp.float32
# The authors' iteration cap (`max_iter = 100` in `Sinkhorn_log_exp_sum`).
ITERATIONS = 100


def _rows(L, visible, g, row_has):
  """f_i = log a_i - log Σ_j e^{L_ij + g_j} with a_i = 1 (0 where the row sees nothing)."""
  lse = dense.masked_logsumexp(L + g[..., None, :], visible, axis=-1)[..., 0]
  return jnp.where(row_has, -lse, 0.0)


def _columns(L, visible, f, col_has, log_b):
  """g_j = log b_j - log Σ_i e^{L_ij + f_i} (0 where no query sees the key)."""
  lse = dense.masked_logsumexp(L + f[..., :, None], visible, axis=-2)[..., 0, :]
  return jnp.where(col_has, log_b - lse, 0.0)


def sinkhorn_attention(q: Query, k: Key, v: Value, *, causal: bool = False, segment_ids=None,
                       q_offset=0, kv_lengths: Optional[Lengths] = None,
                       scale: Optional[float] = None, implementation: Optional[str] = None,
                       iterations: int = ITERATIONS, epsilon: float = 1.0, cosine: bool = False,
                       unit_rows: bool = True) -> Output:
  """Sinkhorn attention: an entropic transport plan between queries and keys (see the module)."""
  op = "sinkhorn_attention"
  checks.check_qkv(op, q, k, v)
  checks.check_implementation(op, implementation, ("reference",))
  contract.reject_causal_or_packing(
      op, causal=causal, segment_ids=segment_ids,
      why="its column normalization couples every query of the sequence")
  if not isinstance(iterations, (int, np.integer)) or iterations < 0:
    raise ValueError(f"{op}: `iterations` must be an int >= 0, got {iterations!r}")
  if not epsilon > 0:
    raise ValueError(f"{op}: `epsilon` (the entropic regularization) must be > 0, got {epsilon}")
  if cosine:
    if scale is not None:
      raise ValueError(f"{op}: `cosine=True` scores cos(q, k) with no logit scale (set `epsilon`); "
                       f"got scale={scale}")
    q, k, scale = _unit(q.astype(_F32)), _unit(k.astype(_F32)), 1.0
  s, visible = dense.contract_scores(op, q, k, v, q_offset=q_offset, kv_lengths=kv_lengths,
                                     scale=scale)
  L = jnp.where(visible, s / epsilon, 0.0)
  row_has = jnp.any(visible, axis=-1)                                   # [B, N, T]
  col_has = jnp.any(visible, axis=-2)                                   # [B, N, S]
  n_rows = jnp.sum(row_has, axis=-1, keepdims=True).astype(_F32)       # T'
  n_cols = jnp.maximum(jnp.sum(col_has, axis=-1, keepdims=True), 1).astype(_F32)  # S'
  log_b = jnp.log(jnp.maximum(n_rows, 1.0)) - jnp.log(n_cols)          # b_j = T'/S'

  @jax.checkpoint
  def iteration(potentials, _):
    f, _ = potentials
    g = _columns(L, visible, f, col_has, log_b)
    return (_rows(L, visible, g, row_has), g), None

  f = jnp.zeros(row_has.shape, _F32)
  g = jnp.zeros(col_has.shape, _F32)
  (f, g), _ = jax.lax.scan(iteration, (f, g), None, length=int(iterations))
  f = _rows(L, visible, g, row_has)
  plan = jnp.where(visible, jnp.exp(L + f[..., :, None] + g[..., None, :]), 0.0)
  if not unit_rows:
    plan = plan / jnp.maximum(n_rows, 1.0)[..., None]
  return dense.weighted_values(plan, v).astype(q.dtype)


register(Mechanism(
    name="sinkhorn_attention", fn=sinkhorn_attention, family="softmax-variant", seeds=(162,),
    paper="OTSeg: Multi-prompt Sinkhorn Attention for Zero-Shot Semantic Segmentation",
    arxiv="2403.14183", patterns=frozenset({"self", "cross"}), decode=False, packed=False,
    implementations=("reference",), complexity="O(iterations·T·S)"))
