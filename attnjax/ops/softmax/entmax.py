"""α-entmax attention: a sparse normalizer in place of softmax, its sparsity α fixed or learned per head.

    p_i    = α-entmax(s_i) = argmax_{p ∈ Δ} p·s_i + H^T_α(p),   H^T_α(p) = Σ_j (p_j - p_j^α) / (α(α-1))
           = [(α-1) s_ij - τ_i]_+^{1/(α-1)}      τ_i such that Σ_j p_ij = 1 (over the visible keys)
    o_i    = Σ_j p_ij v_j                         s_ij = scale · q_i·k_j

α → 1 is softmax (handled exactly as softmax at α = 1), α = 2 is sparsemax; for α > 1 the keys with
(α-1) s_ij <= τ_i get exactly zero weight, and a head with a larger α attends to fewer keys.
`alpha` is a Python float (one α for every head) or an `[N]` array (one per head).
`adaptive_entmax_attention` learns it per head as the adaptively sparse Transformer does:
α_n = 1 + sigmoid(a_n) ∈ (1, 2), `alpha_logit` a `[N]` learned array. Its initializer here is
a = 0, α = 1.5 (the 1.5-entmax Correia et al. compare against), our choice.

τ is found by bisection (the authors' `entmax_bisect`, github.com/deep-spin/entmax) in float32,
written in a variable that keeps float32 precision for every α including α → 1: with β = α - 1,
m the row's visible maximum and w_j = m - s_ij ≥ 0, p_j = (1 - β(ν + w_j))_+^{1/β}
= exp(log1p(-β(ν + w_j)) / β) (→ e^{-(ν + w_j)}, softmax, as β → 0), and ν ∈ [0, (1 - d^{-β})/β]
(d visible keys) is bisected until Σ_j p_j = 1 (32 halvings of an interval at most log d wide: below
float32 rounding), then p is divided by its sum. Masked keys get exactly 0; a row with no visible
key gives zeros.

Gradients are closed-form (custom VJP). With g_j = p_j^{2-α} on the support and ŝ = g / Σ g
(Peters et al.), `∂p/∂s · u = g ⊙ (u - ⟨ŝ, u⟩)`; and (Correia et al.) ∂p_j/∂α =
(p_j - ŝ_j)/β² - (p_j log p_j - ŝ_j Σ_k p_k log p_k)/β, which cancels catastrophically as β → 0;
this file uses the same derivative in the bisection's variable, ∂p_j/∂β = P_j - ŝ_j Σ_k P_k with
P_j = -w_j² p_j ψ(β w_j), ψ(x) = (x/(1-x) + log(1-x))/x² (its series below x = 1/4), which tends to
softmax's derivative at β = 0. The tests check it against finite differences of a float64 rewrite
and against the paper's formula.

Reference-only: the threshold needs each whole score row, so this is a dense float32 form
(`core.dense`), cost O(n_iter·T·S). Rows are independent: causal masking, packed documents and
decoding over a KV cache are exact.

Interpretation: only the ASR paper's abstract is available to this project; its "learned sparsity
scheme" per head is taken, as the catalog describes it, to be α-entmax with α learned per head the
adaptively sparse Transformer's way. Not included: the monotonic-alignment regularization with which
it prunes redundant heads (a training loss), whose equations are not available here.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`, `alpha` float or `[N]`, `alpha_logit [N]` →
`[B,T,N,h]`.
Papers: Zhao et al., "Adaptive Sparse and Monotonic Attention for Transformer-based Automatic Speech
Recognition", arXiv:2209.15176 (catalog row 167); Correia, Niculae and Martins, "Adaptively Sparse
Transformers", arXiv:1909.00015 (learned α and its gradient); Peters, Niculae and Martins, "Sparse
Sequence-to-Sequence Models", arXiv:1905.05702 (α-entmax and its bisection).
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core import dense
from attnjax.registry import Mechanism, ParamSpec, example_params, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, Value

__all__ = ["entmax_attention", "adaptive_entmax_attention", "entmax_bisect", "ENTMAX_PARAMS",
           "N_ITER"]

_F32 = jnp.float32
# Bisection steps: the interval for ν is at most log d wide (≈ 12 for d = 10⁵ keys); 32 halvings
# bring it below float32 rounding of ν.
N_ITER = 32
# Below this x = β·w the series of ψ is used (20 terms: x²⁰ < 1e-12); above, the closed form loses
# at most a few ulps to cancellation.
_PSI_SERIES_BELOW = 0.25
_PSI_TERMS = 20

# The learned per-head logit a of α = 1 + sigmoid(a).
ENTMAX_PARAMS = (ParamSpec("alpha_logit", lambda N, K, H: (N,), jax.nn.initializers.zeros),)
PerHeadAlpha = Float[Array, "N"]


def _probs(nu, w, visible, beta):
  """p_j = (1 - β(ν + w_j))_+^{1/β} (e^{-(ν + w_j)} at β = 0) on the visible entries."""
  pos = beta > 0
  t = nu + w
  logp = jnp.where(pos, jnp.log1p(-jnp.minimum(beta * t, 1.0)) / jnp.where(pos, beta, 1.0), -t)
  return jnp.where(visible, jnp.exp(logp), 0.0)


def _forward(x, beta, n_iter):
  visible = x > -jnp.inf
  count = jnp.sum(visible, axis=-1, keepdims=True)
  m = jnp.max(jnp.where(visible, x, -jnp.inf), axis=-1, keepdims=True)
  m = jnp.where(count > 0, m, 0.0)
  w = jnp.where(visible, m - x, 0.0)
  log_d = jnp.log(jnp.maximum(count, 1).astype(_F32))
  pos = beta > 0
  # At ν = hi the top key's weight is 1/d, so Σ p <= 1; at ν = 0 it is 1, so Σ p >= 1.
  hi = jnp.where(pos, -jnp.expm1(-beta * log_d) / jnp.where(pos, beta, 1.0), log_d)
  lo = jnp.zeros_like(hi)

  def halve(_, bounds):
    lo, hi = bounds
    mid = 0.5 * (lo + hi)
    above = jnp.sum(_probs(mid, w, visible, beta), axis=-1, keepdims=True) >= 1.0
    return jnp.where(above, mid, lo), jnp.where(above, hi, mid)

  lo, _ = jax.lax.fori_loop(0, n_iter, halve, (lo, hi))
  p = _probs(lo, w, visible, beta)
  total = jnp.sum(p, axis=-1, keepdims=True)
  return p / jnp.where(total > 0, total, 1.0)


def _psi_series(x):
  """ψ(x) = Σ_{n>=2} (n-1)/n · x^{n-2} by Horner's rule."""
  acc = jnp.zeros_like(x)
  for n in range(_PSI_TERMS + 1, 1, -1):
    acc = acc * x + (n - 1) / n
  return acc


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _entmax(x, beta, n_iter):
  return _forward(x, beta, n_iter)


