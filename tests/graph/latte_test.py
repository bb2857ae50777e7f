"""LATTE (arXiv:2009.08072): one layer against a numpy loop of the authors' LATTEConv (per-relation
GAT-style attention with the sharpening scale, relation weights over the relations plus self); a node
with no neighbour under a relation gets nothing from it; the next order's relations are the attended
relations joined with the first-order ones as Ã D B (Adamic-Adar), supported only on two-hop pairs;
the stacked model and its proximity loss are finite and differentiable."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.graph import latte
from tests import tolerances

D, HEADS = 8, 2
SIZES = {"paper": 5, "author": 4, "subject": 3}


def _graph(seed=0):
  rng = np.random.default_rng(seed)
  features = {t: rng.standard_normal((n, D)).astype(np.float32) for t, n in SIZES.items()}
  pa = (rng.random((5, 4)) < 0.5).astype(np.float32)
  pa[4] = 0.0                                   # paper 4 has no author
  ps = (rng.random((5, 3)) < 0.5).astype(np.float32)
  relations = {("paper", "author"): pa, ("author", "paper"): pa.T.copy(),
               ("paper", "subject"): ps, ("subject", "paper"): ps.T.copy()}
  return features, relations


@functools.lru_cache(maxsize=None)  # one init compile for the file
def _params(seed=1):
  features, relations = _graph()
  model = latte.LATTE(relation_types=tuple(relations), embedding_dim=D, heads=HEADS, num_layers=1)
  variables = model.init(jax.random.PRNGKey(seed), features, relations)["params"]
  rng = np.random.default_rng(seed)
  variables = jax.tree.map(lambda a: np.asarray(a) + 0.3 * rng.standard_normal(np.shape(a)), variables)
  params = {t: {k: variables[f"layer0_{t}_{k}"] for k in ("w_l", "b_l", "w_r", "b_r", "w_beta",
                                                            "b_beta")} for t in SIZES}
  params["relations"] = {k: variables[f"layer0_{k}"] for k in ("attn_l", "attn_r", "sharpen")}
  return params


def _np_layer(features, relations, p):
  leaky = lambda x: np.where(x > 0, x, 0.2 * x)  # noqa: E731
  proj = lambda t, s: (features[t] @ p[t][f"w_{s}"] + p[t][f"b_{s}"]).reshape(len(features[t]),  # noqa: E731
                                                                              HEADS, -1)
  l = {t: proj(t, "l") for t in features}
  r = {t: proj(t, "r") for t in features}
  rel = p["relations"]
  out = {}
  for t, x in features.items():
    slots = []
    for m, relation in enumerate(sorted(relations)):   # the layer's relation order
      adj = relations[relation]
      if relation[0] != t:
        continue
      z = np.zeros((len(x), HEADS, D // HEADS))
      for i in range(len(x)):
        nbrs = np.nonzero(adj[i])[0]
        for h in range(HEADS):
          if not len(nbrs):
            continue
          e = np.array([rel["sharpen"][m] * leaky(l[t][i, h] @ rel["attn_l"][m, h]
                                                  + r[relation[-1]][j, h] @ rel["attn_r"][m, h])
                        for j in nbrs])
          a = np.exp(e - e.max())
          z[i, h] = (a / a.sum()) @ r[relation[-1]][nbrs, h]
      slots.append(z.reshape(len(x), -1))
    slots.append(l[t].reshape(len(x), -1))
    logits = x @ p[t]["w_beta"] + p[t]["b_beta"]
    beta = np.exp(logits - logits.max(1, keepdims=True))
    beta /= beta.sum(1, keepdims=True)
    out[t] = np.maximum(np.einsum("vr,rvd->vd", beta, np.stack(slots)), 0.0)
  return out


def test_one_layer_matches_numpy():
  features, relations = _graph(2)
  p = _params()
  got, attention, beta = jax.jit(functools.partial(latte.latte_layer, heads=HEADS))(
      features, relations, p)
  np64 = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
  want = _np_layer({t: x.astype(np.float64) for t, x in features.items()}, relations, np64)
  for t in SIZES:
    np.testing.assert_allclose(np.asarray(got[t]), want[t], **tolerances.output(jnp.float32))
    np.testing.assert_allclose(np.asarray(beta[t]).sum(1), 1.0, **tolerances.output(jnp.float32))
  # Attention rows sum to one over a node's neighbours (max over heads is at most that), and a node
  # with no neighbour under a relation attends to nothing there.
  a = np.asarray(attention[("paper", "author")])
  assert np.all(a[relations[("paper", "author")] == 0] == 0) and np.all(a[4] == 0)


def test_next_order_relations_are_adamic_adar_joins_on_two_hop_pairs():
  features, relations = _graph(3)
  _, attention, _ = jax.jit(functools.partial(latte.latte_layer, heads=HEADS))(
      features, relations, _params())
  joined = latte.join_relations(attention, relations, threshold=0.3)
  assert set(joined) == {("paper", "author", "paper"), ("author", "paper", "author"),
                         ("author", "paper", "subject"), ("paper", "subject", "paper"),
                         ("subject", "paper", "subject"), ("subject", "paper", "author")}
  a = np.asarray(attention[("paper", "author")], np.float64)
  kept = np.where(a >= 0.3, a, 0.0)
  b = relations[("author", "paper")]
  deg = kept.sum(0) + b.sum(1)
  want = kept @ np.diag(np.where(deg > 0, 1 / np.where(deg > 0, deg, 1), 0)) @ b
  got = np.asarray(joined[("paper", "author", "paper")])
  np.testing.assert_allclose(got, want, **tolerances.output(jnp.float32))
  two_hop = (relations[("paper", "author")] @ relations[("author", "paper")]) > 0
  assert np.all(got[~two_hop] == 0) and np.any(got > 0)


def test_stacked_model_and_proximity_loss_are_differentiable():
  features, relations = _graph(4)
  model = latte.LATTE(relation_types=tuple(relations), embedding_dim=D, heads=HEADS, num_layers=2)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), features, relations)
  out = jax.jit(model.apply)(variables, features, relations)
  for t, n in SIZES.items():
    assert out[t].shape == (n, 2 * D) and np.all(np.isfinite(out[t]))
  # Second-layer relation weights exist for the two-hop relations.
  assert "layer1_attn_l" in variables["params"]
  assert variables["params"]["layer1_attn_l"].shape[0] == 6
  p = _params()

  def loss(p):
    return latte.proximity_loss(features, relations, p, heads=HEADS, key=jax.random.PRNGKey(1))

  value, grads = jax.jit(jax.value_and_grad(loss))(p)
  assert np.isfinite(float(value)) and float(value) > 0
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert float(jnp.max(jnp.abs(grads["relations"]["attn_l"]))) > 0


def test_bad_inputs_are_clear_errors():
  features, relations = _graph()
  with pytest.raises(ValueError, match=r"\[V_head, V_tail\]"):
    latte.latte_layer(features, {("paper", "author"): np.ones((4, 5))}, _params(), heads=HEADS)
  with pytest.raises(ValueError, match="missing"):
    latte.latte_layer({"paper": features["paper"]},
                      {("paper", "author"): relations[("paper", "author")]}, _params(), heads=HEADS)
