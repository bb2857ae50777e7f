"""Dense score matrices under the call contract, for mechanisms whose normalizer needs a whole score
row or column at once (entmax's threshold, Sinkhorn's column sums): the reference form of such a
mechanism, float32, materializing `[B, N, T, S]`.

  contract_scores   `(s, visible)`: the scaled logits `s_ij = scale · q_i·k_j` of query head n against
                    key/value head n // (N/K) (GQA), float32 `[B, N, T, S]`, and the contract's mask
                    (`causal`, `q_offset`, `segment_ids`, `kv_lengths`) as a bool `[B, N, T, S]`
  weighted_values   `o_i = Σ_j w_ij v_j`: weights `[B, N, T, S]` and `v [B, S, K, h]` → `[B, T, N, h]`
  masked_logsumexp  `log Σ_{visible} e^x` along an axis, 0 where nothing is visible, with finite
                    gradients everywhere (an empty row gets none)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import masks

__all__ = ["contract_scores", "weighted_values", "masked_logsumexp"]

_F32 = jnp.float32
# The reference form tests algorithms: full float32 products even where the default is lower (TF32).
_HIGHEST = jax.lax.Precision.HIGHEST


def contract_scores(op: str, q, k, v, *, causal: bool = False, segment_ids=None, q_offset=0,
                    kv_lengths=None, scale=None) -> tuple[jax.Array, jax.Array]:
  """`(s [B, N, T, S] float32, visible [B, N, T, S] bool)` for `q [B,T,N,H]`, `k [B,S,K,H]` (`v`
  only validated): `s = scale · q·k` (scale defaults to `H ** -0.5`; masked pairs hold their score
  too) and the pairs the call contract keeps."""
  B, T, S, N, K, H, _ = checks.check_qkv(op, q, k, v)
  G = N // K
  scale = H ** -0.5 if scale is None else scale
  qf = q.astype(_F32).reshape(B, T, K, G, H)
  s = jnp.einsum("btkgh,bskh->bkgts", qf, k.astype(_F32), precision=_HIGHEST).reshape(B, N, T, S)
  mask_mod = contract.contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset,
                                    segment_ids=segment_ids, kv_lengths=kv_lengths, op=op)
  return s * scale, masks.evaluate_mask(mask_mod, B, N, T, S)


def weighted_values(w: jax.Array, v: jax.Array) -> jax.Array:
  """`o[b, i, n] = Σ_j w[b, n, i, j] v[b, j, n // G]`: `w [B, N, T, S]`, `v [B, S, K, h]` →
  `[B, T, N, h]` float32 (query head n reads value head n // (N/K))."""
  B, N, T, S = w.shape
  K, h = v.shape[2], v.shape[3]
  w = w.astype(_F32).reshape(B, K, N // K, T, S)
  out = jnp.einsum("bkgts,bskh->btkgh", w, v.astype(_F32), precision=_HIGHEST)
  return out.reshape(B, T, N, h)


def masked_logsumexp(x: jax.Array, visible: jax.Array, axis: int = -1) -> jax.Array:
  """`log Σ_{j visible} e^{x_j}` along `axis` (kept as size 1), float32; 0 where no entry is visible.

  The shift (the visible maximum) carries no gradient, and hidden entries never reach an exp or a
  log, so a row with nothing visible has finite (zero) gradients.
  """
  x = x.astype(_F32)
  m = jnp.max(jnp.where(visible, x, -jnp.inf), axis=axis, keepdims=True)
  m = jax.lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))
  e = jnp.where(visible, jnp.exp(jnp.where(visible, x, m) - m), 0.0)
  total = jnp.sum(e, axis=axis, keepdims=True)
  some = total > 0
  return jnp.where(some, m + jnp.log(jnp.where(some, total, 1.0)), 0.0)
