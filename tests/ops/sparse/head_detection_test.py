"""QAdA (arXiv:2502.09647): a head needs full attention for a query when the attention mass it puts
on the bulk (beyond the sinks and the local window), predicted from the exact local scores and a
Gaussian model of the bulk keys, n·exp(q·μ_K·scale + scale²·qᵀΣ_Kq/2), exceeds a threshold.

Checked against a float64 numpy rewrite of the predicted and the true (oracle) bulk mass, with GQA,
a cache at an offset and padding; that the test reads no bulk key (only their moments); the catalog's
claim on synthetic heads built to be local (keys near the query aligned with it) or long-range (the
bulk's mean or its spread along the query) — the detector's labels match the oracle's — and the
estimate against the true mass on Gaussian bulk keys.
"""

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.ops.sparse import head_detection as hd
from tests import inputs
from tests import tolerances

SINKS, WINDOW = 2, 4


def _ranges(p, length, s_):
  """Sink, local and bulk key indices of a query at position p (numpy, the module's definition)."""
  end = min(p + 1, length)
  sinks = [j for j in range(min(SINKS, end))]
  local = [j for j in range(max(SINKS, end - WINDOW), end)]
  bulk = [j for j in range(SINKS, max(SINKS, end - WINDOW))]
  assert len(sinks) + len(local) + len(bulk) == end and end <= s_
  return sinks, local, bulk


