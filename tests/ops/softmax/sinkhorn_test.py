"""Sinkhorn attention (#162, OTSeg's MPSA): softmax's row normalization replaced by Sinkhorn's
alternating row and column normalizations. The defining property (the catalog's claim) is an
approximately doubly-stochastic attention: after the iterations every query row sums to its marginal
exactly and every key column to its uniform marginal, over the visible keys only (padding excluded).

Checked against float64 rewrites written independently of the implementation: Sinkhorn's matrix
scaling in the primal domain (r = a / K c, c = b / Kᵀ r), and a transcription of the authors'
`Sinkhorn_log_exp_sum` / `AttentionOT` (cosine cost, ε = 0.05, the plan itself times the values);
zero iterations against softmax attention; gradients against finite differences of the float64
rewrite."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.softmax import sinkhorn_attention, softmax_attention
from tests import inputs
from tests import numpy_math
from tests import tolerances

F32 = tolerances.output(jnp.float32)
B, T, S, N, K, H, h = 2, 7, 11, 4, 2, 8, 5


def _scores(q, k, scale):
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
  return np.einsum("btnh,bsnh->bnts", q, k) * scale


def _out(p, v):
  v = np.repeat(np.asarray(v, np.float64), p.shape[1] // v.shape[2], axis=2)
  return np.einsum("bnts,bsnh->btnh", p, v)


def _sinkhorn_float64(s, lengths, *, iterations, epsilon, unit_rows=True):
  """Matrix scaling of K = e^{s/ε} over the first `lengths[b]` keys: c = b / Kᵀr, r = a / Kc
  (`iterations` times from r = 1, then r once more), P = diag(r) K diag(c); a = 1 per query and
  b = T/S' per key (or a = 1/T, b = 1/S')."""
  Bq, Nq, Tq, Sk = s.shape
  plan = np.zeros_like(s)
  for b in range(Bq):
    n = int(lengths[b])
    if n == 0:
      continue
    a_m, b_m = (np.ones(Tq), np.full(n, Tq / n)) if unit_rows else (np.full(Tq, 1 / Tq),
                                                                     np.full(n, 1 / n))
    for head in range(Nq):
      kern = np.exp(s[b, head, :, :n] / epsilon)
      r = np.ones(Tq)
      c = np.ones(n)
      for _ in range(iterations):
        c = b_m / (kern.T @ r)
        r = a_m / (kern @ c)
      r = a_m / (kern @ c)
      plan[b, head, :, :n] = r[:, None] * kern * c[None, :]
  return plan


@pytest.mark.parametrize("cross", [False, True])
def test_rows_and_columns_reach_their_marginals(cross):
  # One-hot values: the output rows are the plan's rows. Key padding: the marginals cover the
  # visible keys only, and padded keys get exactly 0.
  s_len = S if cross else T
  q, k, _ = inputs.qkv(B=B, T=T, S=s_len, N=2, K=2, H=H, seed=1)
  v = jnp.broadcast_to(jnp.eye(s_len)[None, :, None, :], (B, s_len, 2, s_len))
  lengths = np.array([s_len, 4])
  w = np.asarray(sinkhorn_attention(q, k, v, kv_lengths=jnp.asarray(lengths)), np.float64)
  np.testing.assert_allclose(w.sum(-1), 1.0, **tolerances.FEATURE_SUM[jnp.float32])
  for b, n in enumerate(lengths):
    np.testing.assert_array_equal(w[b, :, :, n:], 0.0)
    np.testing.assert_allclose(w[b, :, :, :n].sum(0), T / n, atol=tolerances.SINKHORN_MARGINAL_ABS)
  # Softmax's columns are far from uniform on the same scores: the property is the iterations'.
  sm = np.asarray(softmax_attention(q, k, v, kv_lengths=jnp.asarray(lengths)), np.float64)
  assert np.abs(sm[0].sum(0) - T / s_len).max() > 10 * tolerances.SINKHORN_MARGINAL_ABS


def test_zero_iterations_is_softmax():
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h, seed=2)
  lengths = jnp.array([S, 6])
  got = sinkhorn_attention(q, k, v, iterations=0, epsilon=0.7, kv_lengths=lengths)
  want = softmax_attention(q, k, v, scale=H ** -0.5 / 0.7, kv_lengths=lengths)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), **F32)


@pytest.mark.parametrize("iterations,unit_rows", [(1, True), (3, False), (50, True)])
def test_equals_float64_matrix_scaling(iterations, unit_rows):
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h, seed=3)
  lengths = np.array([S, 5])
  got = sinkhorn_attention(q, k, v, iterations=iterations, epsilon=0.5, unit_rows=unit_rows,
                           kv_lengths=jnp.asarray(lengths))
  plan = _sinkhorn_float64(_scores(q, k, H ** -0.5), lengths, iterations=iterations, epsilon=0.5,
                           unit_rows=unit_rows)
  np.testing.assert_allclose(np.asarray(got), _out(plan, v), **F32)


def _otseg_float64(q, k, v, epsilon=0.05, max_iter=100, thresh=1e-6):
  """The authors' `AttentionOT.forward` after its projections, per example and head, float64:
  cost 1 - cos(k_m, q_n) (M keys, Nq queries), `Sinkhorn_log_exp_sum(C, mu=1/M, nu=1/Nq, ε)` with
  its potentials u (keys), v (queries) and early stop, then x_n = Σ_m T[m, n] v_m."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  Bq, Nq, heads, _ = q.shape
  M = k.shape[1]
  out = np.zeros((Bq, Nq, heads, v.shape[-1]))
  lse = lambda x, axis: np.log(np.exp(x - x.max(axis, keepdims=True)).sum(axis)) + x.max(axis)
  for b in range(Bq):
    for n in range(heads):
      kv_head = n // (heads // k.shape[2])
      xq = q[b, :, n] / np.linalg.norm(q[b, :, n], axis=-1, keepdims=True)
      xk = k[b, :, kv_head] / np.linalg.norm(k[b, :, kv_head], axis=-1, keepdims=True)
      cost = 1.0 - xk @ xq.T                                    # [M, Nq]
      mu, nu = np.full(M, 1 / M), np.full(Nq, 1 / Nq)
      u, w = np.zeros(M), np.zeros(Nq)
      kernel = lambda u, w: (-cost + u[:, None] + w[None, :]) / epsilon
      for _ in range(max_iter):
        u0 = u
        u = epsilon * (np.log(mu + 1e-8) - lse(kernel(u, w), 1)) + u
        w = epsilon * (np.log(nu + 1e-8) - lse(kernel(u, w).T, 1)) + w
        if np.abs(u - u0).mean() < thresh:
          break
      plan = np.exp(kernel(u, w))
      out[b, :, n] = plan.T @ v[b, :, kv_head]
  return out


