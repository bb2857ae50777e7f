"""SuperGAT: graph attention whose scores are also trained to predict the graph's edges.

Kim and Oh, "How to Find Your Friendly Neighborhood: Graph Attention Design with Self-Supervision",
arXiv:2204.04879 (ICLR 2021). With x'_n = x_n W (`lin` [F, H·C], no bias) viewed [H, C] per node,
two scores for an edge j → i, per head:

    SD (scaled dot product)   φ_ji = x'_iᵀ x'_j / sqrt(C)    e_ji = φ_ji
    MX (mixed)                φ_ji = x'_iᵀ x'_j              e_ji = (a_lᵀ x'_j + a_rᵀ x'_i) · σ(φ_ji)

then α_ji = softmax over i's incoming edges of LeakyReLU(e_ji) and out_i = Σ_j α_ji x'_j (heads
concatenated or averaged, + bias), self-loops added first. The self-supervised loss asks the logit φ
(averaged over heads) to tell the graph's edges (label 1, self-loops included, as PyTorch
Geometric's SuperGATConv uses its edge list after adding them) from sampled non-edges (label 0):

    L_E = BCE-with-logits(mean_h φ_e, y_e) over positive and negative edges

added to the task loss with a weight λ_E (the paper tunes it per dataset). The weights are named as
PyG's `SuperGATConv` (`lin`, `att_l`, `att_r`, `bias`; `gat.to_pyg` / `from_pyg` convert).

  supergat_layer(nodes, senders, receivers, *, lin, att_l, att_r, bias, attention_type, ...)
  supergat_attention_loss(nodes, senders, receivers, neg_senders, neg_receivers, *, lin, ...)
  negative_edges(rng, senders, receivers, num_nodes, num_samples)   sampled non-edges + their mask
  SuperGATConv                                                     the Linen layer
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from attnjax import catalog
from attnjax import modules
from attnjax.graph import segment
from attnjax.graph.gat import EdgeIds, HeadVector, Kernel, Nodes, graph_out_shape
from attnjax.typing import Array, Bool, Float

__all__ = ["ATTENTION_TYPES", "SuperGATConv", "negative_edges", "supergat_attention_loss",
           "supergat_layer"]

ATTENTION_TYPES = ("MX", "SD")
EdgeMask = Bool[Array, "M"]
Bias = Float[Array, "out"]


def _project(op: str, nodes: Nodes, lin: Kernel, heads: int) -> jax.Array:
  if jnp.ndim(nodes) != 2 or jnp.ndim(lin) != 2 or lin.shape[0] != nodes.shape[1]:
    raise ValueError(f"{op}: need `nodes` [V, F] and `lin` [F, H·C], got {jnp.shape(nodes)} and "
                     f"{jnp.shape(lin)}")
  if lin.shape[1] % heads:
    raise ValueError(f"{op}: `lin`'s width {lin.shape[1]} must be H·C with H = {heads}")
  return (nodes.astype(jnp.float32) @ lin.astype(jnp.float32)).reshape(
      nodes.shape[0], heads, lin.shape[1] // heads)


def _logits(x: jax.Array, s_ids: EdgeIds, r_ids: EdgeIds, attention_type: str) -> jax.Array:
  """φ [E, H]: x'_i · x'_j, divided by sqrt(C) for SD."""
  dot = jnp.sum(x[r_ids] * x[s_ids], axis=-1)
  return dot / jnp.sqrt(jnp.float32(x.shape[-1])) if attention_type == "SD" else dot


def _check_type(op: str, attention_type: str) -> None:
  if attention_type not in ATTENTION_TYPES:
    raise ValueError(f"{op}: `attention_type` must be one of {ATTENTION_TYPES}, got "
                     f"{attention_type!r}")


def supergat_layer(nodes: Nodes, senders: EdgeIds, receivers: EdgeIds, *, lin: Kernel,
                   att_l: Optional[HeadVector] = None, att_r: Optional[HeadVector] = None,
                   bias: Optional[Bias] = None, heads: int = 1, attention_type: str = "MX",
                   concat: bool = True, negative_slope: float = 0.2, add_self_loops: bool = True,
                   mask=None, return_attention: bool = False):
  """SuperGAT's message passing (module docstring): `[V, F] -> [V, H·C]` (concat) or `[V, C]`.
  MX needs `att_l`, `att_r` `[H, C]` (H read from them); SD takes none and H from `heads`.
  `return_attention` also returns `(senders, receivers, α [E', H])` over the edges used."""
  op = "supergat_layer"
  _check_type(op, attention_type)
  segment.check_graph(op, nodes, senders, receivers, None, mask)
  if attention_type == "MX":
    if att_l is None or jnp.ndim(att_l) != 2 or jnp.shape(att_l) != jnp.shape(att_r):
      raise ValueError(f"{op}: MX needs `att_l` and `att_r`, both [H, C], got "
                       f"{jnp.shape(att_l) if att_l is not None else None} and "
                       f"{jnp.shape(att_r) if att_r is not None else None}")
    heads = att_l.shape[0]
  x = _project(op, nodes, lin, heads)
  v = nodes.shape[0]
  if add_self_loops:
    senders, receivers, _, mask = segment.add_self_loops(senders, receivers, v, None, mask)
  phi = _logits(x, senders, receivers, attention_type)
  if attention_type == "MX":
    e = (jnp.sum(x[senders] * att_l.astype(jnp.float32), axis=-1)
         + jnp.sum(x[receivers] * att_r.astype(jnp.float32), axis=-1)) * jax.nn.sigmoid(phi)
  else:
    e = phi
  alpha = segment.segment_softmax(jax.nn.leaky_relu(e, negative_slope), receivers, v, mask)
  out = segment.aggregate(alpha[..., None] * x[senders], receivers, v)
  out = out.reshape(v, -1) if concat else out.mean(axis=1)
  if bias is not None:
    out = out + bias.astype(jnp.float32)
  out = out.astype(nodes.dtype)
  return (out, (senders, receivers, alpha)) if return_attention else out


def negative_edges(rng: jax.Array, senders: EdgeIds, receivers: EdgeIds, num_nodes: int,
                   num_samples: int, mask=None) -> tuple[jax.Array, jax.Array, EdgeMask]:
  """`num_samples` pairs (j, i) drawn uniformly with j != i, and a mask that is False where the
  pair is an edge of the graph in either direction (PyG samples negatives of the undirected graph),
  so the loss skips it; static shapes, so it runs under jit."""
  k1, k2 = jax.random.split(rng)
  s = jax.random.randint(k1, (num_samples,), 0, num_nodes, senders.dtype)
  # A uniform other node: offset by 1..V-1, never the node itself.
  r = (s + jax.random.randint(k2, (num_samples,), 1, max(num_nodes, 2), senders.dtype)) % num_nodes
  if senders.shape[0] == 0:   # no edges: every pair is a non-edge
    return s, r, jnp.full((num_samples,), num_nodes > 1)
  valid = jnp.ones_like(senders, bool) if mask is None else mask
  both = jnp.concatenate([jnp.where(valid, senders * num_nodes + receivers, -1),
                          jnp.where(valid, receivers * num_nodes + senders, -1)])
  keys = jnp.sort(both)
  pair = s * num_nodes + r
  pos = jnp.clip(jnp.searchsorted(keys, pair), 0, keys.shape[0] - 1)
  return s, r, (keys[pos] != pair) & (num_nodes > 1)


@catalog.serves(31, kind="loss", name="attnjax.graph.supergat.supergat_attention_loss")
def supergat_attention_loss(nodes: Nodes, senders: EdgeIds, receivers: EdgeIds,
                            neg_senders: EdgeIds, neg_receivers: EdgeIds, *, lin: Kernel,
                            heads: int, attention_type: str = "MX", add_self_loops: bool = True,
                            mask=None, neg_mask=None) -> jax.Array:
  """L_E (module docstring): binary cross-entropy of the head-averaged logits φ, 1 on the graph's
  edges (self-loops added when `add_self_loops`), 0 on the given non-edges; masked edges skipped."""
  op = "supergat_attention_loss"
  _check_type(op, attention_type)
  segment.check_graph(op, nodes, senders, receivers, None, mask)
  x = _project(op, nodes, lin, heads)
  if add_self_loops:
    senders, receivers, _, mask = segment.add_self_loops(senders, receivers, nodes.shape[0],
                                                         None, mask)
  pos = _logits(x, senders, receivers, attention_type).mean(axis=-1)
  neg = _logits(x, neg_senders, neg_receivers, attention_type).mean(axis=-1)
  logits = jnp.concatenate([pos, neg])
  labels = jnp.concatenate([jnp.ones_like(pos), jnp.zeros_like(neg)])
  w = jnp.concatenate([jnp.ones_like(pos) if mask is None else mask.astype(jnp.float32),
                       jnp.ones_like(neg) if neg_mask is None else neg_mask.astype(jnp.float32)])
  bce = optax.sigmoid_binary_cross_entropy(logits, labels)
  return jnp.sum(bce * w) / jnp.maximum(jnp.sum(w), 1.0)


class SuperGATConv(nn.Module):
  """PyG's `SuperGATConv(in, out_channels, heads, concat, negative_slope, add_self_loops, bias,
  attention_type, neg_sample_ratio)` over `supergat_layer`. `__call__(nodes, senders, receivers, *,
  mask=None, train=False)` returns the node outputs; with `train`, it also sows the edge loss
  L_E as ("intermediates", "attention_loss") on negatives sampled from the "negatives" rng stream
  (`neg_sample_ratio` × the edge count, PyG's default 0.5), for the caller to add with its λ_E."""
  out_channels: int = 8
  heads: int = 1
  concat: bool = True
  negative_slope: float = 0.2
  add_self_loops: bool = True
  bias: bool = True
  attention_type: str = "MX"
  neg_sample_ratio: float = 0.5
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, nodes, senders, receivers, *, mask=None, train=False):
    width = self.heads * self.out_channels
    glorot = nn.initializers.glorot_uniform()
    lin = self.param("lin", glorot, (nodes.shape[-1], width), self.param_dtype)
    att_l = att_r = None
    if self.attention_type == "MX":  # SD has no attention vectors (nor has PyG's state dict)
      att_l = self.param("att_l", glorot, (self.heads, self.out_channels), self.param_dtype)
      att_r = self.param("att_r", glorot, (self.heads, self.out_channels), self.param_dtype)
    out = self.out_channels * (self.heads if self.concat else 1)
    bias = self.param("bias", nn.initializers.zeros, (out,), self.param_dtype) if self.bias else None
    y = supergat_layer(nodes, senders, receivers, lin=lin, att_l=att_l, att_r=att_r, bias=bias,
                       heads=self.heads, attention_type=self.attention_type, concat=self.concat,
                       negative_slope=self.negative_slope, add_self_loops=self.add_self_loops,
                       mask=mask)
    if train:
      e = senders.shape[0] + (nodes.shape[0] if self.add_self_loops else 0)
      n_neg = max(int(self.neg_sample_ratio * e), 1)
      ns, nr, nm = negative_edges(self.make_rng("negatives"), senders, receivers, nodes.shape[0],
                                  n_neg, mask)
      self.sow("intermediates", "attention_loss", supergat_attention_loss(
          nodes, senders, receivers, ns, nr, lin=lin, heads=self.heads,
          attention_type=self.attention_type, add_self_loops=self.add_self_loops, mask=mask,
          neg_mask=nm))
    return y


modules.register_module(modules.Module(
    name="supergat_layer", fn=supergat_layer, linen=SuperGATConv, kind="graph", family="graph",
    seeds=(31,), paper="How to Find Your Friendly Neighborhood: Graph Attention Design with "
    "Self-Supervision", arxiv="2204.04879", extra_inputs=modules.graph_inputs(),
    keeps_shape=False, out_shape=graph_out_shape, example={"out_channels": 4, "heads": 2}))
