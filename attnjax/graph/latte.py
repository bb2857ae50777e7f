"""LATTE: layer-stacked attention for heterogeneous graphs. Each layer attends, for every node, over
its neighbours under each meta-relation of one order, then over those relations; layer t works on
the t-hop meta-relations composed from layer t − 1's attended edges, and the layers' outputs are
stacked.

"Layer-stacked Attention for Heterogeneous Network Embedding", arXiv:2009.08072. Following the
authors' `LATTE` and `LATTEConv` (JonnyTran/LATTE, `conv.py`). A heterogeneous graph has node types
τ with features h_τ `[V_τ, D]` and meta-relations m = (τ_head, ..., τ_tail) with adjacency
A_m `[V_head, V_tail]` (nonzero: an edge). One layer, for each node type τ:

    l = h_τ W^l_τ + b^l_τ,  r = h_τ W^r_τ + b^r_τ                  [V, heads, C]  (per type)
    e_ij^m = s_m · LeakyReLU_0.2(⟨l_i, a^l_m⟩ + ⟨r_j, a^r_m⟩)       per head, edge (i, j) of m
    α^m = softmax_j over i's m-neighbours (zeros for a node with none)
    z_i^m = Σ_j α_ij^m r_j                                           one embedding per relation
    β_i = softmax(h_i W^β_τ + b^β_τ)  over the relations with head τ, plus "self" (z^self = l_i)
    out_i = ReLU(Σ_m β_i^m z_i^m)

s_m (init 1) is the code's "sharpening" scale. The next order's relations join each attended relation
m = (..., κ) with each first-order relation (κ, ...), weighting each intermediate node as Adamic-Adar
does (the code's `adamic_adar`): A' = Ã D B with D = diag(1 / (colsum Ã + rowsum B)), Ã the layer's
attention on m (max over heads) with entries below `threshold` dropped (the largest kept when none
passes). The code then samples as many of the joined edges as the inputs had (to bound sparse
memory); here relations are dense `[V_head, V_tail]` matrices, so the joined relation is kept whole
(no sampling): the layer is deterministic. `proximity_loss` is the code's link-prediction term:
−mean log σ(ŝ) on a relation's edges and −mean log σ(−ŝ) on sampled non-edges, with
ŝ = s_m LeakyReLU(max over heads of ⟨l_i, a^l_m⟩ + ⟨r_j, a^r_m⟩) (a fixed number of non-edge draws
here).

Dense adjacency keeps shapes static under jit and makes relation composition a matrix product; it
suits graphs of up to a few thousand nodes per type.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import catalog
from attnjax.core import pooling
from attnjax.typing import Array, Float

__all__ = ["LATTE", "join_relations", "latte_layer", "proximity_loss"]

Relation = tuple[str, ...]
Adjacency = Float[Array, "Vh Vt"]
Features = Float[Array, "V D"]
Params = Mapping[str, jax.Array]
_SLOPE = 0.2
# The code's default edge threshold for composing relations from attention values.
DEFAULT_THRESHOLD = 0.25



def _scores(params, relation, index, l, r):
  """`s_m LeakyReLU(⟨l_i, a^l_m⟩ + ⟨r_j, a^r_m⟩)` `[V_head, V_tail, heads]`."""
  al = jnp.einsum("ihc,hc->ih", l[relation[0]], params["attn_l"][index])
  ar = jnp.einsum("jhc,hc->jh", r[relation[-1]], params["attn_r"][index])
  return params["sharpen"][index] * jax.nn.leaky_relu(al[:, None] + ar[None], _SLOPE)


def _check(features, relations, op):
  for relation, adj in relations.items():
    head, tail = relation[0], relation[-1]
    if head not in features or tail not in features:
      raise ValueError(f"{op}: relation {relation} joins node types missing from `features` "
                       f"({sorted(features)})")
    want = (features[head].shape[0], features[tail].shape[0])
    if jnp.shape(adj) != want:
      raise ValueError(f"{op}: relation {relation} must be a [V_head, V_tail] = {list(want)} "
                       f"adjacency, got shape {list(jnp.shape(adj))}")


def latte_layer(features: Mapping[str, Features], relations: Mapping[Relation, Adjacency],
                params: Mapping[str, Params], *, heads: int, activation: bool = True):
  """One LATTE layer (module docstring). `params`: per node type {"w_l", "b_l", "w_r", "b_r",
  "w_beta", "b_beta"} and under "relations" {"attn_l" [R, heads, C], "attn_r", "sharpen" [R]}, rows
  in the sorted order of the relation tuples (a dict's order does not survive jit, which sorts
  keys); each type's relation weights β follow that order, then "self". Returns `(out {type:
  [V, heads·C]}, attention {relation: [V_head, V_tail]} (max over heads), beta {type:
  [V, R_type + 1]})`."""
  op = "latte_layer"
  _check(features, relations, op)
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  h = {t: f32(x) for t, x in features.items()}
  rel = {k: f32(v) for k, v in params["relations"].items()}
  names = sorted(relations)

  def project(t, side):
    p = params[t]
    y = h[t] @ f32(p[f"w_{side}"]) + f32(p[f"b_{side}"])
    return y.reshape(y.shape[0], heads, -1)

  l = {t: project(t, "l") for t in h}
  r = {t: project(t, "r") for t in h}
  per_type = {t: [] for t in h}
  attention = {}
  for index, relation in enumerate(names):
    adj = f32(relations[relation])
    weights = pooling.masked_softmax(_scores(rel, relation, index, l, r), (adj != 0)[..., None],
                                     axis=1)
    per_type[relation[0]].append(jnp.einsum("ijh,jhc->ihc", weights, r[relation[-1]]))
    attention[relation] = jnp.max(weights, axis=-1)
  out, beta = {}, {}
  for t in h:
    stacked = jnp.stack(per_type[t] + [l[t]], axis=1).reshape(h[t].shape[0], len(per_type[t]) + 1, -1)
    beta[t] = jax.nn.softmax(h[t] @ f32(params[t]["w_beta"]) + f32(params[t]["b_beta"]), axis=-1)
    y = jnp.einsum("vr,vrd->vd", beta[t], stacked)
    out[t] = jax.nn.relu(y) if activation else y
  return out, attention, beta


def join_relations(attention: Mapping[Relation, Adjacency], first: Mapping[Relation, Adjacency], *,
                   threshold: float = DEFAULT_THRESHOLD) -> dict[Relation, Adjacency]:
  """The next order's relations: each attended relation (…, κ) joined with each first-order relation
  (κ, …) as Ã D B, D = diag(1 / (colsum Ã + rowsum B)), Ã the attention with entries below
  `threshold` dropped (the relation keeps its largest entry if none passes)."""
  out = {}
  for ra, a in attention.items():
    a = jnp.asarray(a, jnp.float32)
    passes = (a >= threshold) & (a > 0)
    # As the code: when no edge passes, the relation keeps its single largest one.
    fallback = (a == jnp.max(a)) & (a > 0)
    kept = jnp.where(jnp.where(jnp.any(passes), passes, fallback), a, 0.0)
    for rb, b in first.items():
      if ra[-1] != rb[0]:
        continue
      b = (jnp.asarray(b) != 0).astype(jnp.float32)
      deg = jnp.sum(kept, axis=0) + jnp.sum(b, axis=1)
      out[ra + rb[1:]] = (kept * jnp.where(deg > 0, 1.0 / jnp.where(deg > 0, deg, 1.0), 0.0)) @ b
  return out


def proximity_loss(features, relations, params, *, heads: int, key: jax.Array,
                   num_negatives: int = 64):
  """The code's link-prediction loss over every relation: −mean log σ(ŝ) on its edges plus
  −mean log σ(−ŝ) on `num_negatives` uniform draws among its non-edges (drawn with `key`; the code
  draws a multiple of the edge count, a number that is not static under jit), summed and divided by
  twice the number of relations."""
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  h = {t: f32(x) for t, x in features.items()}
  rel = {k: f32(v) for k, v in params["relations"].items()}

  def project(t, side):
    y = h[t] @ f32(params[t][f"w_{side}"]) + f32(params[t][f"b_{side}"])
    return y.reshape(y.shape[0], heads, -1)

  l = {t: project(t, "l") for t in h}
  r = {t: project(t, "r") for t in h}
  total = 0.0
  for index, relation in enumerate(sorted(relations)):
    adj = relations[relation]
    al = jnp.einsum("ihc,hc->ih", l[relation[0]], rel["attn_l"][index])
    ar = jnp.einsum("jhc,hc->jh", r[relation[-1]], rel["attn_r"][index])
    pred = rel["sharpen"][index] * jax.nn.leaky_relu(jnp.max(al[:, None] + ar[None], -1), _SLOPE)
    edge = jnp.asarray(adj) != 0
    total = total - jnp.sum(jnp.where(edge, jax.nn.log_sigmoid(pred), 0.0)) / jnp.maximum(
        jnp.sum(edge), 1)
    key, sub = jax.random.split(key)
    draws = jax.random.categorical(sub, jnp.where(edge, -jnp.inf, 0.0).reshape(-1),
                                   shape=(num_negatives,))
    negative = -jnp.mean(jax.nn.log_sigmoid(-pred.reshape(-1)[draws]))
    total = total + jnp.where(jnp.all(edge), 0.0, negative)   # a complete relation has no non-edge
  return total / max(2 * len(relations), 1)


@catalog.serves(231, kind="layer")
class LATTE(nn.Module):
  """LATTE (module docstring): per-type input projections (ReLU), `num_layers` layers of orders
  1..num_layers, and the layers' outputs stacked by `pooling` ("concat", "mean", "max" or "last").
  `relation_types`: the first-order meta-relations (the keys of `relations` the model reads).
  Call: `(features {type: [V, F]}, relations {relation: [V_head, V_tail]}) → {type: [V, ...]}`."""
  relation_types: Sequence[Relation]
  embedding_dim: int = 16
  heads: int = 2
  num_layers: int = 2
  pooling: str = "concat"
  threshold: float = DEFAULT_THRESHOLD

  @nn.compact
  def __call__(self, features: Mapping[str, Features], relations: Mapping[Relation, Adjacency]):
    if self.pooling not in ("concat", "mean", "max", "last"):
      raise ValueError("LATTE: `pooling` must be 'concat', 'mean', 'max' or 'last', got "
                       f"{self.pooling!r}")
    if self.embedding_dim % self.heads:
      raise ValueError(f"LATTE: embedding_dim = {self.embedding_dim} must split into {self.heads} "
                       "heads")
    relu_gain = nn.initializers.variance_scaling(2.0, "fan_avg", "normal")
    h = {t: jax.nn.relu(nn.Dense(self.embedding_dim, kernel_init=relu_gain, name=f"project_{t}")(x))
         for t, x in features.items()}
    first = {tuple(k): relations[tuple(k)] for k in self.relation_types}
    current, outputs = first, []
    for layer in range(self.num_layers):
      params = self._layer_params(layer, list(h), sorted(current))
      h, attention, _ = latte_layer(h, current, params, heads=self.heads)
      outputs.append(h)
      if layer + 1 < self.num_layers:
        current = join_relations(attention, first, threshold=self.threshold)
    if self.pooling == "last":
      return outputs[-1]
    stack = {t: jnp.stack([o[t] for o in outputs], axis=1) for t in h}
    if self.pooling == "concat":
      return {t: s.reshape(s.shape[0], -1) for t, s in stack.items()}
    return {t: (jnp.mean(s, 1) if self.pooling == "mean" else jnp.max(s, 1)) for t, s in stack.items()}

  def _layer_params(self, layer, types, relations):
    D, heads = self.embedding_dim, self.heads
    relu_gain = nn.initializers.variance_scaling(2.0, "fan_avg", "normal")
    leaky_gain = nn.initializers.variance_scaling(2.0 / (1 + _SLOPE ** 2), "fan_avg", "normal")
    params = {}
    for t in types:
      n_rel = sum(1 for m in relations if m[0] == t) + 1
      params[t] = {
          "w_l": self.param(f"layer{layer}_{t}_w_l", relu_gain, (D, D)),
          "b_l": self.param(f"layer{layer}_{t}_b_l", nn.initializers.zeros, (D,)),
          "w_r": self.param(f"layer{layer}_{t}_w_r", relu_gain, (D, D)),
          "b_r": self.param(f"layer{layer}_{t}_b_r", nn.initializers.zeros, (D,)),
          "w_beta": self.param(f"layer{layer}_{t}_w_beta", nn.initializers.xavier_normal(), (D, n_rel)),
          "b_beta": self.param(f"layer{layer}_{t}_b_beta", nn.initializers.zeros, (n_rel,))}
    params["relations"] = {
        "attn_l": self.param(f"layer{layer}_attn_l", leaky_gain, (len(relations), heads, D // heads)),
        "attn_r": self.param(f"layer{layer}_attn_r", leaky_gain, (len(relations), heads, D // heads)),
        "sharpen": self.param(f"layer{layer}_sharpen", nn.initializers.ones, (len(relations),))}
    return params

