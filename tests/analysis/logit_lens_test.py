"""Tests of attnjax.analysis.logit_lens."""

import numpy as np
import pytest

from attnjax.analysis import logit_lens


def test_rank_one_unembedding_picks_the_token():
  rng = np.random.default_rng(0)
  d, vocab = 8, 11
  u = rng.normal(size=(vocab, d)) * 0.01
  direction = rng.normal(size=d)
  u[7] = 3.0 * direction  # token 7 aligned with the probe direction
  ids, logits = logit_lens.project(np.stack([direction, -direction]), u, k=3)
  assert ids[0, 0] == 7 and ids[1, 0] != 7 and ids[1, -1] != 7
  assert (np.diff(logits, axis=-1) <= 0).all()
  np.testing.assert_allclose(logits[0, 0], u[7] @ direction)
  with pytest.raises(ValueError, match="V, d"):
    logit_lens.project(np.ones(3), u)


def test_flow_graph_edges_match_weights():
  w = np.zeros((2, 2, 3, 3))
  w[:, :, np.arange(3), np.arange(3)] = 1.0
  w[1, 0, 2, 0], w[1, 0, 2, 2] = 0.5, 0.5  # head 0 of layer 1: token 2 reads token 0 half
  g = logit_lens.flow_graph(w)
  assert len(g["nodes"]) == 9
  edges = {(a, b): x for a, b, x in g["edges"]}
  assert edges[((1, 0), (2, 2))] == pytest.approx(0.25)  # mean of 0.5 and 0
  assert edges[((1, 2), (2, 2))] == pytest.approx(0.75)
  assert ((0, 0), (1, 2)) not in edges
  assert sum(x for (_, b), x in edges.items() if b == (2, 2)) == pytest.approx(1.0)
  assert logit_lens.flow_graph(w, head=1)["edges"][-1] == ((1, 2), (2, 2), 1.0)
