"""Tests of attnjax.analysis.topology against hand-built graphs with known counts."""

import numpy as np
import pytest

from attnjax.analysis import topology


def _graph(t, edges, weight=0.5):
  w = np.zeros((t, t))
  for i, j in edges:
    w[i, j] = weight  # one direction only: the symmetrization must recover the edge
  return w


def test_path_cycle_two_components():
  path = _graph(4, [(0, 1), (1, 2), (2, 3)])
  cycle = _graph(4, [(0, 1), (1, 2), (2, 3), (3, 0)])
  two = _graph(5, [(0, 1), (1, 2), (2, 0), (3, 4)])
  for w, (e, b0, b1) in [(path, (3, 1, 0)), (cycle, (4, 1, 1)), (two, (4, 2, 1))]:
    f = topology.graph_features(w, [0.4, 0.6])
    assert f["edges"].tolist() == [e, 0]
    assert f["betti0"].tolist() == [b0, w.shape[0]]
    assert f["betti1"].tolist() == [b1, 0]


def test_self_loops_dropped_and_batched_shape():
  w = np.eye(3)[None, None].repeat(2, 0)  # [2, 1, 3, 3]: only self-loops
  f = topology.graph_features(w, [0.5])
  assert f["edges"].shape == (2, 1, 1)
  assert (f["edges"] == 0).all() and (f["betti0"] == 3).all()


def test_barcode_merge_thresholds():
  w = np.zeros((4, 4))
  w[0, 1], w[1, 2], w[2, 0], w[3, 2] = 0.9, 0.7, 0.8, 0.2
  # Kruskal: 0.9 joins {0,1}, 0.8 joins 2, 0.7 closes a cycle (no death), 0.2 joins 3.
  np.testing.assert_array_equal(topology.h0_barcode(w), [0.9, 0.8, 0.2])
  # β0 at τ equals T minus the number of deaths >= τ.
  for tau in (0.85, 0.75, 0.5, 0.1):
    b0 = topology.graph_features(w, [tau])["betti0"][0]
    assert b0 == 4 - (topology.h0_barcode(w) >= tau).sum()


def test_bad_shape():
  with pytest.raises(ValueError, match="T, T"):
    topology.graph_features(np.zeros((3, 4)), [0.1])


def _bfs_betti0(w, tau):
  t = w.shape[0]
  seen, comps = set(), 0
  for s in range(t):
    if s in seen:
      continue
    comps += 1
    stack = [s]
    while stack:
      a = stack.pop()
      if a in seen:
        continue
      seen.add(a)
      stack += [b for b in range(t) if b != a and max(w[a, b], w[b, a]) >= tau and b not in seen]
  return comps


def test_random_maps_against_explicit_loop():
  rng = np.random.default_rng(0)
  w = rng.dirichlet(np.ones(6), size=(2, 6))  # [2, 6, 6] softmax-like rows
  taus = [0.05, 0.15, 0.3]
  f = topology.graph_features(w, taus)
  for m in range(2):
    for n, tau in enumerate(taus):
      e = sum(max(w[m, i, j], w[m, j, i]) >= tau for i in range(6) for j in range(i + 1, 6))
      c = _bfs_betti0(w[m], tau)
      assert (f["edges"][m, n], f["betti0"][m, n], f["betti1"][m, n]) == (e, c, e - 6 + c)