def _entmax_fwd(x, beta, n_iter):
  p = _forward(x, beta, n_iter)
  return p, (p, beta)


def _entmax_bwd(n_iter, res, cot):
  del n_iter
  p, beta = res
  cot = cot.astype(_F32)
  support = p > 0
  logp = jnp.log(jnp.where(support, p, 1.0))
  g = jnp.where(support, jnp.exp((1.0 - beta) * logp), 0.0)            # p^{2-α}
  g_sum = jnp.sum(g, axis=-1, keepdims=True)
  centred = cot - jnp.sum(g * cot, axis=-1, keepdims=True) / jnp.where(g_sum > 0, g_sum, 1.0)
  dx = g * centred
  # ∂p/∂β (module docstring): x = β w = 1 - p^β on the support, P = -w² p ψ(x).
  pos = beta > 0
  xb = jnp.where(support, -jnp.expm1(beta * logp), 0.0)
  w = jnp.where(support, jnp.where(pos, xb / jnp.where(pos, beta, 1.0), -logp), 0.0)
  small = xb < _PSI_SERIES_BELOW
  big_x = jnp.where(small, 1.0, xb)
  # p ψ(x) = (x p^{1-β} + p log(1-x)) / x² with log(1-x) = β log p (no division by 1 - x).
  p_psi = jnp.where(small, p * _psi_series(jnp.where(small, xb, 0.0)),
                    (big_x * g + beta * p * logp) / (big_x * big_x))
  dbeta = jnp.sum(-w * w * p_psi * centred, axis=-1, keepdims=True)
  return dx, dbeta


_entmax.defvjp(_entmax_fwd, _entmax_bwd)


def entmax_bisect(x: jax.Array, alpha_minus_one, n_iter: int = N_ITER) -> jax.Array:
  """α-entmax along the last axis of `x` (float32; `-inf` entries are hidden and get weight 0, a row
  with none visible gives zeros), with β = `alpha_minus_one` >= 0 broadcastable to `x[..., :1]`
  (β = 0: softmax, β = 1: sparsemax). Differentiable in `x` and β (see the module docstring)."""
  x = x.astype(_F32)
  beta = jnp.broadcast_to(jnp.asarray(alpha_minus_one, _F32), x.shape[:-1] + (1,))
  return _entmax(x, beta, n_iter)


