"""α-entmax attention (#167): softmax replaced by α-entmax, whose defining property is exact zeros —
keys far enough below a row's threshold get weight 0, more of them the larger α, and with a learned
α per head each head picks its own sparsity.

Checked against float64 rewrites written independently of the implementation: the paper's
threshold form p = [(α-1)s - τ]_+^{1/(α-1)} with τ bisected in float64, and sparsemax by sorting
(α = 2); α = 1 against softmax attention; gradients in q, k, v and α against finite differences of
the float64 rewrite, and the α-gradient against Correia et al.'s closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.softmax import adaptive_entmax_attention, entmax_attention, softmax_attention
from tests import inputs
from tests import numpy_math
from tests import tolerances

F32 = tolerances.output(jnp.float32)
GRAD = tolerances.grad(jnp.float32)
B, T, S, N, K, H, h = 2, 11, 13, 4, 2, 8, 5


def _visible(T, S, *, causal=False, kv_lengths=None):
  """`[1 or B, 1, T, S]` bool: the contract's mask for these settings, in numpy."""
  t = np.arange(T)[:, None]
  keep = np.ones((1, 1, T, S), bool)
  if causal:
    keep &= (np.arange(S)[None] <= t)[None, None]
  if kv_lengths is not None:
    keep = keep & (np.arange(S)[None, None, None] < np.asarray(kv_lengths)[:, None, None, None])
  return keep


def _scores(q, k, scale):
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
  return np.einsum("btnh,bsnh->bnts", q, k) * scale


def _entmax_float64(z, alpha, visible, iters=200):
  """The paper's α-entmax by bisection on τ (float64): p = [(α-1) z - τ]_+^{1/(α-1)}, Σ p = 1 over
  the visible entries; `alpha` broadcast against `z[..., :1]`. Rows with nothing visible: zeros."""
  z = np.where(visible, z, -np.inf)
  beta = np.broadcast_to(np.asarray(alpha, np.float64) - 1.0, z.shape[:-1] + (1,))
  x = beta * z
  top = np.max(x, -1, keepdims=True)
  top = np.where(np.isfinite(top), top, 0.0)
  d = np.maximum(visible.sum(-1, keepdims=True), 1)
  lo, hi = top - 1.0, top - d ** -beta

  def p_at(tau):
    return np.where(visible, np.maximum(x - tau, 0.0) ** (1.0 / beta), 0.0)

  for _ in range(iters):
    mid = 0.5 * (lo + hi)
    above = p_at(mid).sum(-1, keepdims=True) >= 1.0
    lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
  p = p_at(lo)
  total = p.sum(-1, keepdims=True)
  return p / np.where(total > 0, total, 1.0)


def _sparsemax_float64(z, visible):
  """Sparsemax by sorting (Martins & Astudillo): τ = (Σ_{top k} z - 1)/k for the largest k with
  1 + k z_(k) > Σ_{i<=k} z_(i)."""
  z = np.where(visible, z, -np.inf)
  srt = -np.sort(-z, axis=-1)
  finite = np.isfinite(srt)
  cums = np.cumsum(np.where(finite, srt, 0.0), axis=-1)
  ks = np.arange(1, z.shape[-1] + 1)
  support = finite & (1.0 + ks * np.where(finite, srt, 0.0) > cums)
  k = np.maximum(support.sum(-1, keepdims=True), 1)
  tau = (np.take_along_axis(cums, k - 1, axis=-1) - 1.0) / k
  return np.where(visible, np.maximum(z - tau, 0.0), 0.0)


def _out(p, v):
  v = np.asarray(v, np.float64)
  v = np.repeat(v, p.shape[1] // v.shape[2], axis=2)
  return np.einsum("bnts,bsnh->btnh", p, v)


def _attention_float64(q, k, v, alpha, *, scale, **mask):
  """entmax attention in float64; `alpha` a float or `[N]`."""
  visible = _visible(q.shape[1], k.shape[1], **mask)
  alpha = np.asarray(alpha, np.float64).reshape(1, -1, 1, 1)
  return _out(_entmax_float64(_scores(q, k, scale), alpha, visible), v)


@pytest.mark.parametrize("causal", [False, True])
def test_alpha_one_is_softmax_attention(causal):
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h, seed=1)
  lengths = jnp.array([S, 7])
  want = softmax_attention(q, k, v, causal=causal, kv_lengths=lengths)
  # The float path (softmax itself) and the per-head array path (the bisection at β = 0).
  for alpha in (1.0, jnp.ones((N,))):
    got = entmax_attention(q, k, v, causal=causal, kv_lengths=lengths, alpha=alpha)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), **F32)


