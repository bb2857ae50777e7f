"""Length-scaled softplus attention (LSSA) and its re-weighting (LSSAR).

    ŝ_ij = q_i·k_j / (‖q_i‖ ‖k_j‖)                              cosine scores in [-1, 1]
    a_ij = softplus(λ_i ŝ_ij) / Σ_{j visible} softplus(λ_i ŝ_ij)     λ_i = log d · log N_i
    LSSA:   o_i = Σ_j a_ij v_j
    LSSAR:  w_ij = relu(N_i a_ij - O_i)^p / Σ_j relu(N_i a_ij - O_i)^p,   o_i = Σ_j w_ij v_j

The exponential of softmax is replaced by softplus (numerically tame, nonzero everywhere) and the
l1 normalization kept; the scale factor log d · log N_i grows with the number of keys N_i a row
normalizes over (entropy invariance), and the re-weighting sharpens the distribution: N_i a_ij is 1
for a uniform row, so subtracting O_i = 1 and rectifying keeps only the keys above the row's mean
weight, and the power p (the paper uses 3 and 15) pushes the row toward its maximum before it is
renormalized.

What the paper fixes and what is interpreted here (final arXiv version, ICML 2026, as summarized by
the paper notes and a public re-implementation, the authors' freeatten code not being at hand):
- Q and K rows are L2-normalized and no 1/√d is applied; λ_i = log d · log N_i with d the head dim
  H. `scale` replaces the constant log d (default log H).
- N_i is the paper's matrix N whose i-th row holds i, the number of tokens row i attends to. Here it
  is the number of keys the row sees under the contract's masks (one flex pass,
  `contract.visible_key_counts`): i + 1 for causal query i, a document's own prefix when packed, the
  filled cache when decoding, all S keys for a bidirectional row.
- O is all ones except its first three rows, set to 0 "to avoid early training instability"; here
  the rows that see at most three keys get O_i = 0 (the first three rows of a causal sequence or
  document), so decoding and packed documents equal the full forward.
- `reweight_power=None` gives LSSA, a number p >= 1 gives LSSAR. A row with no key above its mean
  weight (a uniform row with O_i = 1) has no weight left and gives zeros.

Streamable on flex attention, every path (the `xla` one with block skipping) serves both forms:
softplus(x) = exp(log softplus(x)), so a_ij is flex's softmax of the score_mod log softplus(λ_i ŝ_ij),
whose log-sum-exp residual is L_i = log Σ_j softplus(λ_i ŝ_ij). The re-weighting is a second pass:
with y_ij = log(N_i a_ij) = log softplus(λ_i ŝ_ij) - L_i + log N_i, relu(N_i a_ij - 1)^p =
exp(p · log expm1(y_ij)) where y_ij > 0 (else 0), again a softmax of a score_mod, never forming
x^p (no overflow at p = 15). A row with no visible key gives zeros.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`.
Paper: Gao, Spratling and Gionfrida, "Softplus Attention with Re-weighting Boosts Length
Extrapolation in Large Language Models", arXiv:2501.13428.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core.feature_maps import unit_rows
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["softplus_length_scaled_attention", "log_softplus", "OFFSET_FREE_ROWS"]

# Rows that see at most this many keys get no offset O_i (the paper's first three rows of O are 0).
OFFSET_FREE_ROWS = 3
# Below this, softplus(x) = e^x (1 - e^x / 2 + ...): log softplus(x) = x to float32 precision.
_LINEAR_BELOW = -20.0


def log_softplus(x: jax.Array) -> jax.Array:
  """`log(softplus(x))` with a finite value and gradient for every finite x (softplus underflows
  to 0 near x = -104 in float32, where its log would be -inf and its gradient NaN)."""
  small = x < _LINEAR_BELOW
  return jnp.where(small, x, jnp.log(jax.nn.softplus(jnp.where(small, 0.0, x))))


def softplus_length_scaled_attention(q: Query, k: Key, v: Value, *, causal: bool = False,
                                     segment_ids=None, q_offset=0,
                                     kv_lengths: Optional[Lengths] = None,
                                     scale: Optional[float] = None,
                                     implementation: Optional[str] = None,
                                     reweight_power: Optional[float] = None) -> Output:
  """LSSA: l1-normalized softplus of log d · log N_i-scaled cosine scores; LSSAR with
  `reweight_power` p: relu(N_i a - 1)^p renormalized (see the module docstring)."""
  op = "softplus_length_scaled_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  if reweight_power is not None and not reweight_power >= 1:
    raise ValueError(f"{op}: `reweight_power` must be None (LSSA) or a power p >= 1 (LSSAR; the "
                     f"paper uses 3 and 15), got {reweight_power!r}")
  masks = dict(causal=causal, segment_ids=segment_ids, q_offset=q_offset, kv_lengths=kv_lengths)
  # N_i: keys row i normalizes over (an empty row counts 1: log 1 = 0, finite; it gives zeros).
  counts = contract.visible_key_counts(op, q, k, implementation=implementation, **masks)  # [B, T]
  log_n = jnp.log(jnp.maximum(counts, 1.0))
  lam = (math.log(H) if scale is None else scale) * log_n                             # [B, T]
  qn, kn = unit_rows(q.astype(jnp.float32)), unit_rows(k.astype(jnp.float32))

  def call(values, **kw):
    return contract.flex_with_contract(op, qn, kn, values, scale=1.0,
                                       implementation=implementation, **masks, **kw)

  def lssa_logits(s, b, n, qi, ki):
    # lam is [B, T]; the indices broadcast as [B, ., ., T, .].
    return log_softplus(lam[b, qi] * s)

  if reweight_power is None:
    return call(v, score_mod=lssa_logits).astype(q.dtype)

  # Pass 1 only for L_i = log Σ_j softplus(λ_i ŝ_ij): zero-width stand-in values.
  _, lse = call(jnp.zeros((B, S, K, 1), jnp.float32), score_mod=lssa_logits,
                return_residuals=True)
  lse = jnp.where(jnp.isfinite(lse), lse, 0.0)                                      # [B, T, N]
  offset = counts > OFFSET_FREE_ROWS                                                # [B, T]
  p = float(reweight_power)

  def lssar_logits(s, b, n, qi, ki):
    y = lssa_logits(s, b, n, qi, ki) - lse[b, qi, n] + log_n[b, qi]               # log(N_i a_ij)
    above = y > 0
    # log relu(e^y - 1), -inf (weight 0) at or below the row's mean weight; the inner where keeps
    # the gradient of the unused branch finite.
    log_excess = jnp.where(above, jnp.log(jnp.expm1(jnp.where(above, y, 1.0))), -jnp.inf)
    return p * jnp.where(offset[b, qi], log_excess, y)

  return call(v, score_mod=lssar_logits).astype(q.dtype)


register(Mechanism(
    name="softplus_length_scaled_attention", fn=softplus_length_scaled_attention,
    family="softmax-variant", seeds=(61,),
    paper="Softplus Attention with Re-weighting Boosts Length Extrapolation in Large Language Models",
    arxiv="2501.13428",
    # The suite exercises the re-weighted form (three flex passes); LSSA alone is the default and
    # is checked against its float64 rewrite on every implementation in its own tests.
    example={"reweight_power": 3.0}))
