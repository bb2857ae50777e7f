"""Normalized attention pooling (NAP): scores standardized across the keys in place of softmax.

    s_ij = scale · q_i·k_j                                  (scale 1: the authors' unscaled logits)
    μ_i  = mean_{j visible} s_ij        σ_i = sqrt(mean_{j visible} (s_ij - μ_i)²)
    w_ij = g_n · (s_ij - μ_i) / (σ_i + ε) + b_n              for visible j, 0 for hidden keys
    o_i  = Σ_j w_ij v_j

The weights are not confined to the probability simplex: they sum to b_n·N_i, may be negative, and
the output can leave the convex hull of the values, so a head can sum, subtract or ignore tokens
instead of averaging them. g_n (gain, init 1) and b_n (shift, init 0) are learned per head.

As in the authors' code (`NormalizeAttention` / `normalize_masked` in models.py of
github.com/OliverRichter/normalized-attention): the statistics run over the visible keys only (the
mask), the standard deviation is the population one (divided by the count) with ε = 1e-3 added to
it, hidden keys get weight 0 (the shift b_n too), and the logits are not divided by √H ("not needed
in NAP due to normalization afterwards"): `scale=None` means 1 here, and a given scale only matters
through ε. A row with a single visible key has σ = 0 and weight b_n; a row with none gives zeros.
The post-attention LayerNorm and GELU of the authors' layer belong to the block around it, not to
the weights, and are not part of this operator.

Streamable on flex attention with the unnormalized `identity` normalizer (`core.identity_weights`):
N_i from one pass of zero scores (`contract.visible_key_counts`), Σ_j s_ij from a second, the
variance Σ_j (s_ij - μ_i)² from a third (two-pass, no cancellation), and the output from a fourth
whose score_mod is w_ij. Every flex path serves it, the `xla` one with block skipping, and
gradients reach q, k, v, the gain and the shift through the statistics.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`; `gain`, `shift` `[N]` → `[B,T,N,h]`.
Paper: Richter and Wattenhofer, "Normalized Attention Without Probability Cage", arXiv:2005.09561.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import param_tables
from attnjax.core.identity_weights import IDENTITY, row_sums
from attnjax.registry import Mechanism, example_arrays, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, Value

__all__ = ["normalized_attention_pooling", "NAP_TABLE", "EPS"]

HeadScalars = Float[Array, "N"]

# The authors' epsilon, added to the standard deviation (normalize_masked in models.py).
EPS = 1e-3
_init = jax.nn.initializers
# (name, shape(N, K, H, h), shape in letters, init): see `attnjax.core.param_tables`. One gain and
# one bias per head, initialized to 1 and 0 as in the authors' NormalizeAttention layer.
NAP_TABLE = (
    ("gain", lambda N, K, H, h: (N,), "[N]", _init.ones),
    ("shift", lambda N, K, H, h: (N,), "[N]", _init.zeros),
)


def normalized_attention_pooling(q: Query, k: Key, v: Value, *, gain: HeadScalars,
                                 shift: HeadScalars, causal: bool = False, segment_ids=None,
                                 q_offset=0, kv_lengths: Optional[Lengths] = None,
                                 scale: Optional[float] = None,
                                 implementation: Optional[str] = None,
                                 eps: float = EPS) -> Output:
  """NAP: weights g·(s - μ_i)/(σ_i + ε) + b over each row's visible keys (see the module docstring)."""
  op = "normalized_attention_pooling"
  _, _, _, N, K, H, h = checks.check_qkv(op, q, k, v)
  param_tables.check_table(op, NAP_TABLE, {"gain": gain, "shift": shift}, N=N, K=K, H=H, h=h)
  scale = 1.0 if scale is None else scale
  masks = dict(causal=causal, segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths)
  stats = dict(scale=scale, implementation=implementation, **masks)
  count = jnp.maximum(contract.visible_key_counts(op, q, k, implementation=implementation,
                                                  **masks), 1.0)[..., None]         # [B, T, 1]
  mean = row_sums(op, q, k, **stats) / count                                          # [B, T, N]
  var = row_sums(op, q, k, score_mod=lambda s, b, n, qi, ki: jnp.square(s - mean[b, qi, n]),
                 **stats) / count
  # sqrt has an infinite slope at 0 (a row with one key): the inner where keeps gradients finite.
  some = var > 0
  std = jnp.where(some, jnp.sqrt(jnp.where(some, var, 1.0)), 0.0)
  den = std + eps
  # A row with one key has s - μ ≡ 0 (weight b_n): inv = 0 there gives the same weight and keeps
  # the gradient's ±g/ε terms, which cancel exactly, out of the float32 sums (1/ε = 1000).
  spread = (count > 1) & (den > 0)
  inv = jnp.where(spread, 1.0 / jnp.where(spread, den, 1.0), 0.0)
  g, b0 = jnp.asarray(gain, jnp.float32), jnp.asarray(shift, jnp.float32)

  def weights(s, b, n, qi, ki):
    # mean, inv are [B, T, N]; the indices broadcast as [B, ., ., T, .] with n the query head.
    return g[n] * (s - mean[b, qi, n]) * inv[b, qi, n] + b0[n]

  out = contract.flex_with_contract(op, q, k, v, score_mod=weights, normalizer=IDENTITY, **stats)
  return out.astype(q.dtype)


register(Mechanism(
    name="normalized_attention_pooling", fn=normalized_attention_pooling, family="softmax-variant",
    seeds=(242,), paper="Normalized Attention Without Probability Cage", arxiv="2005.09561",
    params=param_tables.param_specs(NAP_TABLE),
    # Gain and shift off their initial 1 and 0, so the suite sees both matter. The gain is small:
    # the weights are z-scores, not a distribution, so outputs grow like √N_i (the authors follow
    # the pooling with a LayerNorm), and the suite's gradient tolerances are absolute, sized for
    # O(1) outputs. The tests of this file check gain 1 against a float64 rewrite.
    example=lambda *, N: example_arrays(242, {"gain": ((N,), 0.25, 0.05),
                                              "shift": ((N,), 0.0, 0.05)})))
