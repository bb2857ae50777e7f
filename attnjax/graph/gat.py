"""GAT and GATv2: multi-head attention over each node's incoming edges, with the weights named and
laid out as PyTorch Geometric's `GATConv` / `GATv2Conv` (jax kernels are `[in, out]`, the transpose
of torch's `Linear.weight`; `to_pyg` / `from_pyg` convert a state dict either way).

GAT (Veličković et al., "Graph Attention Networks", arXiv:1710.10903), per head h, for an edge
j → i with features e_ji:

    x'_n = x_n W                                        W = lin [F, H·C], viewed [H, C] per node
    s_ji = LeakyReLU(a_srcᵀ x'_j + a_dstᵀ x'_i + a_edgeᵀ (e_ji W_e))
    α_ji = softmax over the edges arriving at i of s_ji
    out_i = Σ_j α_ji x'_j ;  heads concatenated [H·C] or averaged [C] ; + x_i W_res ; + bias

GATv2 (Brody, Alon, Yahav, "How Attentive are Graph Attention Networks?", arXiv:2105.14491) moves the
attention vector outside the nonlinearity, so the ranking of neighbours can depend on the query:

    s_ji = aᵀ LeakyReLU(x_j W_l + b_l + x_i W_r + b_r + e_ji W_e),   out_i = Σ_j α_ji (x_j W_l + b_l)

In GAT, s_ji is monotone in a_srcᵀ x'_j for every i (LeakyReLU is monotone and a_dstᵀ x'_i is the
same for all of i's edges): every node ranks the keys the same way ("static attention", the GATv2
paper's Theorem 1); GATv2's is not.

Both add self-loops by default (existing ones removed first, the new ones' edge features the mean
of the node's incoming ones, PyG's `fill_value="mean"`), use LeakyReLU slope 0.2 and dropout on α
when given a PRNG key. Shapes: `nodes [V, F]`, `senders`/`receivers [E]` (edge e: senders[e] →
receivers[e], PyG's `edge_index`), `edges [E, D]` → `[V, H·C]` (concat) or `[V, C]`.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from attnjax import modules
from attnjax.graph import segment
from attnjax.typing import Array, Float, Int

__all__ = ["GATConv", "GATv2Conv", "from_pyg", "gat_layer", "gatv2_layer", "graph_out_shape",
           "to_pyg"]

Nodes = Float[Array, "V F"]
NodeOut = Float[Array, "V out"]
EdgeIds = Int[Array, "E"]
EdgeFeatures = Float[Array, "E D"]
Kernel = Float[Array, "fan_in fan_out"]
HeadVector = Float[Array, "H C"]
Bias = Float[Array, "out"]


def _edges_and_loops(op, nodes, senders, receivers, edges, mask, add_self_loops, fill_value):
  segment.check_graph(op, nodes, senders, receivers, edges, mask)
  if add_self_loops:
    return segment.add_self_loops(senders, receivers, nodes.shape[0], edges, mask, fill_value)
  return senders, receivers, edges, mask


def _finish(op, alpha, messages, receivers, num_nodes, concat, nodes, res, bias, dtype, *,
            dropout, rng, return_attention, senders):
  """Σ_j α x'_j per node and head, then concat / mean, residual and bias; α [E, H]."""
  if dropout > 0.0 and rng is not None:
    keep = jax.random.bernoulli(rng, 1.0 - dropout, alpha.shape)
    alpha_used = jnp.where(keep, alpha / (1.0 - dropout), 0.0)
  else:
    alpha_used = alpha
  out = segment.aggregate(alpha_used[..., None] * messages, receivers, num_nodes)   # [V, H, C]
  out = out.reshape(num_nodes, -1) if concat else out.mean(axis=1)
  if res is not None:
    out = out + nodes.astype(jnp.float32) @ res.astype(jnp.float32)
  if bias is not None:
    if bias.shape != (out.shape[-1],):
      raise ValueError(f"{op}: `bias` must be [{out.shape[-1]}], got shape {bias.shape}")
    out = out + bias.astype(jnp.float32)
  out = out.astype(dtype)
  return (out, (senders, receivers, alpha)) if return_attention else out


