"""Graph-structured data as tokens: attention on graph neighbours, and the k-hop window mask.

"Attention Mechanisms Perspective: Exploring LLM Processing of Graph-Structured Data",
arXiv:2505.02130. A graph's nodes are written into the sequence as token spans; the paper measures
how much of a node token's attention lands on the tokens of its graph neighbours, and proposes
windowed attention that lets node tokens see only nearby nodes.

  hop_distances(num_nodes, edges)                       all-pairs BFS hop counts (-1: unreachable)
  neighbour_attention(weights, spans, edges)            [..., T, S] -> neighbour / non-neighbour share
  k_hop_mask(spans, edges, k, length)                   a `mask_mod` (attnjax.core.masks style)

The k-hop mask: a query in node u's span may see a key in node v's span iff hop(u, v) <= k and the
key is causal (kv_idx <= q_idx); keys outside every node span are seen causally, and so are all
keys of queries outside node spans. For a connected graph and k >= its diameter it is the causal mask.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from attnjax import catalog
from attnjax.typing import MaskMod

__all__ = ["hop_distances", "k_hop_mask", "neighbour_attention"]


def hop_distances(num_nodes: int, edges: Sequence[tuple[int, int]]) -> np.ndarray:
  """All-pairs hop counts `[V, V]` of an undirected graph by BFS; -1 where unreachable."""
  adj: list[list[int]] = [[] for _ in range(num_nodes)]
  for u, v in edges:
    if not (0 <= u < num_nodes and 0 <= v < num_nodes):
      raise ValueError(f"graph_tokens: edge ({u}, {v}) outside nodes [0, {num_nodes})")
    adj[u].append(v)
    adj[v].append(u)
  dist = np.full((num_nodes, num_nodes), -1, np.int64)
  for s in range(num_nodes):
    dist[s, s] = 0
    queue = deque([s])
    while queue:
      a = queue.popleft()
      for b in adj[a]:
        if dist[s, b] < 0:
          dist[s, b] = dist[s, a] + 1
          queue.append(b)
  return dist


def _node_of(spans: Sequence[tuple[int, int]], length: int) -> np.ndarray:
  node = np.full(length, -1, np.int64)
  for i, (a, b) in enumerate(spans):
    if not 0 <= a < b <= length:
      raise ValueError(f"graph_tokens: node span ({a}, {b}) outside [0, {length}]")
    node[a:b] = i
  return node


@catalog.serves(1, kind="analysis", name="attnjax.analysis.graph_tokens.neighbour_attention")
def neighbour_attention(weights: np.ndarray, spans: Sequence[tuple[int, int]],
                        edges: Sequence[tuple[int, int]]) -> dict[str, np.ndarray]:
  """Share of each node's attention on its neighbours' tokens vs other nodes' tokens (2505.02130).

  Args:
    weights: maps `[..., T, S]` (e.g. `[L, B, N, T, S]`, self-attention positions).
    spans: node i's token span `(start, stop)` (stop exclusive).
    edges: undirected graph edges between node indices.

  Returns:
    `{"neighbour", "non_neighbour"}`, each `[..., V]`: the attention from node i's tokens (mean over
    its tokens) summed over the tokens of its neighbours / of the other non-neighbour nodes.
  """
  w = np.asarray(weights, np.float64)
  hops = hop_distances(len(spans), edges)
  node = _node_of(spans, w.shape[-1])
  out = {"neighbour": [], "non_neighbour": []}
  for i, (a, b) in enumerate(spans):
    rows = w[..., a:b, :].mean(axis=-2)  # [..., S]
    nb = np.isin(node, np.nonzero(hops[i] == 1)[0])
    other = (node >= 0) & (node != i) & ~nb
    out["neighbour"].append(rows[..., nb].sum(-1))
    out["non_neighbour"].append(rows[..., other].sum(-1))
  return {key: np.stack(v, axis=-1) for key, v in out.items()}


@catalog.serves(1, kind="analysis", name="attnjax.analysis.graph_tokens.k_hop_mask")
def k_hop_mask(spans: Sequence[tuple[int, int]], edges: Sequence[tuple[int, int]], k: int,
               length: int) -> MaskMod:
  """The k-hop node window as a `mask_mod(b, n, q_idx, kv_idx) -> bool` (arXiv:2505.02130)."""
  if k < 0:
    raise ValueError(f"graph_tokens.k_hop_mask: k must be >= 0, got {k}")
  hops = hop_distances(len(spans), edges)
  node = _node_of(spans, length)
  qn, kn = node[:, None], node[None, :]
  near = (hops[np.maximum(qn, 0), np.maximum(kn, 0)] >= 0) & (hops[np.maximum(qn, 0),
                                                                    np.maximum(kn, 0)] <= k)
  table = ((qn < 0) | (kn < 0) | near) & (np.arange(length)[None, :] <= np.arange(length)[:, None])
  table = jnp.asarray(table)

  def mask_mod(b, n, q_idx, kv_idx):
    del b, n
    return table[q_idx, kv_idx]

  return mask_mod