def _numpy(q, k, mean, cov, *, q_offset, lengths):
  """float64 predicted (Gaussian bulk) and true bulk mass `[B, T, N]`."""
  q, k, mean, cov = (np.asarray(x, np.float64) for x in (q, k, mean, cov))
  b_, t_, n_, h_ = q.shape
  g = n_ // k.shape[2]
  scale = h_ ** -0.5
  predicted, true = np.zeros((b_, t_, n_)), np.zeros((b_, t_, n_))
  for b in range(b_):
    for t in range(t_):
      sinks, local, bulk = _ranges(q_offset + t, lengths[b], k.shape[1])
      for n in range(n_):
        kk, qq = k[b, :, n // g], q[b, t, n]
        s = scale * kk @ qq
        near = np.exp(s[sinks + local]).sum()
        if bulk:
          mu = scale * qq @ mean[b, n // g]
          var = scale ** 2 * qq @ cov[b, n // g] @ qq
          guess = len(bulk) * np.exp(mu + var / 2)
          predicted[b, t, n] = guess / (guess + near)
          true[b, t, n] = np.exp(s[bulk]).sum() / (np.exp(s[bulk]).sum() + near)
  return predicted, true


def test_predicted_and_true_mass_match_float64_rewrite():
  B, T, S, N, K, H = 2, 3, 17, 4, 2, 8
  q, k, _ = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=1, seed=1)
  lengths = (17, 12)
  offset = 9                                     # queries at 9..11: row 1's last one is padded out
  rng = np.random.default_rng(0)
  mean = rng.standard_normal((B, K, H)).astype(np.float32) * 0.3
  a = rng.standard_normal((B, K, H, H)).astype(np.float32) * 0.3
  cov = a @ np.swapaxes(a, -1, -2)
  kw = dict(num_sinks=SINKS, local_window=WINDOW, q_offset=offset, kv_lengths=jnp.asarray(lengths))
  flags, predicted = jax.jit(lambda *x: hd.long_context_head_detector(
      *x[:2], key_mean=x[2], key_cov=x[3], threshold=0.3, **kw))(q, k, mean, cov)
  true = jax.jit(lambda *x: hd.long_context_mass(*x, **kw))(q, k)
  want_predicted, want_true = _numpy(q, k, mean, cov, q_offset=offset, lengths=lengths)
  np.testing.assert_allclose(predicted, want_predicted, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(true, want_true, **tolerances.output(jnp.float32))
  np.testing.assert_array_equal(flags, want_predicted > 0.3)


def test_reads_no_bulk_key():
  B, S, N, K, H = 1, 40, 2, 2, 8
  q, k, _ = inputs.qkv(B=B, T=1, S=S, N=N, K=K, H=H, h=1, seed=2)
  _, _, bulk = hd.key_ranges(B, 1, S, num_sinks=SINKS, local_window=WINDOW, q_offset=S - 1)
  mean, cov = hd.key_moments(k, bulk[:, 0])
  detect = jax.jit(lambda q, k: hd.long_context_head_detector(
      q, k, key_mean=mean, key_cov=cov, num_sinks=SINKS, local_window=WINDOW, q_offset=S - 1)[1])
  moved = jnp.where(bulk[0, 0][None, :, None, None], 10.0 * k + 3.0, k)
  np.testing.assert_array_equal(detect(q, moved), detect(q, k))
  oracle = jax.jit(lambda q, k: hd.long_context_mass(q, k, num_sinks=SINKS, local_window=WINDOW,
                                                     q_offset=S - 1))
  assert tolerances.rel_rms(oracle(q, moved), oracle(q, k)) > tolerances.CHANGED_REL_RMS


def _synthetic_heads(seed=3, S=1024, H=16):
  """One decode query (position S-1) and keys for 4 heads (K = N): head 0 local (its window keys
  carry the query's direction), head 1 local (an attention-sink head: the sink keys carry it), head
  2 long-range (the bulk's mean along the query), head 3 long-range (the bulk's spread along the
  query). Bulk keys are Gaussian."""
  rng = np.random.default_rng(seed)
  N = 4
  q = rng.standard_normal((1, 1, N, H))
  q /= np.linalg.norm(q, axis=-1, keepdims=True)
  k = rng.standard_normal((1, S, N, H)) * 0.5
  direction = q[0, 0]                                                        # [N, H]
  k[0, -WINDOW:, 0] += 6.0 * direction[0]                                    # local keys match
  k[0, :SINKS, 1] += 6.0 * direction[1]                                      # sinks match
  k[0, :, 2] += 3.0 * direction[2]                                           # bulk mean along q
  k[0, :, 3] += 1.0 * rng.standard_normal((S, 1)) * direction[3]             # bulk spread along q
  q *= 4.0 * np.sqrt(H)                                                      # |q|·scale = 4
  return jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32)


@jax.jit
def _detect_and_oracle(q, k):
  """One decode query per batch row at the end of the cache: the detector with the bulk's own
  moments, and the oracle."""
  B, S = k.shape[:2]
  kw = dict(num_sinks=SINKS, local_window=WINDOW, q_offset=S - 1)
  _, _, bulk = hd.key_ranges(B, 1, S, **kw)
  mean, cov = hd.key_moments(k, bulk[:, 0])
  flags, predicted = hd.long_context_head_detector(q, k, key_mean=mean, key_cov=cov, threshold=0.5,
                                                   **kw)
  return flags, predicted, hd.long_context_mass(q, k, **kw)


def test_separates_local_and_long_range_heads_like_the_oracle():
  q, k = _synthetic_heads()
  flags, predicted, true = _detect_and_oracle(q, k)
  true = np.asarray(true)[0, 0]
  # The heads are what they were built to be: the oracle's masses are far from the threshold.
  assert np.all(true[:2] < 0.5 - tolerances.HEAD_MASS_MARGIN), true
  assert np.all(true[2:] > 0.5 + tolerances.HEAD_MASS_MARGIN), true
  np.testing.assert_array_equal(np.asarray(flags)[0, 0], [False, False, True, True])
  np.testing.assert_allclose(np.asarray(predicted)[0, 0], true, **tolerances.GAUSSIAN_BULK_MASS)


def test_gaussian_estimate_tracks_the_true_mass_across_its_range():
  """Gaussian bulk keys with a random covariance per head; twelve decode steps (batch rows) whose
  local keys carry more and more of the query's direction: the predicted bulk mass follows the true
  one from nearly all bulk to nearly all local."""
  rng = np.random.default_rng(4)
  B, S, N, H = 12, 1024, 4, 16
  a = 0.5 * rng.standard_normal((N, H, H)) / np.sqrt(H)
  k = np.einsum("nhg,sng->snh", a, rng.standard_normal((S, N, H))) + 0.1
  q = rng.standard_normal((B, 1, N, H))
  q *= 3.0 * np.sqrt(H) / np.linalg.norm(q, axis=-1, keepdims=True)        # |q|·scale = 3
  k = np.repeat(k[None], B, axis=0)
  k[:, -WINDOW:] += np.linspace(0.0, 4.0, B)[:, None, None, None] * q / (3.0 * np.sqrt(H))
  _, predicted, true = _detect_and_oracle(jnp.asarray(q, jnp.float32), jnp.asarray(k, jnp.float32))
  true = np.asarray(true)
  assert true.min() < 0.1 and true.max() > 0.9, (true.min(), true.max())    # the whole range
  np.testing.assert_allclose(np.asarray(predicted), true, **tolerances.GAUSSIAN_BULK_MASS)