def _heads(op: str, vector: jax.Array, name: str, width: int) -> tuple[int, int]:
  if jnp.ndim(vector) != 2 or vector.shape[0] * vector.shape[1] != width:
    raise ValueError(f"{op}: `{name}` must be [H, C] with H·C = {width} (the projection's width), "
                     f"got shape {jnp.shape(vector)}")
  return vector.shape


def gat_layer(nodes: Nodes, senders: EdgeIds, receivers: EdgeIds, edges: Optional[EdgeFeatures] = None,
              *, lin: Kernel, att_src: HeadVector, att_dst: HeadVector, bias: Optional[Bias] = None,
              lin_edge: Optional[Kernel] = None, att_edge: Optional[HeadVector] = None,
              res: Optional[Kernel] = None, concat: bool = True, negative_slope: float = 0.2,
              add_self_loops: bool = True, fill_value: str = "mean", mask=None,
              dropout: float = 0.0, rng: Optional[jax.Array] = None,
              return_attention: bool = False):
  """GAT (module docstring): `[V, F] -> [V, H·C]` (concat) or `[V, C]`.

  `mask [E]` drops edges (a padded batch's); `return_attention` also returns `(senders,
  receivers, α [E', H])` over the edges used (self-loops appended). Dropout on α needs `rng`.
  """
  op = "gat_layer"
  if jnp.ndim(lin) != 2 or lin.shape[0] != jnp.shape(nodes)[-1]:
    raise ValueError(f"{op}: `lin` must be [F, H·C] with F = {jnp.shape(nodes)[-1]}, got shape "
                     f"{jnp.shape(lin)}")
  h, c = _heads(op, att_src, "att_src", lin.shape[1])
  _heads(op, att_dst, "att_dst", lin.shape[1])
  s_ids, r_ids, edges, mask = _edges_and_loops(op, nodes, senders, receivers, edges, mask,
                                               add_self_loops, fill_value)
  v = nodes.shape[0]
  x = (nodes.astype(jnp.float32) @ lin.astype(jnp.float32)).reshape(v, h, c)
  a_src = jnp.sum(x * att_src.astype(jnp.float32), axis=-1)   # [V, H]
  a_dst = jnp.sum(x * att_dst.astype(jnp.float32), axis=-1)
  score = a_src[s_ids] + a_dst[r_ids]
  if edges is not None:
    if lin_edge is None or att_edge is None:
      raise ValueError(f"{op}: `edges` were given but not `lin_edge` [D, H·C] and `att_edge` [H, C]")
    e = (edges.astype(jnp.float32) @ lin_edge.astype(jnp.float32)).reshape(-1, h, c)
    score = score + jnp.sum(e * att_edge.astype(jnp.float32), axis=-1)
  score = jax.nn.leaky_relu(score, negative_slope)
  alpha = segment.segment_softmax(score, r_ids, v, mask)
  return _finish(op, alpha, x[s_ids], r_ids, v, concat, nodes, res, bias, nodes.dtype,
                 dropout=dropout, rng=rng, return_attention=return_attention, senders=s_ids)


