"""Projecting hidden vectors to the vocabulary, and the attention flow graph.

Katz & Belinkov, "Interpreting Transformer's Attention Dynamic Memory and Visualizing the Semantic
Information Flow of GPT",
arXiv:2305.13417. Any d-dimensional vector of the model (a value vector, a head's output, the
residual stream) is read in vocabulary space through the unembedding `U: [V, d]` (for a tied LM,
the token embedding):  logits = x Uᵀ,  tokens = top-k(logits). The flow graph has one node per
(layer, position) and, for each layer l, an edge (l, s) -> (l+1, t) weighted by the head-averaged
attention w_l[t, s] (or per head), the paths along which information moves.

  project(x, unembedding, k)       [..., d] -> (top-k token ids [..., k], their logits [..., k])
  flow_graph(weights, threshold=)  [L, N, T, S] one example's maps -> {"nodes", "edges"}
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from attnjax import catalog

__all__ = ["flow_graph", "project"]


@catalog.serves(198, kind="analysis", name="attnjax.analysis.logit_lens.project")
def project(x: np.ndarray, unembedding: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
  """Top-k vocabulary tokens of vectors `x: [..., d]` under `unembedding: [V, d]` (logits x Uᵀ),
  best first (arXiv:2305.13417). Returns (ids int64 `[..., k]`, logits float64 `[..., k]`)."""
  x = np.asarray(x, np.float64)
  u = np.asarray(unembedding, np.float64)
  if u.ndim != 2 or x.shape[-1] != u.shape[1]:
    raise ValueError(f"logit_lens.project: unembedding must be [V, d] with d = x.shape[-1] = "
                     f"{x.shape[-1]}, got {u.shape}")
  if not 1 <= k <= u.shape[0]:
    raise ValueError(f"logit_lens.project: k must be in [1, V={u.shape[0]}], got {k}")
  logits = x @ u.T
  ids = np.argsort(-logits, axis=-1, kind="stable")[..., :k]
  return ids, np.take_along_axis(logits, ids, axis=-1)


@catalog.serves(198, kind="analysis", name="attnjax.analysis.logit_lens.flow_graph")
def flow_graph(weights: np.ndarray, threshold: float = 0.0, head: Optional[int] = None) -> dict:
  """The attention flow graph of one example (arXiv:2305.13417).

  Args:
    weights: `[L, N, T, S]` attention maps of one example (self-attention: S = T).
    threshold: edges with weight <= threshold are dropped.
    head: one head's edges, or None for the mean over heads.

  Returns:
    `{"nodes": [(layer, pos) for layer in 0..L, pos in 0..T-1], "edges": [((l, s), (l+1, t), w)]}`:
    node (l, p) is position p's residual stream entering layer l; (L, p) is the output.
  """
  w = np.asarray(weights, np.float64)
  if w.ndim != 4:
    raise ValueError(f"logit_lens.flow_graph: weights must be [L, N, T, S], got shape {w.shape}")
  w = w.mean(axis=1) if head is None else w[:, head]
  n_layers, t, s = w.shape
  nodes = [(l, p) for l in range(n_layers + 1) for p in range(max(t, s))]
  edges = [((l, j), (l + 1, i), float(w[l, i, j]))
           for l in range(n_layers) for i in range(t) for j in range(s) if w[l, i, j] > threshold]
  return {"nodes": nodes, "edges": edges}