def test_alpha_two_is_sparsemax():
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h, seed=2)
  lengths = np.array([S, 6])
  got = entmax_attention(q, k, v, alpha=2.0, scale=1.5, kv_lengths=jnp.asarray(lengths))
  visible = _visible(T, S, kv_lengths=lengths)
  p = _sparsemax_float64(_scores(q, k, 1.5), visible)
  assert (p[np.broadcast_to(visible, p.shape)] == 0).any()       # the comparison includes zeros
  np.testing.assert_allclose(np.asarray(got), _out(p, v), **F32)


@pytest.mark.parametrize("causal", [False, True])
def test_per_head_alpha_equals_the_float64_threshold_form(causal):
  q, k, v = inputs.qkv(B=B, T=T, S=T, N=N, K=K, H=H, h=h, seed=3)
  alpha = np.array([1.1, 1.5, 1.8, 2.5], np.float32)
  lengths = np.array([T, 8])
  got = entmax_attention(q, k, v, alpha=jnp.asarray(alpha), causal=causal, scale=1.2,
                         kv_lengths=jnp.asarray(lengths))
  want = _attention_float64(q, k, v, alpha, scale=1.2, causal=causal, kv_lengths=lengths)
  np.testing.assert_allclose(np.asarray(got), want, **F32)
  # The learned form α = 1 + sigmoid(a) is the same computation.
  a = np.log(alpha[:3] - 1) - np.log(2 - alpha[:3])
  got = adaptive_entmax_attention(q[:, :, :2], k[:, :, :1], v[:, :, :1],
                                  alpha_logit=jnp.asarray(a[:2]), causal=causal, scale=1.2)
  want = _attention_float64(q[:, :, :2], k[:, :, :1], v[:, :, :1], alpha[:2], scale=1.2,
                            causal=causal)
  np.testing.assert_allclose(np.asarray(got), want, **F32)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_exact_zeros_and_rows_that_sum_to_one(alpha):
  # One-hot values: the output rows are the weight rows. Peaky scores (scale 3) leave many keys
  # below the threshold: exactly 0, as are the padded keys; softmax has no zero at all.
  q, k, _ = inputs.qkv(B=B, T=T, S=S, N=2, K=2, H=H, seed=4)
  v = jnp.broadcast_to(jnp.eye(S)[None, :, None, :], (B, S, 2, S))
  lengths = np.array([S, 9])
  w = np.asarray(entmax_attention(q, k, v, alpha=alpha, scale=3.0, kv_lengths=jnp.asarray(lengths)))
  visible = np.broadcast_to(np.transpose(_visible(T, S, kv_lengths=lengths), (0, 2, 1, 3)), w.shape)
  np.testing.assert_array_equal(w[~visible], 0.0)
  zeros = (w == 0) & visible
  assert zeros.sum() > visible.sum() // 4
  assert (w > 0).any(axis=-1).all()
  np.testing.assert_allclose(w.sum(-1), 1.0, **tolerances.FEATURE_SUM[jnp.float32])
  dense = np.asarray(entmax_attention(q, k, v, alpha=1.0, scale=3.0, kv_lengths=jnp.asarray(lengths)))
  assert (dense[visible] > 0).all()


def test_learned_alpha_gives_each_head_its_own_sparsity():
  # Every head sees the same scores (one key head, the same query in each head): only α differs.
  q, k, _ = inputs.qkv(B=1, T=16, S=16, N=1, K=1, H=H, seed=5)
  q = jnp.repeat(q, 4, axis=2)
  v = jnp.eye(16)[None, :, None, :]
  a = jnp.array([-3.0, 0.0, 2.0, 6.0])                         # α ≈ 1.05, 1.5, 1.88, 2.0
  w = np.asarray(adaptive_entmax_attention(q, k, v, alpha_logit=a, scale=2.0))
  support = (w > 0).sum(axis=(0, 1, 3))                        # nonzero weights per head
  assert np.all(np.diff(support) < 0), support
  assert support[-1] < w.shape[1] * 16 // 2                     # the sparsest head is truly sparse


