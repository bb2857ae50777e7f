"""Topological features of attention maps.

Kushnareva et al. / Cherniavskii et al., "Acceptability Judgements via Examining the Topology of
Attention Maps", arXiv:2205.09630. A head's map `w: [T, T]` is read as a weighted undirected graph on
the T tokens: for a threshold τ, edge i–j (i ≠ j) exists when max(w_ij, w_ji) >= τ (self-loops are
dropped). Per head and threshold the features are

  E   the number of edges,
  β0  the number of connected components (C),
  β1  the number of independent cycles, E − V + C (the graph's cycle rank),

and the H0 barcode: lowering τ from 1 to 0 adds edges in decreasing weight order; each edge that
joins two components kills one, at the edge's weight (a union-find over the sorted edges). The
barcode holds V − 1 death thresholds for a connected final graph (V − C otherwise).

  graph_features(w, thresholds)   [..., T, T] maps -> {"edges", "betti0", "betti1"} [..., n_thr]
  h0_barcode(w)                   [T, T] map -> sorted (descending) merge thresholds
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from attnjax import catalog

__all__ = ["graph_features", "h0_barcode"]


def _symmetric(w: np.ndarray) -> np.ndarray:
  w = np.asarray(w, np.float64)
  if w.ndim < 2 or w.shape[-1] != w.shape[-2]:
    raise ValueError(f"topology: w must be [..., T, T] square attention maps, got shape {w.shape}")
  return np.maximum(w, np.swapaxes(w, -1, -2))


def _components(adj: np.ndarray) -> int:
  """Connected components of a boolean adjacency [V, V] (union-find)."""
  parent = list(range(adj.shape[0]))

  def find(a):
    while parent[a] != a:
      parent[a] = parent[parent[a]]
      a = parent[a]
    return a

  for i, j in zip(*np.nonzero(np.triu(adj, 1)), strict=True):
    ri, rj = find(int(i)), find(int(j))
    if ri != rj:
      parent[ri] = rj
  return len({find(a) for a in range(adj.shape[0])})


@catalog.serves(104, kind="analysis", name="attnjax.analysis.topology.graph_features")
def graph_features(w: np.ndarray, thresholds: Sequence[float]) -> dict[str, np.ndarray]:
  """Edge count, Betti 0 and Betti 1 of each thresholded attention graph (arXiv:2205.09630).

  Args:
    w: attention maps `[..., T, T]` (e.g. `[L, B, N, T, T]` from `attnjax.analysis.capture`).
    thresholds: the τ values.

  Returns:
    `{"edges", "betti0", "betti1"}`, each int64 `[..., len(thresholds)]`; β1 = E − T + β0.
  """
  sym = _symmetric(w)
  t = sym.shape[-1]
  flat = sym.reshape(-1, t, t)
  off = ~np.eye(t, dtype=bool)
  out = {k: np.zeros((flat.shape[0], len(thresholds)), np.int64) for k in ("edges", "betti0", "betti1")}
  for m in range(flat.shape[0]):
    for n, tau in enumerate(thresholds):
      adj = (flat[m] >= tau) & off
      e = int(np.triu(adj, 1).sum())
      c = _components(adj)
      out["edges"][m, n], out["betti0"][m, n], out["betti1"][m, n] = e, c, e - t + c
  return {k: v.reshape(*sym.shape[:-2], len(thresholds)) for k, v in out.items()}


@catalog.serves(104, kind="analysis", name="attnjax.analysis.topology.h0_barcode")
def h0_barcode(w: np.ndarray) -> np.ndarray:
  """H0 persistence barcode of one head's map `[T, T]`: the thresholds (descending) at which two
  components merge as τ falls from +inf, i.e. Kruskal's maximum spanning forest edge weights over
  the symmetrized weights max(w_ij, w_ji) (arXiv:2205.09630). Zero-weight pairs never connect."""
  sym = _symmetric(w)
  if sym.ndim != 2:
    raise ValueError(f"h0_barcode: w must be one head's [T, T] map, got shape {sym.shape}")
  t = sym.shape[0]
  iu, ju = np.triu_indices(t, 1)
  weights = sym[iu, ju]
  order = np.argsort(-weights, kind="stable")
  parent = list(range(t))

  def find(a):
    while parent[a] != a:
      parent[a] = parent[parent[a]]
      a = parent[a]
    return a

  deaths = []
  for e in order:
    if weights[e] <= 0:
      break
    ri, rj = find(int(iu[e])), find(int(ju[e]))
    if ri != rj:
      parent[ri] = rj
      deaths.append(weights[e])
  return np.asarray(deaths, np.float64)
