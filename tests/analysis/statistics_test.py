"""Tests of attnjax.analysis.statistics against loop rewrites and closed forms."""

import math

import numpy as np
import pytest

from attnjax.analysis import statistics
from tests import tolerances

TOL = tolerances.FLOAT64_REORDERED


def _maps(rng, shape):
  return rng.dirichlet(np.ones(shape[-1]), size=shape[:-1])


def test_entropy_closed_forms_and_padding():
  B, N, T = 2, 3, 4
  w = np.zeros((B, N, T, T))
  w[:, 0] = 1.0 / T                        # uniform: log T
  w[:, 1, :, 0] = 1.0                      # one-hot: 0
  w[:, 2, :, :2] = 0.5                     # two keys: log 2
  np.testing.assert_allclose(statistics.entropy(w), [math.log(T), 0.0, math.log(2)], **TOL)
  # Padded query rows are left out: garbage there changes nothing.
  w2 = w.copy()
  w2[1, :, 3] = np.eye(T)[2]
  np.testing.assert_allclose(statistics.entropy(w2, lengths=np.array([4, 3])),
                             [math.log(T), 0.0, math.log(2)], **TOL)
  assert not np.allclose(statistics.entropy(w2), [math.log(T), 0.0, math.log(2)])


def test_key_share_offset_profile_against_loops():
  rng = np.random.default_rng(0)
  L, B, N, T = 2, 3, 2, 5
  w = _maps(rng, (L, B, N, T, T))
  lengths = np.array([5, 3, 4])
  keys = rng.random((B, T)) < 0.4
  want_share = np.zeros((L, N))
  K = 2
  want_prof = np.zeros((L, N, 2 * K + 1))
  rows = 0
  for b in range(B):
    for t in range(lengths[b]):
      rows += 1
      want_share += (w[:, b, :, t] * keys[b]).sum(-1)
      for o in range(-K, K + 1):
        if 0 <= t + o < T:
          want_prof[..., o + K] += w[:, b, :, t, t + o]
  np.testing.assert_allclose(statistics.key_share(w, keys, lengths), want_share / rows, **TOL)
  np.testing.assert_allclose(statistics.offset_profile(w, K, lengths), want_prof / rows, **TOL)
  np.testing.assert_allclose(statistics.first_token_share(w, lengths),
                             statistics.key_share(w, np.arange(T) == 0, lengths), **TOL)
  # A previous-token head puts all of its profile at offset -1 (query 0 has no previous key).
  prev = np.zeros((1, 1, T, T))
  prev[0, 0, np.arange(1, T), np.arange(T - 1)] = 1.0
  prev[0, 0, 0, 0] = 1.0
  np.testing.assert_allclose(statistics.offset_profile(prev, 1)[0], [(T - 1) / T, 1 / T, 0.0], **TOL)


def test_head_distance_and_diversity():
  rng = np.random.default_rng(1)
  B, N, T = 2, 3, 4
  w = _maps(rng, (B, N, T, T))
  d = statistics.head_distance(w)
  want = np.zeros((N, N))
  for i in range(N):
    for j in range(N):
      for b in range(B):
        for t in range(T):
          p, q = w[b, i, t], w[b, j, t]
          m = (p + q) / 2
          want[i, j] += (np.sum(p * np.log(p / m)) + np.sum(q * np.log(q / m))) / 2
  np.testing.assert_allclose(d, want / (B * T), **TOL)
  assert np.allclose(np.diag(d), 0.0) and np.allclose(d, d.T)
  # Identical heads: diversity 0; heads with disjoint supports: log 2.
  same = np.repeat(w[:, :1], N, axis=1)
  np.testing.assert_allclose(statistics.head_diversity(same), 0.0, atol=TOL["atol"])
  disjoint = np.zeros((1, 2, 2, 2))
  disjoint[0, 0, :, 0] = disjoint[0, 1, :, 1] = 1.0
  np.testing.assert_allclose(statistics.head_diversity(disjoint), math.log(2), **TOL)


def test_bad_input():
  with pytest.raises(ValueError, match="weights must be"):
    statistics.entropy(np.ones((3, 3)))
  with pytest.raises(ValueError, match=r"lengths must be \[B\]"):
    statistics.entropy(np.ones((2, 1, 3, 3)) / 3, lengths=np.array([3]))
  with pytest.raises(ValueError, match="keys must be"):
    statistics.key_share(np.ones((2, 1, 3, 3)) / 3, np.ones(4, bool))
