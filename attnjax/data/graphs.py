"""Graph tasks for the graph attention layers: two node-classification graphs built with networkx
(nothing downloaded) and the GATv2 paper's DictionaryLookup, where static attention fails.

Each node-classification task is a dict of numpy arrays: "nodes" `[V, F]` features, "senders",
"receivers" `[E]` (both directions of every undirected edge), "labels" `[V]`, "train" / "test"
`[V]` bool masks, and "num_classes".

  karate_club()                  Zachary's karate club (34 members, the two clubs after the split;
                                 one-hot identity features, 2 labelled members per club)
  planted_partition(...)         4 communities of 25 nodes (p_in 0.3, p_out 0.02), features the
                                 community's one-hot under heavy Gaussian noise: a node alone is
                                 hard to classify, its neighbours pooled are not
  dictionary_lookup(rng, k, batch)  Brody et al., arXiv:2105.14491, Sec. 4.1: a complete bipartite
                                 graph from k key nodes to k query nodes; key j holds an attribute
                                 a_j and a value v_j, query i an attribute; the label of query i is
                                 the value of the key whose attribute equals its own. Every query
                                 must rank the keys by a different key: impossible for attention
                                 whose ranking is the same for every query (GAT)
"""

from __future__ import annotations

import networkx as nx
import numpy as np

__all__ = ["dictionary_lookup", "dictionary_lookup_graph", "karate_club", "planted_partition"]


def _both_directions(g: nx.Graph) -> tuple[np.ndarray, np.ndarray]:
  s, r = np.asarray(list(g.edges()), np.int32).T
  return np.concatenate([s, r]), np.concatenate([r, s])


def karate_club(labelled_per_class: int = 2, seed: int = 0) -> dict:
  """Zachary's karate club: labels 0 ("Mr. Hi") and 1 ("Officer"); the training nodes are the two
  leaders (0 and 33) plus random members up to `labelled_per_class` per club."""
  g = nx.karate_club_graph()
  v = g.number_of_nodes()
  labels = np.asarray([0 if g.nodes[i]["club"] == "Mr. Hi" else 1 for i in range(v)], np.int32)
  rng = np.random.default_rng(seed)
  train = np.zeros(v, bool)
  train[[0, 33]] = True
  for c in (0, 1):
    pool = [i for i in np.flatnonzero(labels == c) if not train[i]]
    train[rng.choice(pool, labelled_per_class - 1, replace=False)] = True
  s, r = _both_directions(g)
  return {"nodes": np.eye(v, dtype=np.float32), "senders": s, "receivers": r, "labels": labels,
          "train": train, "test": ~train, "num_classes": 2}


def planted_partition(communities: int = 4, size: int = 25, p_in: float = 0.3,
                      p_out: float = 0.02, noise: float = 2.0, train_fraction: float = 0.2,
                      seed: int = 0) -> dict:
  """networkx's planted-partition graph; features `[V, 2·communities]`: the community's one-hot plus
  N(0, noise²) on every entry (half the dimensions carry no signal)."""
  g = nx.planted_partition_graph(communities, size, p_in, p_out, seed=seed)
  v = g.number_of_nodes()
  labels = np.repeat(np.arange(communities), size).astype(np.int32)
  rng = np.random.default_rng(seed)
  feats = np.zeros((v, 2 * communities), np.float32)
  feats[np.arange(v), labels] = 1.0
  feats += rng.normal(0, noise, feats.shape).astype(np.float32)
  train = np.zeros(v, bool)
  train[rng.choice(v, int(train_fraction * v), replace=False)] = True
  s, r = _both_directions(g)
  return {"nodes": feats, "senders": s, "receivers": r, "labels": labels, "train": train,
          "test": ~train, "num_classes": communities}


def dictionary_lookup_graph(k: int) -> tuple[np.ndarray, np.ndarray]:
  """The complete bipartite edges key j (node j) → query i (node k + i)."""
  s = np.repeat(np.arange(k), k).astype(np.int32)
  r = (k + np.tile(np.arange(k), k)).astype(np.int32)
  return s, r


def dictionary_lookup(rng: np.random.Generator, k: int, batch: int) -> dict:
  """A batch of DictionaryLookup instances on the graph of `dictionary_lookup_graph(k)`: "nodes"
  `[batch, 2k, 2k]` (keys: one-hot attribute ‖ one-hot value; queries: one-hot attribute ‖ 0),
  "labels" `[batch, k]` (the value each query must return). Attributes and values are random
  permutations per instance."""
  attrs = np.argsort(rng.random((batch, k)), axis=1)     # key j's attribute
  values = np.argsort(rng.random((batch, k)), axis=1)    # key j's value
  query_attrs = np.argsort(rng.random((batch, k)), axis=1)
  nodes = np.zeros((batch, 2 * k, 2 * k), np.float32)
  b = np.arange(batch)[:, None]
  j = np.arange(k)[None, :]
  nodes[b, j, attrs] = 1.0
  nodes[b, j, k + values] = 1.0
  nodes[b, k + j, query_attrs] = 1.0
  # The key holding attribute a: inverse permutation of attrs.
  key_of_attr = np.argsort(attrs, axis=1)
  labels = np.take_along_axis(values, np.take_along_axis(key_of_attr, query_attrs, axis=1), axis=1)
  return {"nodes": nodes, "labels": labels.astype(np.int32)}
