"""Tests of attnjax.analysis.additive_probe (local additive attention, arXiv:2104.06607)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.analysis import additive_probe
from tests import tolerances


def _params(d=4, a=5):
  ks = jax.random.split(jax.random.PRNGKey(0), 4)
  return {"W": jax.random.normal(ks[0], (d, a)), "U": jax.random.normal(ks[1], (d, a)),
          "v": jax.random.normal(ks[2], (a,))}, jax.random.normal(ks[3], (2, 7, d))


def _loop(x, p, r):
  x, p = np.asarray(x, np.float64), {k: np.asarray(v, np.float64) for k, v in p.items()}
  b, t, _ = x.shape
  w = np.zeros((b, t, t))
  for i in range(b):
    for q in range(t):
      s = [j for j in range(t) if abs(q - j) <= r]
      e = np.array([p["v"] @ np.tanh(p["W"].T @ x[i, q] + p["U"].T @ x[i, j]) for j in s])
      w[i, q, s] = np.exp(e - e.max()) / np.exp(e - e.max()).sum()
  return w @ x, w


def test_matches_loop_and_window():
  p, x = _params()
  out, w = additive_probe.local_additive_attention(x, p, 2)
  ref_out, ref_w = _loop(x, p, 2)
  np.testing.assert_allclose(w, ref_w, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(out, ref_out, **tolerances.output(jnp.float32))
  far = np.abs(np.arange(7)[:, None] - np.arange(7)[None]) > 2
  assert np.all(np.asarray(w)[:, far] == 0.0)


def test_radius_zero_is_identity_and_profile():
  p, x = _params()
  out, w = additive_probe.local_additive_attention(x, p, 0)
  np.testing.assert_allclose(out, x, **tolerances.output(jnp.float32))
  _, w = additive_probe.local_additive_attention(x, p, 3)
  prof = additive_probe.offset_profile(w, 3)
  want = [np.mean([w[b, t, t + o] if 0 <= t + o < 7 else 0.0 for b in range(w.shape[0])
                    for t in range(7)]) for o in range(-3, 4)]
  np.testing.assert_allclose(prof, want, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(prof.sum(), 1.0, **tolerances.FEATURE_SUM[jnp.float32])
  with pytest.raises(ValueError, match="x must be"):
    additive_probe.local_additive_attention(x[0], p, 1)
