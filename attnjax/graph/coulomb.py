"""CoulGAT: graph attention on a weighted adjacency (e.g. a Coulomb matrix) whose learned parameters
are per node and per node pair, so they can be read as interactions.

Gokden, "CoulGAT: An Experiment on Interpretability of Graph Attention Networks", arXiv:1912.08409.
Following the author's code (`single_attn_mod`, `single_hidden_out` of the TensorFlow `GattModel`),
for a graph of N nodes (fixed N: the parameters are per node) with features h_j [F] and a
non-negative weighted adjacency A [N, N] (the paper uses the Coulomb matrix, screened below), per
head:

    g_j   = W h_j + b                               [F']
    Ã     = softmax_row(A ∘^ P)                     P [N, N] a learned power per node pair: the
                                                    screening of the Coulomb-like interaction
    c_j   = Σ_k Ã_jk g_k                            the adjacency-smoothed features of node j
    e_ij  = LeakyReLU(a_i · c_j),  α_i = softmax_j(e_ij)      a [N, F'] a learned vector per node
    out_i = Σ_j α_ij g_j

Heads are concatenated (or averaged, the code's classification layer). The layer's activation
(ReLU in the code's hidden layers) is the caller's. `power=None` uses A as is (the code's option
without the power matrix).

Shapes: `x [B, N, F]`, `adjacency [B, N, N]` (≥ 0; with `power`, > 0 where A^P must be finite) →
`[B, N, K·F']` (concat) or `[B, N, F']`.
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.typing import Array, Float

__all__ = ["CoulombGraphAttention", "coulomb_graph_attention"]

Nodes = Float[Array, "B N F"]
Adjacency = Float[Array, "B N N"]
_SLOPE = 0.2   # tf.nn.leaky_relu's default, as the code calls it


def coulomb_graph_attention(x: Nodes, adjacency: Adjacency, *, kernel, bias, attention,
                            power=None, concat: bool = True):
  """CoulGAT attention (module docstring). `kernel [F, K, F']`, `bias [K, F']`, `attention
  [K, N, F']`, `power [K, N, N]` or None."""
  op = "coulomb_graph_attention"
  if jnp.ndim(x) != 3:
    raise ValueError(f"{op}: `x` must be [B, N, F], got shape {jnp.shape(x)}")
  b, n, f = x.shape
  if jnp.shape(adjacency) != (b, n, n):
    raise ValueError(f"{op}: `adjacency` must be [B, N, N] = [{b}, {n}, {n}], got shape "
                     f"{jnp.shape(adjacency)}")
  if jnp.ndim(kernel) != 3 or kernel.shape[0] != f:
    raise ValueError(f"{op}: `kernel` must be [F, K, F'] with F = {f}, got {jnp.shape(kernel)}")
  _, k, fo = kernel.shape
  if jnp.shape(attention) != (k, n, fo):
    raise ValueError(f"{op}: `attention` must be [K, N, F'] = [{k}, {n}, {fo}] (one vector per "
                     f"node: the graphs have N nodes), got shape {jnp.shape(attention)}")
  if power is not None and jnp.shape(power) != (k, n, n):
    raise ValueError(f"{op}: `power` must be [K, N, N] = [{k}, {n}, {n}], got {jnp.shape(power)}")
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  g = jnp.einsum("bnf,fkd->bknd", x.astype(jnp.float32), f32(kernel)) + f32(bias)[None, :, None]
  adj = adjacency.astype(jnp.float32)[:, None]                                # [B, 1, N, N]
  if power is not None:
    adj = adj ** f32(power)[None]
  adj = jax.nn.softmax(adj, axis=-1)
  c = jnp.einsum("bkjm,bkmd->bkjd", adj, g)                                    # [B, K, N, F']
  e = jax.nn.leaky_relu(jnp.einsum("kid,bkjd->bkij", f32(attention), c), _SLOPE)
  out = jnp.einsum("bkij,bkjd->bkid", jax.nn.softmax(e, axis=-1), g)           # [B, K, N, F']
  out = jnp.moveaxis(out, 1, 2)
  out = out.reshape(b, n, k * fo) if concat else out.mean(axis=2)
  return out.astype(x.dtype)


class CoulombGraphAttention(nn.Module):
  """Creates CoulGAT's weights for graphs of the input's N nodes (`heads` x `features`, None: F;
  the power matrix starting at 1, i.e. the plain adjacency) and calls `coulomb_graph_attention`."""
  features: Optional[int] = None
  heads: int = 1
  concat: bool = True
  use_power: bool = True

  @nn.compact
  def __call__(self, x: Nodes, adjacency: Adjacency):
    n, f = x.shape[1], x.shape[2]
    fo = self.features or f
    glorot = nn.initializers.glorot_uniform()
    weights = {"kernel": self.param("kernel", glorot, (f, self.heads, fo)),
               "bias": self.param("bias", nn.initializers.zeros, (self.heads, fo)),
               "attention": self.param("attention", glorot, (self.heads, n, fo))}
    if self.use_power:
      weights["power"] = self.param("power", nn.initializers.ones, (self.heads, n, n))
    return coulomb_graph_attention(x, adjacency, **weights, concat=self.concat)


def _out_shape(x_shape, settings):
  fo = settings.get("features") or x_shape[-1]
  return (x_shape[0], x_shape[1], fo * (settings.get("heads", 1) if settings.get("concat", True)
                                        else 1))


modules.register_module(modules.Module(
    name="coulomb_graph_attention", fn=coulomb_graph_attention, linen=CoulombGraphAttention,
    kind="points", family="graph", seeds=(46,),
    paper="CoulGAT: An Experiment on Interpretability of Graph Attention Networks",
    arxiv="1912.08409", keeps_shape=False, out_shape=_out_shape,
    extra_inputs=(modules.ExtraInput("adjacency", lambda s: (s[0], s[1], s[1]), positive=True),),
    example={"heads": 2, "features": 6}))
