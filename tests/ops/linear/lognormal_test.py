"""Linear log-normal attention (attnjax/ops/linear/lognormal.py): concentration that tracks
softmax's.

Each property is checked against an explicit evaluation of the formula written out here."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import feature_maps as fm
from attnjax.ops import linear as lin
from tests import tolerances
from tests.inputs import qkv
from tests.ops.linear.helpers import assert_rel, heads, impls, weighted


def _entropy(weights):
  """Mean over queries of the entropy (nats) of attention rows."""
  return float(jnp.mean(-jnp.sum(weights * jnp.log(jnp.maximum(weights, 1e-30)), axis=-1)))


def _normalized(w):
  return w / jnp.sum(w, -1, keepdims=True)


def test_lognormal_attention_concentration_tracks_softmax_across_temperatures():
  """The paper's claim: with moment-matched α, β, LLN's attention entropy follows softmax's as the
  temperature varies (from near-uniform to concentrated), while elu+1 linear attention cannot
  concentrate (its entropy stays at log T whatever the temperature)."""
  B, T, N, H = 1, 128, 2, 16
  kq, kk = jax.random.split(jax.random.PRNGKey(0))
  q, k = jax.random.normal(kq, (B, T, N, H)), jax.random.normal(kk, (B, T, N, H))
  temps = jax.jit(lambda sc: fm.lognormal_temperatures(q, k, scale=sc))
  elu = _normalized(jnp.einsum("btnf,bsnf->bnts", fm.elu_plus_one(q), fm.elu_plus_one(k)))
  h_sm, h_lln = [], []
  for c in (0.5, 1.0, 2.0, 3.0):                              # scale = c / √H
    sc = c * H ** -0.5
    h_sm.append(_entropy(jax.nn.softmax(sc * jnp.einsum("btnf,bsnf->bnts", q, k), axis=-1)))
    alpha, beta = temps(sc)
    h_lln.append(_entropy(_normalized(jnp.einsum(
        "btnf,bsnf->bnts", jnp.exp(alpha[:, None, :, None] * q),
        jnp.exp(beta[:, None, :, None] * k)))))
  h_sm, h_lln = np.array(h_sm), np.array(h_lln)
  span = h_sm[0] - h_sm[-1]                                   # softmax: ~4.7 -> ~2.1 nats
  assert span > tolerances.ENTROPY_SPAN_MIN_FRACTION * np.log(T), (h_sm, h_lln)
  assert np.all(np.diff(h_lln) < 0), (h_sm, h_lln)
  assert np.corrcoef(h_sm, h_lln)[0, 1] > tolerances.ENTROPY_CORRELATION_MIN, (h_sm, h_lln)
  assert np.max(np.abs(h_lln - h_sm)) < tolerances.ENTROPY_GAP_MAX_FRACTION * span, (h_sm, h_lln)
  assert _entropy(elu) > np.log(T) - tolerances.UNIFORM_ENTROPY_GAP > h_sm[1]


def test_lognormal_temperatures_agree_with_the_authors_fitted_formula():
  """At the authors' head size (64), the bisection's σ̃ is close to their closed-form fit
  `σ̃² = (σ_sm² - b) / (2a)`, a = 0.1486, b = -0.3549 (α = σ̃/σ_q, β = σ̃/σ_k)."""
  B, T, N, H = 1, 128, 1, 64
  kq, kk = jax.random.split(jax.random.PRNGKey(1))
  q, k = jax.random.normal(kq, (B, T, N, H)), 1.5 * jax.random.normal(kk, (B, T, N, H))
  sig_q, sig_k = float(jnp.std(q)), float(jnp.std(k))
  for c in (1.0, 2.0, 3.0):
    alpha, beta = fm.lognormal_temperatures(q, k, scale=c * H ** -0.5)
    sig_sm2 = (c * sig_q * sig_k) ** 2                      # Var(scale · q·k) for Gaussian q, k
    fitted = ((sig_sm2 + 0.35487) / (2 * 0.148552)) ** 0.5
    fit = tolerances.LOGNORMAL_TEMPERATURE_FIT
    np.testing.assert_allclose(float(alpha[0, 0]) * sig_q, fitted, **fit)
    np.testing.assert_allclose(float(beta[0, 0]) * sig_k, fitted, **fit)


def _lln_expected(q, k, v, alpha, beta):
  """Normalized `exp(α_n q)·exp(β_n k)` weights, α, β `[B,N]`, each query head with its own."""
  N = q.shape[2]
  kr, vr = heads(k, N), heads(v, N)
  w = jnp.einsum("btnf,bsnf->bnts", jnp.exp(alpha[:, None, :, None] * q),
                 jnp.exp(beta[:, None, :, None] * kr))
  return weighted(_normalized(w), vr)


def test_lognormal_attention_uses_each_heads_temperatures_under_gqa():
  q, k, v = qkv(T=29)                                            # N = 4 query heads share K = 2
  q = q * jnp.asarray([0.5, 1.0, 1.5, 2.0])[:, None]         # heads of different spread
  alpha, beta = jnp.asarray([0.3, 0.5, 0.7, 0.9]), jnp.asarray([0.8, 0.6, 0.4, 0.2])
  expected = _lln_expected(q, k, v, jnp.broadcast_to(alpha, (2, 4)), jnp.broadcast_to(beta, (2, 4)))
  assert impls("linear_lognormal_attention") == ("xla", "reference")
  for impl in impls("linear_lognormal_attention"):
    assert_rel(lin.linear_lognormal_attention(q, k, v, alpha=alpha, beta=beta,
                                              implementation=impl), expected)
  # Estimated: per example and per head, each query head applying its own β to the shared keys.
  a, b = fm.lognormal_temperatures(q, k, scale=q.shape[-1] ** -0.5)
  assert a.shape == (2, 4) and float(jnp.min(jnp.abs(jnp.diff(a, axis=1)))) > tolerances.DISTINCT_MIN_ABS
  assert_rel(lin.linear_lognormal_attention(q, k, v), _lln_expected(q, k, v, a, b))


def test_lognormal_estimated_temperatures_keep_examples_independent():
  q, k, v = qkv(T=29)
  out = lin.linear_lognormal_attention(q, k, v)
  other = [3.0 * x for x in qkv(T=29, seed=5)]
  changed = [x.at[1].set(y[1]) for x, y in zip((q, k, v), other, strict=True)]
  out2 = lin.linear_lognormal_attention(*changed)
  np.testing.assert_allclose(out2[0], out[0], **tolerances.output(jnp.float32))
  assert tolerances.rel_rms(out2[1], out[1]) > tolerances.CHANGED_REL_RMS


def test_lognormal_scale_with_explicit_alpha_is_an_error():
  q, k, v = qkv(T=29)
  with pytest.raises(ValueError, match="linear_lognormal_attention: `scale`"):
    lin.linear_lognormal_attention(q, k, v, alpha=jnp.ones(4), scale=0.5)
