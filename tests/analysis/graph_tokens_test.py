"""Tests of attnjax.analysis.graph_tokens."""

import numpy as np

from attnjax.analysis import graph_tokens

EDGES = [(0, 1), (1, 2), (2, 3)]  # a path on 4 nodes, diameter 3
SPANS = [(1, 3), (3, 4), (5, 7), (7, 8)]  # tokens 0, 4, 8 belong to no node
LENGTH = 9


def _explicit_allowed(k):
  hops = {(u, u): 0 for u in range(4)}
  for u in range(4):
    for v in range(4):
      hops[u, v] = abs(u - v)  # path graph: hop count is the index distance
  node = {t: i for i, (a, b) in enumerate(SPANS) for t in range(a, b)}
  return np.array([[kv <= q and (q not in node or kv not in node or hops[node[q], node[kv]] <= k)
                    for kv in range(LENGTH)] for q in range(LENGTH)])


def _table(mod):
  q, kv = np.meshgrid(np.arange(LENGTH), np.arange(LENGTH), indexing="ij")
  return np.asarray(mod(0, 0, q, kv))


def test_bfs_hops_and_k_hop_mask():
  hops = graph_tokens.hop_distances(5, EDGES)
  assert hops[0].tolist() == [0, 1, 2, 3, -1]
  for k in range(3):
    np.testing.assert_array_equal(_table(graph_tokens.k_hop_mask(SPANS, EDGES, k, LENGTH)),
                                  _explicit_allowed(k))
  causal = np.tril(np.ones((LENGTH, LENGTH), bool))
  for k in (3, 10):
    np.testing.assert_array_equal(_table(graph_tokens.k_hop_mask(SPANS, EDGES, k, LENGTH)), causal)
  assert not (_table(graph_tokens.k_hop_mask(SPANS, EDGES, 2, LENGTH)) == causal).all()


def test_neighbour_attention_shares():
  w = np.zeros((2, LENGTH, LENGTH))  # [heads, T, S]
  w[0, 1, 3], w[0, 1, 5] = 0.6, 0.4  # node 0's first token: 0.6 on node 1 (nbr), 0.4 on node 2
  w[0, 2, 0] = 1.0                   # node 0's second token: on a non-node token
  shares = graph_tokens.neighbour_attention(w, SPANS, EDGES)
  assert shares["neighbour"].shape == (2, 4)
  np.testing.assert_allclose(shares["neighbour"][0, 0], 0.3)
  np.testing.assert_allclose(shares["non_neighbour"][0, 0], 0.2)
  assert (shares["neighbour"][1] == 0).all()