def gatv2_layer(nodes: Nodes, senders: EdgeIds, receivers: EdgeIds,
                edges: Optional[EdgeFeatures] = None, *, lin_l: Kernel, att: HeadVector,
                lin_r: Optional[Kernel] = None, lin_l_bias: Optional[Bias] = None,
                lin_r_bias: Optional[Bias] = None, bias: Optional[Bias] = None,
                lin_edge: Optional[Kernel] = None, res: Optional[Kernel] = None,
                concat: bool = True, negative_slope: float = 0.2, add_self_loops: bool = True,
                fill_value: str = "mean", mask=None, dropout: float = 0.0,
                rng: Optional[jax.Array] = None, return_attention: bool = False):
  """GATv2 (module docstring): `[V, F] -> [V, H·C]` (concat) or `[V, C]`. Without `lin_r` the
  target side uses `lin_l` (PyG's `share_weights=True`). Other arguments as `gat_layer`."""
  op = "gatv2_layer"
  if jnp.ndim(lin_l) != 2 or lin_l.shape[0] != jnp.shape(nodes)[-1]:
    raise ValueError(f"{op}: `lin_l` must be [F, H·C] with F = {jnp.shape(nodes)[-1]}, got shape "
                     f"{jnp.shape(lin_l)}")
  h, c = _heads(op, att, "att", lin_l.shape[1])
  s_ids, r_ids, edges, mask = _edges_and_loops(op, nodes, senders, receivers, edges, mask,
                                               add_self_loops, fill_value)
  v = nodes.shape[0]
  f32 = nodes.astype(jnp.float32)

  def project(kernel, b):
    y = f32 @ kernel.astype(jnp.float32)
    return (y if b is None else y + b.astype(jnp.float32)).reshape(v, h, c)

  x_l = project(lin_l, lin_l_bias)
  x_r = x_l if lin_r is None else project(lin_r, lin_r_bias)
  z = x_l[s_ids] + x_r[r_ids]
  if edges is not None:
    if lin_edge is None:
      raise ValueError(f"{op}: `edges` were given but not `lin_edge` [D, H·C]")
    z = z + (edges.astype(jnp.float32) @ lin_edge.astype(jnp.float32)).reshape(-1, h, c)
  score = jnp.sum(jax.nn.leaky_relu(z, negative_slope) * att.astype(jnp.float32), axis=-1)
  alpha = segment.segment_softmax(score, r_ids, v, mask)
  return _finish(op, alpha, x_l[s_ids], r_ids, v, concat, nodes, res, bias, nodes.dtype,
                 dropout=dropout, rng=rng, return_attention=return_attention, senders=s_ids)


def _glorot(name_module: nn.Module, name: str, shape, dtype):
  return name_module.param(name, nn.initializers.glorot_uniform(), shape, dtype)


class _GraphConv(nn.Module):
  """Fields shared by the two layers (PyG's constructor arguments and defaults)."""
  out_channels: int = 8
  heads: int = 1
  concat: bool = True
  negative_slope: float = 0.2
  dropout: float = 0.0
  add_self_loops: bool = True
  edge_dim: Optional[int] = None
  fill_value: str = "mean"
  bias: bool = True
  residual: bool = False
  param_dtype: jnp.dtype = jnp.float32

  def _common(self, nodes):
    width = self.heads * self.out_channels
    out = width if self.concat else self.out_channels
    extra = {}
    if self.edge_dim is not None:
      extra["lin_edge"] = _glorot(self, "lin_edge", (self.edge_dim, width), self.param_dtype)
    if self.residual:
      extra["res"] = _glorot(self, "res", (nodes.shape[-1], out), self.param_dtype)
    if self.bias:
      extra["bias"] = self.param("bias", nn.initializers.zeros, (out,), self.param_dtype)
    return width, extra

  def _dropout(self, train):
    return (self.dropout, self.make_rng("dropout")) if train and self.dropout > 0 else (0.0, None)


class GATConv(_GraphConv):
  """PyG's `GATConv(in, out_channels, heads, concat, negative_slope, dropout, add_self_loops,
  edge_dim, fill_value, bias, residual)` as a Linen module over `gat_layer` (glorot weights, zero
  bias as PyG). `__call__(nodes, senders, receivers, edges=None, *, mask=None, train=False)`."""

  @nn.compact
  def __call__(self, nodes, senders, receivers, edges=None, *, mask=None, train=False):
    width, extra = self._common(nodes)
    lin = _glorot(self, "lin", (nodes.shape[-1], width), self.param_dtype)
    att_src = _glorot(self, "att_src", (self.heads, self.out_channels), self.param_dtype)
    att_dst = _glorot(self, "att_dst", (self.heads, self.out_channels), self.param_dtype)
    if self.edge_dim is not None:
      extra["att_edge"] = _glorot(self, "att_edge", (self.heads, self.out_channels),
                                  self.param_dtype)
    dropout, rng = self._dropout(train)
    return gat_layer(nodes, senders, receivers, edges, lin=lin, att_src=att_src, att_dst=att_dst,
                     concat=self.concat, negative_slope=self.negative_slope,
                     add_self_loops=self.add_self_loops, fill_value=self.fill_value, mask=mask,
                     dropout=dropout, rng=rng, **extra)