def _attend(op, q, k, v, beta, *, causal, segment_ids, q_offset, kv_lengths, scale, n_iter):
  """o = entmax_β(s) v on the dense scores; β None: softmax (α = 1)."""
  s, visible = dense.contract_scores(op, q, k, v, causal=causal, segment_ids=segment_ids,
                                     q_offset=q_offset, kv_lengths=kv_lengths, scale=scale)
  if beta is None:
    lse = dense.masked_logsumexp(s, visible)
    p = jnp.where(visible, jnp.exp(jnp.where(visible, s, lse) - lse), 0.0)
  else:
    p = entmax_bisect(jnp.where(visible, s, -jnp.inf), beta, n_iter)
  return dense.weighted_values(p, v).astype(q.dtype)


def _check_iterations(op, n_iter):
  if not isinstance(n_iter, (int, np.integer)) or n_iter < 1:
    raise ValueError(f"{op}: `n_iter` (bisection steps) must be an int >= 1, got {n_iter!r}")


def entmax_attention(q: Query, k: Key, v: Value, *, causal: bool = False, segment_ids=None,
                     q_offset=0, kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                     implementation: Optional[str] = None,
                     alpha: Union[float, PerHeadAlpha] = 1.5, n_iter: int = N_ITER) -> Output:
  """α-entmax attention with a given α (a float, or `[N]` per head; see the module docstring)."""
  op = "entmax_attention"
  _, _, _, N, _, _, _ = checks.check_qkv(op, q, k, v)
  checks.check_implementation(op, implementation, ("reference",))
  _check_iterations(op, n_iter)
  if isinstance(alpha, (int, float, np.integer, np.floating)):
    if not alpha >= 1.0:
      raise ValueError(f"{op}: `alpha` must be >= 1 (1: softmax, 2: sparsemax), got {alpha}")
    beta = None if float(alpha) == 1.0 else float(alpha) - 1.0
  else:
    checks.check_shape(op, "alpha", alpha, (N,), "[N]")
    beta = (jnp.asarray(alpha, _F32) - 1.0).reshape(1, N, 1, 1)
  return _attend(op, q, k, v, beta, causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                 kv_lengths=kv_lengths, scale=scale, n_iter=n_iter)


def adaptive_entmax_attention(q: Query, k: Key, v: Value, *, alpha_logit: PerHeadAlpha,
                              causal: bool = False, segment_ids=None, q_offset=0,
                              kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                              implementation: Optional[str] = None, n_iter: int = N_ITER) -> Output:
  """α-entmax attention with α_n = 1 + sigmoid(alpha_logit_n) learned per head (Correia et al.)."""
  op = "adaptive_entmax_attention"
  _, _, _, N, _, _, _ = checks.check_qkv(op, q, k, v)
  checks.check_implementation(op, implementation, ("reference",))
  _check_iterations(op, n_iter)
  checks.check_shape(op, "alpha_logit", alpha_logit, (N,), "[N]")
  # β = α - 1 = sigmoid(a) directly: 1 + sigmoid(a) would round to 1 in float32 for a < -17.
  beta = jax.nn.sigmoid(jnp.asarray(alpha_logit, _F32)).reshape(1, N, 1, 1)
  return _attend(op, q, k, v, beta, causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                 kv_lengths=kv_lengths, scale=scale, n_iter=n_iter)


_PAPER = "Adaptive Sparse and Monotonic Attention for Transformer-based Automatic Speech Recognition"

register(Mechanism(
    name="entmax_attention", fn=entmax_attention, family="softmax-variant", seeds=(167,),
    paper=_PAPER, arxiv="2209.15176", implementations=("reference",), complexity="O(n_iter·T·S)"))

register(Mechanism(
    name="adaptive_entmax_attention", fn=adaptive_entmax_attention, family="softmax-variant",
    seeds=(167,), paper=_PAPER, arxiv="2209.15176", implementations=("reference",),
    complexity="O(n_iter·T·S)", params=ENTMAX_PARAMS,
    # a ~ N(0, 1): α spread over about (1.2, 1.8), a different sparsity in each head.
    example=lambda *, N, K, H, h: example_params(ENTMAX_PARAMS, N=N, K=K, H=H, perturb=1.0)))