def _loss_float64(q, k, v, alpha, c, scale):
  return float(np.sum(_attention_float64(q, k, v, alpha, scale=scale) * c))


def test_gradients_match_float64_finite_differences():
  # α from nearly softmax (a = -8: α - 1 ≈ 3e-4, where the paper's α-gradient formula cancels
  # catastrophically) to nearly sparsemax; directional derivatives of Σ c ⊙ out.
  q, k, v = inputs.qkv(B=1, T=7, S=9, N=4, K=2, H=4, h=3, seed=6)
  a = jnp.array([-8.0, -1.0, 0.5, 3.0])
  scale = 1.3
  rng = np.random.default_rng(0)
  c = rng.standard_normal((1, 7, 4, 3))

  def loss(q, k, v, a):
    out = adaptive_entmax_attention(q, k, v, alpha_logit=a, scale=scale)
    return jnp.sum(out * jnp.asarray(c, jnp.float32))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, a)
  args = [np.asarray(x, np.float64) for x in (q, k, v, a)]

  def loss64(q, k, v, a):
    return _loss_float64(q, k, v, 1.0 + numpy_math.sigmoid(a), c, scale)

  numpy_math.check_directional_derivatives(grads, args, loss64, ("q", "k", "v", "alpha_logit"),
                                           rng=rng, tol=GRAD)


def test_alpha_gradient_is_the_papers_formula():
  # Correia et al.: ∂p_j/∂α = (p_j - ŝ_j)/(α-1)² - (p_j log p_j - ŝ_j Σ_k p_k log p_k)/(α-1), with
  # ŝ ∝ p^{2-α} on the support, chained through o = p v into Σ c ⊙ o.
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=4, K=2, H=H, h=h, seed=7)
  alpha = np.array([1.2, 1.5, 1.8, 2.0], np.float32)
  lengths = np.array([S, 8])
  c = np.random.default_rng(1).standard_normal((B, T, 4, h))
  got = jax.grad(lambda al: jnp.sum(entmax_attention(q, k, v, alpha=al, kv_lengths=jnp.asarray(
      lengths)) * c))(jnp.asarray(alpha))
  visible = _visible(T, S, kv_lengths=lengths)
  p = _entmax_float64(_scores(q, k, H ** -0.5), alpha.reshape(1, -1, 1, 1), visible)
  beta = (alpha.astype(np.float64) - 1.0).reshape(1, -1, 1, 1)
  g = np.where(p > 0, p ** (2 - beta - 1), 0.0)
  s_hat = g / g.sum(-1, keepdims=True)
  plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
  dp = (p - s_hat) / beta ** 2 - (plogp - s_hat * plogp.sum(-1, keepdims=True)) / beta
  vr = np.repeat(np.asarray(v, np.float64), 2, axis=2)
  dloss_dp = np.einsum("btnh,bsnh->bnts", c, vr)
  want = np.sum(dp * dloss_dp, axis=(0, 2, 3))
  np.testing.assert_allclose(np.asarray(got), want, **GRAD)


def test_fully_masked_rows_give_zeros_and_finite_gradients():
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h, seed=8)
  lengths = jnp.array([0, S])

  def loss(q, k, v, a):
    out = adaptive_entmax_attention(q, k, v, alpha_logit=a, kv_lengths=lengths)
    return jnp.sum(out ** 2), out

  (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(
      q, k, v, jnp.zeros((N,)))
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
  assert np.abs(np.asarray(out[1])).max() > 0
  for g in grads:
    assert np.isfinite(np.asarray(g)).all()


def test_bad_settings_name_the_operator_and_argument():
  q, k, v = inputs.qkv(B=1, T=5, N=4, K=2, H=4, h=3)
  with pytest.raises(ValueError, match="entmax_attention.*alpha"):
    entmax_attention(q, k, v, alpha=0.5)
  with pytest.raises(ValueError, match=r"entmax_attention.*alpha.*\[N\]"):
    entmax_attention(q, k, v, alpha=jnp.ones((3,)))
  with pytest.raises(ValueError, match=r"adaptive_entmax_attention.*alpha_logit.*\[N\]"):
    adaptive_entmax_attention(q, k, v, alpha_logit=jnp.zeros((2,)))
  with pytest.raises(ValueError, match="entmax_attention.*implementation"):
    entmax_attention(q, k, v, implementation="xla")