class GATv2Conv(_GraphConv):
  """PyG's `GATv2Conv(..., share_weights)` as a Linen module over `gatv2_layer` (`lin_l`,
  `lin_r` with biases when `bias`, as PyG). `__call__` as `GATConv`."""
  share_weights: bool = False

  @nn.compact
  def __call__(self, nodes, senders, receivers, edges=None, *, mask=None, train=False):
    width, extra = self._common(nodes)
    f = nodes.shape[-1]
    weights = {"lin_l": _glorot(self, "lin_l", (f, width), self.param_dtype)}
    if self.bias:
      weights["lin_l_bias"] = self.param("lin_l_bias", nn.initializers.zeros, (width,),
                                         self.param_dtype)
    if not self.share_weights:
      weights["lin_r"] = _glorot(self, "lin_r", (f, width), self.param_dtype)
      if self.bias:
        weights["lin_r_bias"] = self.param("lin_r_bias", nn.initializers.zeros, (width,),
                                           self.param_dtype)
    att = _glorot(self, "att", (self.heads, self.out_channels), self.param_dtype)
    dropout, rng = self._dropout(train)
    return gatv2_layer(nodes, senders, receivers, edges, att=att, concat=self.concat,
                       negative_slope=self.negative_slope, add_self_loops=self.add_self_loops,
                       fill_value=self.fill_value, mask=mask, dropout=dropout, rng=rng,
                       **weights, **extra)


def to_pyg(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our params (`GATConv`, `GATv2Conv`, `SuperGATConv`) → a PyG state dict of numpy arrays (wrap
  each in `torch.from_numpy`): kernels `x` → `x.weight` transposed, `x_bias` → `x.bias`, attention
  vectors [H, C] → [1, H, C], `bias` as is."""
  out = {}
  for name, value in params.items():
    value = np.asarray(value)
    if name == "bias":
      out["bias"] = value
    elif name.startswith("att"):
      out[name] = value[None]
    elif name.endswith("_bias"):
      out[name[:-len("_bias")] + ".bias"] = value
    else:
      out[name + ".weight"] = value.T
  return out


def from_pyg(state_dict: Mapping[str, Any]) -> dict[str, jax.Array]:
  """A PyG `GATConv` / `GATv2Conv` / `SuperGATConv` state dict (torch tensors or arrays) → our
  params (the inverse of `to_pyg`); `lin_r` is absent for `share_weights=True`."""
  out = {}
  for key, value in state_dict.items():
    value = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value)
    if key == "bias":
      out["bias"] = value
    elif key.startswith("att"):
      out[key] = value[0]
    elif key.endswith(".bias"):
      out[key[:-len(".bias")] + "_bias"] = value
    elif key.endswith(".weight"):
      out[key[:-len(".weight")]] = value.T
    else:
      raise ValueError(f"from_pyg: unexpected state-dict entry {key!r}")
  return {k: jnp.asarray(v) for k, v in out.items()}


def graph_out_shape(x_shape, settings):
  """`[V, H·C]` (concat) or `[V, C]` for a graph layer's `out_channels`, `heads`, `concat`."""
  c, h = settings.get("out_channels", 8), settings.get("heads", 1)
  return (x_shape[0], c * h if settings.get("concat", True) else c)


_GRAPH_INPUTS = modules.graph_inputs()
modules.register_module(modules.Module(
    name="gat_layer", fn=gat_layer, linen=GATConv, kind="graph", family="graph", seeds=(),
    baseline=True, paper="Graph Attention Networks", arxiv="1710.10903", extra_inputs=_GRAPH_INPUTS,
    keeps_shape=False, out_shape=graph_out_shape, example={"out_channels": 4, "heads": 2}))
modules.register_module(modules.Module(
    name="gatv2_layer", fn=gatv2_layer, linen=GATv2Conv, kind="graph", family="graph",
    seeds=(144,), paper="How Attentive are Graph Attention Networks?", arxiv="2105.14491",
    extra_inputs=_GRAPH_INPUTS, keeps_shape=False, out_shape=graph_out_shape,
    example={"out_channels": 4, "heads": 2}))
