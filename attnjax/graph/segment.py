"""Attention over a graph's edge list: a softmax over each node's incoming edges, and the pieces every
graph attention layer shares (aggregation, self-loops, padded batches of graphs).

A graph is node features `nodes [V, F]` and directed edges `senders [E]` → `receivers [E]` (int32;
edge e carries a message from node senders[e] to node receivers[e], PyTorch Geometric's
`edge_index = [senders; receivers]`). Attention at node i normalizes the scores of the edges that
arrive at i:

    α_e = exp(s_e - m_i) / Σ_{e': receivers[e'] = i} exp(s_e' - m_i),   m_i = max of those s_e'
    out_i = Σ_{e: receivers[e] = i} α_e · message_e

with `jax.ops.segment_max / segment_sum` (the max is for stability and carries no gradient, as
softmax's shift does not change it). A node no edge arrives at gets no weights and a zero output;
masked edges (`mask[e] = False`, e.g. a padded batch's) get weight 0 and never produce NaN.

  segment_softmax(scores, segment_ids, num_segments, mask=None)   α, `[E, ...]`, float32
  aggregate(messages, receivers, num_nodes)                        Σ per receiving node
  add_self_loops(senders, receivers, num_nodes, edges=None, mask=None, fill="mean")
                                       every existing self-loop masked out and one loop per node
                                       appended (PyG's remove_self_loops + add_self_loops with static
                                       shapes, so jit compiles once); edge features of the new loops
                                       are the mean of the node's incoming ones (PyG's fill 'mean')
  GraphBatch, pad_graphs(graphs, num_nodes, num_edges)
                                       jraph-style batching of many small graphs into one padded
                                       graph of fixed size: padding edges point at a padding node and
                                       are masked, so one compiled program serves every batch
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.typing import Array, Bool, Float, Int

__all__ = ["FILLS", "GraphBatch", "add_self_loops", "aggregate", "check_graph", "pad_graphs",
           "segment_softmax"]

Scores = Float[Array, "E *rest"]
PerNode = Float[Array, "V *rest"]
EdgeIds = Int[Array, "E"]
EdgeMask = Bool[Array, "E"]
Nodes = Float[Array, "V F"]
EdgeFeatures = Float[Array, "E D"]
FILLS = ("mean", "zeros")


def check_graph(op: str, nodes: jax.Array, senders: jax.Array, receivers: jax.Array,
                edges: Optional[jax.Array] = None, mask: Optional[jax.Array] = None) -> None:
  """Raises ValueError naming the argument when the graph's arrays do not fit together."""
  if jnp.ndim(nodes) != 2:
    raise ValueError(f"{op}: `nodes` must be [V, F], got shape {jnp.shape(nodes)}")
  for name, ids in (("senders", senders), ("receivers", receivers)):
    if jnp.ndim(ids) != 1 or not jnp.issubdtype(jnp.asarray(ids).dtype, jnp.integer):
      raise ValueError(f"{op}: `{name}` must be integer node ids [E], got shape {jnp.shape(ids)} "
                       f"dtype {jnp.asarray(ids).dtype}")
  if jnp.shape(senders) != jnp.shape(receivers):
    raise ValueError(f"{op}: `senders` and `receivers` must both be [E], got {jnp.shape(senders)} "
                     f"and {jnp.shape(receivers)}")
  e = jnp.shape(senders)[0]
  if edges is not None and (jnp.ndim(edges) != 2 or jnp.shape(edges)[0] != e):
    raise ValueError(f"{op}: `edges` must be [E, D] with E = {e}, got shape {jnp.shape(edges)}")
  if mask is not None and jnp.shape(mask) != (e,):
    raise ValueError(f"{op}: `mask` must be [E] = [{e}], got shape {jnp.shape(mask)}")


def segment_softmax(scores: Scores, segment_ids: EdgeIds, num_segments: int,
                    mask: Optional[EdgeMask] = None) -> Scores:
  """Softmax of `scores [E, ...]` over the entries that share a segment id (a node's incoming
  edges), in float32; entries with `mask` False get 0 and do not count. Sums to 1 over each
  non-empty segment; an empty segment has no entries."""
  if jnp.ndim(segment_ids) != 1 or jnp.shape(segment_ids)[0] != jnp.shape(scores)[0]:
    raise ValueError(f"segment_softmax: `segment_ids` must be [E] with E = {jnp.shape(scores)[0]} "
                     f"(the scores' first axis), got shape {jnp.shape(segment_ids)}")
  s = scores.astype(jnp.float32)
  keep = None
  if mask is not None:
    keep = jnp.reshape(mask, (-1,) + (1,) * (s.ndim - 1))
    s = jnp.where(keep, s, -jnp.inf)
  peak = jax.ops.segment_max(s, segment_ids, num_segments)
  # A segment with only masked entries has max -inf: shift by 0 there, so no inf - inf.
  peak = jax.lax.stop_gradient(jnp.where(jnp.isfinite(peak), peak, 0.0))
  e = jnp.exp(s - peak[segment_ids])
  if keep is not None:
    e = jnp.where(keep, e, 0.0)
  total = jax.ops.segment_sum(e, segment_ids, num_segments)[segment_ids]
  return e / jnp.where(total > 0, total, 1.0)


