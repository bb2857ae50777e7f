"""Segment softmax over a node's incoming edges (exact against a dense masked softmax, 1 per non-empty
segment, zeros and finite gradients for empty or fully masked ones, stable at large scores),
self-loops as PyG adds them, and padded batches of graphs that give each graph's own result."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax import graph
from tests import tolerances


def _random_graph(rng, v, e):
  """e distinct edges j -> i among v nodes, none into the last node (an empty segment)."""
  pairs = [(j, i) for i in range(v - 1) for j in range(v) if j != i]
  chosen = rng.choice(len(pairs), e, replace=False)
  s, r = np.asarray([pairs[c] for c in chosen], np.int32).T
  return s, r


def _dense_softmax(scores, s, r, v):
  """Row i of a [V, V] matrix holds the scores of the edges j -> i, -inf elsewhere."""
  out = np.zeros(scores.shape)
  for h in range(scores.shape[1]):
    dense = np.full((v, v), -np.inf)
    dense[r, s] = scores[:, h]
    for i in range(v):
      if np.isfinite(dense[i]).any():
        row = np.exp(dense[i] - dense[i][np.isfinite(dense[i])].max())
        dense[i] = row / row.sum()
      else:
        dense[i] = 0
    out[:, h] = dense[r, s]
  return out


def test_segment_softmax_equals_dense_masked_softmax():
  rng = np.random.default_rng(0)
  v, e = 7, 20
  s, r = _random_graph(rng, v, e)
  scores = rng.normal(size=(e, 3)) * 3
  got = graph.segment_softmax(jnp.asarray(scores, jnp.float32), jnp.asarray(r), v)
  np.testing.assert_allclose(got, _dense_softmax(scores, s, r, v), **tolerances.OUTPUT[jnp.float32])
  sums = jax.ops.segment_sum(got, jnp.asarray(r), v)
  np.testing.assert_allclose(sums[np.unique(r)], 1.0, **tolerances.OUTPUT[jnp.float32])
  np.testing.assert_array_equal(sums[v - 1], 0.0)   # no edge arrives at the last node
  # Stable at huge scores: one segment's shifted by 1e4 (exp would overflow) still matches the
  # dense softmax of the same float32 numbers.
  shifted = (scores + 1e4 * (r == r[0])[:, None]).astype(np.float32)
  np.testing.assert_allclose(graph.segment_softmax(jnp.asarray(shifted), jnp.asarray(r), v),
                             _dense_softmax(shifted.astype(np.float64), s, r, v),
                             **tolerances.OUTPUT[jnp.float32])


def test_masked_edges_get_zero_and_fully_masked_segments_stay_finite():
  rng = np.random.default_rng(1)
  v, e = 6, 14
  s, r = _random_graph(rng, v, e)
  scores = jnp.asarray(rng.normal(size=(e,)), jnp.float32)
  mask = np.ones(e, bool)
  mask[r == r[0]] = False          # every edge into node r[0]
  mask[np.flatnonzero(r != r[0])[0]] = False
  got = graph.segment_softmax(scores, jnp.asarray(r), v, jnp.asarray(mask))
  keep = np.flatnonzero(mask)
  np.testing.assert_array_equal(np.asarray(got)[~mask], 0.0)
  np.testing.assert_allclose(got[keep], _dense_softmax(np.asarray(scores)[keep, None], s[keep],
                                                       r[keep], v)[:, 0],
                             **tolerances.OUTPUT[jnp.float32])
  grad = jax.grad(lambda x: jnp.sum(jnp.sin(graph.segment_softmax(x, jnp.asarray(r), v,
                                                                  jnp.asarray(mask)))))(scores)
  assert bool(jnp.all(jnp.isfinite(grad)))
  np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)


def test_add_self_loops_masks_old_loops_and_fills_the_mean():
  s = jnp.asarray([0, 1, 2, 2, 1], jnp.int32)
  r = jnp.asarray([1, 2, 2, 1, 1], jnp.int32)   # 2 -> 2 and 1 -> 1 are self-loops
  edges = jnp.asarray([[1.0], [2.0], [5.0], [4.0], [7.0]])
  s2, r2, e2, mask = graph.add_self_loops(s, r, 3, edges)
  np.testing.assert_array_equal(s2, [0, 1, 2, 2, 1, 0, 1, 2])
  np.testing.assert_array_equal(r2, [1, 2, 2, 1, 1, 0, 1, 2])
  np.testing.assert_array_equal(mask, [True, True, False, True, False, True, True, True])
  # New loops: mean of the kept incoming edges (node 0: none -> 0; node 1: 1 and 4; node 2: 2).
  np.testing.assert_allclose(e2[5:, 0], [0.0, 2.5, 2.0], **tolerances.OUTPUT[jnp.float32])
  with pytest.raises(ValueError, match="fill"):
    graph.add_self_loops(s, r, 3, edges, fill="max")


def test_padded_batch_gives_each_graphs_own_output():
  """Three graphs of different sizes in one padded graph: GATv2 on the batch equals GATv2 on each
  graph alone, and padding nodes receive nothing."""
  rng = np.random.default_rng(2)
  graphs = []
  for v, e in [(4, 6), (6, 12), (3, 4)]:
    s, r = _random_graph(rng, v, e)
    graphs.append({"nodes": rng.normal(size=(v, 5)).astype(np.float32), "senders": s,
                   "receivers": r, "edges": rng.normal(size=(e, 2)).astype(np.float32)})
  batch = graph.pad_graphs(graphs, num_nodes=16, num_edges=30)
  layer = graph.GATv2Conv(out_channels=3, heads=2, edge_dim=2)
  variables = layer.init(jax.random.PRNGKey(0), batch.nodes, batch.senders, batch.receivers,
                         batch.edges)
  apply = jax.jit(lambda n, s, r, e, m: layer.apply(variables, n, s, r, e, mask=m))
  out = apply(batch.nodes, batch.senders, batch.receivers, batch.edges, batch.edge_mask)
  start = 0
  for g in graphs:
    alone = layer.apply(variables, g["nodes"], g["senders"], g["receivers"], g["edges"])
    n = len(g["nodes"])
    np.testing.assert_allclose(out[start:start + n], alone, **tolerances.OUTPUT[jnp.float32])
    start += n
  assert batch.graph_ids.tolist()[:13] == [0] * 4 + [1] * 6 + [2] * 3
  assert not batch.node_mask[13:].any() and batch.edge_mask.sum() == 22
  with pytest.raises(ValueError, match="num_nodes"):
    graph.pad_graphs(graphs, num_nodes=13, num_edges=30)
