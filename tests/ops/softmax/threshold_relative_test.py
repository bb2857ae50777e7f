"""Threshold Relative Attention (#161): keys scoring at or below a threshold are dropped from the
softmax, and a kept key's distance to its query counts only the kept keys between them before the
forget-gate bias δ_i · c_ij is applied.

Checked against a float64 rewrite with an explicit loop for the counts, and the defining properties:
a threshold of -∞ keeps every visible key and is the plain relative bias δ_i (i - j) (with a
constant gate, ALiBi); a dropped key gets exactly zero weight and does not count in the distance, so
TRA on a sequence equals TRA (threshold -∞) on the same sequence with its irrelevant keys removed.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.softmax import alibi_attention, threshold_relative_attention
from tests import inputs
from tests import tolerances

F32 = tolerances.output(jnp.float32)
B, T, N, K, H, h = 2, 13, 4, 2, 8, 6


def _log_forget(seed, shape=(B, T, N)):
  return jax.nn.log_sigmoid(2.0 * jax.random.normal(jax.random.PRNGKey(seed), shape))


def _tra_float64(q, k, v, log_forget, *, threshold, scale, bias_distance=None):
  """The paper's computation per row, in float64: keep s_ij > τ (j <= i), c_ij = number of kept
  keys l with j <= l <= i, softmax over kept j of s_ij + δ_i c_ij. `bias_distance` replaces c."""
  q, k, v, lf = (np.asarray(x, np.float64) for x in (q, k, v, log_forget))
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) * scale
  Bq, Nq, L, _ = s.shape
  out = np.zeros(q.shape[:3] + (v.shape[-1],))
  for b in range(Bq):
    for n in range(Nq):
      for i in range(L):
        keep = [j for j in range(i + 1) if s[b, n, i, j] > threshold]
        if not keep:
          continue
        c = {j: sum(1 for l in keep if j <= l <= i) for j in keep}
        dist = c if bias_distance is None else {j: bias_distance(i, j) for j in keep}
        z = np.array([s[b, n, i, j] + lf[b, i, n] * dist[j] for j in keep])
        w = np.exp(z - z.max())
        out[b, i, n] = (w / w.sum()) @ v[b, keep, n]
  return out


@pytest.mark.parametrize("threshold", [0.0, 0.3])
def test_equals_the_papers_computation(threshold):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=1)
  lf = _log_forget(2)
  out = inputs.jit_with(threshold_relative_attention, threshold=threshold)(q, k, v, log_forget=lf)
  want = _tra_float64(q, k, v, lf, threshold=threshold, scale=H ** -0.5)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def test_threshold_minus_infinity_is_the_plain_relative_bias():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=3)
  lf = _log_forget(4)
  fn = inputs.jit_with(threshold_relative_attention, threshold=-np.inf)
  out = fn(q, k, v, log_forget=lf)
  want = _tra_float64(q, k, v, lf, threshold=-np.inf, scale=H ** -0.5,
                      bias_distance=lambda i, j: i - j)
  np.testing.assert_allclose(np.asarray(out), want, **F32)
  # A constant gate δ = -m per head is ALiBi with slopes m.
  slopes = jnp.array([0.5, 0.25, 0.125, 1.0])
  out = fn(q, k, v, log_forget=jnp.broadcast_to(-slopes, (B, T, N)))
  want = alibi_attention(q, k, v, causal=True, slopes=slopes)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), **F32)


def _relevant_and_irrelevant(seed, L=12):
  """Queries near a direction u; keys +u (relevant: score > 0 for every query) or -u (irrelevant:
  score < 0), with small noise; one head, so the scores' signs are known by construction."""
  rng = np.random.default_rng(seed)
  u = np.zeros(4)
  u[0] = 2.0
  relevant = rng.random(L) < 0.5
  relevant[0] = True
  q = u + 0.2 * rng.standard_normal((L, 4))
  k = np.where(relevant[:, None], 1.0, -1.0) * u + 0.2 * rng.standard_normal((L, 4))
  v = rng.standard_normal((L, 3))
  lf = np.log(rng.uniform(0.3, 0.9, (L,)))
  as_arrays = lambda *xs: tuple(jnp.asarray(x[None, :, None], jnp.float32) for x in xs)
  q4, k4, v4 = as_arrays(q, k, v)
  assert np.all(np.einsum("ih,jh->ij", q[relevant], k[relevant]) > 0)
  assert np.all(np.einsum("ih,jh->ij", q, k[~relevant]) < 0)
  return relevant, q4, k4, v4, jnp.asarray(lf[None, :, None], jnp.float32)


def test_dropped_keys_get_zero_weight_and_do_not_count_in_the_distance():
  relevant, q, k, v, lf = _relevant_and_irrelevant(5)
  L = q.shape[1]
  # One-hot values read the weights: a dropped key's column is exactly zero.
  w = np.asarray(threshold_relative_attention(q, k, jnp.eye(L)[None, :, None], log_forget=lf))
  assert np.all(w[0, :, 0][:, ~relevant] == 0.0)
  assert np.all(w[0, :, 0][np.tril(np.ones((L, L), bool)) & relevant[None]] > 0.0)
  # Removing the irrelevant tokens changes nothing for the relevant queries: the distance to a
  # kept key counts only kept keys, so it is the distance in the shortened sequence.
  full = threshold_relative_attention(q, k, v, log_forget=lf)
  keep = np.flatnonzero(relevant)
  short = threshold_relative_attention(q[:, keep], k[:, keep], v[:, keep], log_forget=lf[:, keep],
                                       threshold=-np.inf)
  np.testing.assert_allclose(np.asarray(full[:, keep]), np.asarray(short), **F32)
  # ... whereas plain relative attention over all keys (threshold -∞) does see them.
  plain = threshold_relative_attention(q, k, v, log_forget=lf, threshold=-np.inf)
  assert tolerances.rel_rms(plain[:, keep], short) > tolerances.CHANGED_REL_RMS


def test_rows_with_no_kept_key_give_zeros_and_finite_gradients():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=6)
  lf = _log_forget(7)

  def loss(q, k, v, lf):
    return jnp.sum(threshold_relative_attention(q, k, v, log_forget=lf, threshold=1e3) ** 2)

  out = threshold_relative_attention(q, k, v, log_forget=lf, threshold=1e3)
  np.testing.assert_array_equal(np.asarray(out), 0.0)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, lf)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  # Mixed rows (threshold 0): finite gradients, and the gate gets one.
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(threshold_relative_attention(
      *a[:3], log_forget=a[3]) ** 2), argnums=(0, 1, 2, 3)))(q, k, v, lf)
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  assert np.any(np.asarray(grads[3]) != 0.0)


def test_bad_input_is_a_clear_error():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h)
  with pytest.raises(ValueError, match=r"threshold_relative_attention.*log_forget.*\[B, T, N\]"):
    threshold_relative_attention(q, k, v, log_forget=jnp.zeros((B, T, K)))
  with pytest.raises(ValueError, match="causal"):
    threshold_relative_attention(q, k, v, log_forget=jnp.zeros((B, T, N)), causal=False)
  with pytest.raises(ValueError, match="implementation"):
    threshold_relative_attention(q, k, v, log_forget=jnp.zeros((B, T, N)), implementation="xla")