def aggregate(messages: Scores, receivers: EdgeIds, num_nodes: int) -> PerNode:
  """`out_i = Σ_{e: receivers[e] = i} messages_e`: `[E, ...] -> [V, ...]`."""
  return jax.ops.segment_sum(messages, receivers, num_nodes)


def add_self_loops(senders: EdgeIds, receivers: EdgeIds, num_nodes: int,
                   edges: Optional[EdgeFeatures] = None, mask: Optional[EdgeMask] = None,
                   fill: str = "mean") -> tuple[jax.Array, jax.Array, Optional[jax.Array], jax.Array]:
  """`(senders, receivers, edges, mask)` with every existing self-loop masked out and the loops
  i → i of the `num_nodes` nodes appended (E + V edges). New loops' edge features: the mean of the
  node's unmasked incoming edges' features ("mean", zeros for a node with none) or "zeros"."""
  if fill not in FILLS:
    raise ValueError(f"add_self_loops: `fill` must be one of {FILLS}, got {fill!r}")
  keep = (senders != receivers) if mask is None else (mask & (senders != receivers))
  loops = jnp.arange(num_nodes, dtype=senders.dtype)
  if edges is not None:
    if fill == "mean":
      w = keep.astype(jnp.float32)[:, None]
      total = jax.ops.segment_sum(edges.astype(jnp.float32) * w, receivers, num_nodes)
      count = jax.ops.segment_sum(w, receivers, num_nodes)
      loop_edges = (total / jnp.maximum(count, 1.0)).astype(edges.dtype)
    else:
      loop_edges = jnp.zeros((num_nodes, edges.shape[1]), edges.dtype)
    edges = jnp.concatenate([edges, loop_edges])
  return (jnp.concatenate([senders, loops]), jnp.concatenate([receivers, loops]), edges,
          jnp.concatenate([keep, jnp.ones((num_nodes,), bool)]))


@dataclasses.dataclass(frozen=True)
class GraphBatch:
  """Many graphs as one padded graph: `nodes [V, F]`, `senders`/`receivers`/`edge_mask [E]`,
  `edges [E, D]` or None, `node_mask [V]` (False on padding), `graph_ids [V]` (the graph of each
  node; padding nodes get `num_graphs`), `num_graphs`."""
  nodes: np.ndarray
  senders: np.ndarray
  receivers: np.ndarray
  edges: Optional[np.ndarray]
  node_mask: np.ndarray
  edge_mask: np.ndarray
  graph_ids: np.ndarray
  num_graphs: int


def pad_graphs(graphs: Sequence[dict], num_nodes: int, num_edges: int) -> GraphBatch:
  """Concatenates `graphs` (dicts with "nodes" [V_g, F], "senders", "receivers" [E_g], optional
  "edges" [E_g, D]) with node ids offset, and pads to `num_nodes` nodes (at least one padding node)
  and `num_edges` edges: padding edges run from the last node (padding) to itself, masked."""
  if not graphs:
    raise ValueError("pad_graphs: `graphs` must hold at least one graph")
  v_total = sum(len(g["nodes"]) for g in graphs)
  e_total = sum(len(g["senders"]) for g in graphs)
  if num_nodes < v_total + 1 or num_edges < e_total:
    raise ValueError(f"pad_graphs: need num_nodes >= {v_total + 1} (the graphs' nodes + 1 padding "
                     f"node) and num_edges >= {e_total}; got {num_nodes} and {num_edges}")
  with_edges = "edges" in graphs[0] and graphs[0]["edges"] is not None
  f = np.asarray(graphs[0]["nodes"]).shape[1]
  nodes = np.zeros((num_nodes, f), np.asarray(graphs[0]["nodes"]).dtype)
  senders = np.full((num_edges,), num_nodes - 1, np.int32)
  receivers = np.full((num_edges,), num_nodes - 1, np.int32)
  edges = None
  if with_edges:
    e0 = np.asarray(graphs[0]["edges"])
    edges = np.zeros((num_edges, e0.shape[1]), e0.dtype)
  graph_ids = np.full((num_nodes,), len(graphs), np.int32)
  v = e = 0
  for g_id, g in enumerate(graphs):
    n, m = len(g["nodes"]), len(g["senders"])
    nodes[v:v + n] = g["nodes"]
    senders[e:e + m] = np.asarray(g["senders"]) + v
    receivers[e:e + m] = np.asarray(g["receivers"]) + v
    if with_edges:
      edges[e:e + m] = g["edges"]
    graph_ids[v:v + n] = g_id
    v, e = v + n, e + m
  return GraphBatch(nodes=nodes, senders=senders, receivers=receivers, edges=edges,
                    node_mask=np.arange(num_nodes) < v, edge_mask=np.arange(num_edges) < e,
                    graph_ids=graph_ids, num_graphs=len(graphs))
