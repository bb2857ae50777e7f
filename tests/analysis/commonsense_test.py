"""Tests of attnjax.analysis.commonsense (maximum attention score)."""

import numpy as np
import pytest

from attnjax.analysis import commonsense


def _explicit(w, r, cands):
  """Loop rewrite of Klein & Nabi's MAS."""
  layers, heads = w.shape[:2]
  per = [0.0] * len(cands)
  for l in range(layers):
    for h in range(heads):
      scores = [sum(w[l, h, r, s] for s in range(a, b)) for a, b in cands]
      best = max(scores)
      for c, x in enumerate(scores):
        if x == best:
          per[c] += x
  tot = sum(per)
  return [p / tot for p in per]


def test_known_answer_and_loop():
  rng = np.random.default_rng(0)
  w = rng.dirichlet(np.ones(6), size=(2, 3, 6))  # [L=2, N=3, T=6, S=6]
  cands = [(0, 2), (3, 4)]
  w[:, :, 5, :] = 0.0
  w[:, :, 5, 3] = 0.6  # the pronoun (pos 5) mostly attends to candidate 1
  w[:, :, 5, 0] = 0.3
  w[0, 0, 5, 0], w[0, 0, 5, 3] = 0.7, 0.2  # one head votes for candidate 0
  mas = commonsense.maximum_attention_score(w, 5, cands)
  assert mas.argmax() == 1
  np.testing.assert_allclose(mas, [0.7 / (0.7 + 5 * 0.6), 5 * 0.6 / (0.7 + 5 * 0.6)])
  np.testing.assert_allclose(commonsense.maximum_attention_score(rng.dirichlet(
      np.ones(6), size=(2, 3, 6)), 4, [(0, 1), (1, 3), (5, 6)]).sum(), 1.0)
  w2 = rng.dirichlet(np.ones(6), size=(2, 3, 6))
  np.testing.assert_allclose(commonsense.maximum_attention_score(w2, 2, [(0, 2), (2, 3), (4, 6)]),
                             _explicit(w2, 2, [(0, 2), (2, 3), (4, 6)]))


def test_ties_vote_for_both_and_errors():
  w = np.zeros((1, 1, 3, 3))
  w[0, 0, 2, :2] = 0.5
  np.testing.assert_allclose(commonsense.maximum_attention_score(w, 2, [(0, 1), (1, 2)]), [0.5, 0.5])
  with pytest.raises(ValueError, match="candidate"):
    commonsense.maximum_attention_score(w, 2, [(0, 1)])