def test_cosine_plan_reproduces_the_authors_attention():
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h, seed=4)
  got = sinkhorn_attention(q, k, v, cosine=True, epsilon=0.05, unit_rows=False)
  np.testing.assert_allclose(np.asarray(got), _otseg_float64(q, k, v), **F32)


def test_gradients_match_float64_finite_differences():
  q, k, v = inputs.qkv(B=1, T=5, S=6, N=2, K=1, H=4, h=3, seed=5)
  rng = np.random.default_rng(0)
  c = rng.standard_normal((1, 5, 2, 3))
  lengths = np.array([5])

  def loss(q, k, v):
    out = sinkhorn_attention(q, k, v, iterations=4, epsilon=0.8, kv_lengths=jnp.asarray(lengths))
    return jnp.sum(out * jnp.asarray(c, jnp.float32))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  args = [np.asarray(x, np.float64) for x in (q, k, v)]

  def loss64(q, k, v):
    plan = _sinkhorn_float64(_scores(q, k, 0.5), lengths, iterations=4, epsilon=0.8)
    return float(np.sum(_out(plan, v) * c))

  for i, name in enumerate("qkv"):
    assert np.isfinite(np.asarray(grads[i])).all(), name
  numpy_math.check_directional_derivatives(grads, args, loss64, "qkv", rng=rng,
                                           tol=tolerances.grad(jnp.float32))


def test_empty_rows_give_zeros_and_finite_gradients():
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h, seed=6)
  lengths = jnp.array([0, S])
  loss = lambda q, k, v: jnp.sum(sinkhorn_attention(q, k, v, kv_lengths=lengths) ** 2)
  out = sinkhorn_attention(q, k, v, kv_lengths=lengths)
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
  for g in jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v):
    assert np.isfinite(np.asarray(g)).all()


def test_rejects_causal_packing_and_bad_settings():
  q, k, v = inputs.qkv(B=1, T=5, N=2, K=2, H=4, h=3)
  with pytest.raises(ValueError, match="sinkhorn_attention: causal"):
    sinkhorn_attention(q, k, v, causal=True)
  with pytest.raises(ValueError, match="sinkhorn_attention: packed"):
    sinkhorn_attention(q, k, v, segment_ids=jnp.zeros((1, 5), jnp.int32))
  with pytest.raises(ValueError, match="sinkhorn_attention.*epsilon"):
    sinkhorn_attention(q, k, v, epsilon=0.0)
  with pytest.raises(ValueError, match="sinkhorn_attention.*iterations"):
    sinkhorn_attention(q, k, v, iterations=-1)
  with pytest.raises(ValueError, match="sinkhorn_attention.*scale"):
    sinkhorn_attention(q, k, v, cosine=True, scale=2.0)
