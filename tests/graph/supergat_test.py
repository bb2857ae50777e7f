"""SuperGAT's self-supervised edge loss: sampled negatives are never edges (either direction) nor
self-pairs, the loss is the binary cross-entropy of the head-averaged logits (numpy), the Linen
layer sows it in training, and minimizing it alone makes the logits separate the graph's edges from
non-edges (Zachary's karate club, which networkx ships)."""

import jax
import jax.numpy as jnp
import networkx as nx
import numpy as np
import optax
import pytest

from attnjax import graph
from tests import tolerances


def _karate():
  g = nx.karate_club_graph()
  s, r = np.asarray(list(g.edges()), np.int32).T
  s, r = np.concatenate([s, r]), np.concatenate([r, s])   # both directions
  v = g.number_of_nodes()
  return np.eye(v, dtype=np.float32), s, r


def test_negative_edges_are_not_edges():
  nodes, s, r = _karate()
  v = len(nodes)
  ns, nr, ok = graph.negative_edges(jax.random.PRNGKey(0), jnp.asarray(s), jnp.asarray(r), v, 500)
  edges = set(zip(s.tolist(), r.tolist(), strict=True))
  ns, nr, ok = np.asarray(ns), np.asarray(nr), np.asarray(ok)
  assert (ns != nr).all() and ns.min() >= 0 and nr.max() < v
  np.testing.assert_array_equal(ok, [(a, b) not in edges for a, b in zip(ns, nr, strict=True)])
  assert 0.7 < ok.mean() < 1.0   # karate club has density ~0.14: most draws are non-edges


@pytest.mark.parametrize("kind", ["MX", "SD"])
def test_loss_is_bce_of_head_averaged_logits(kind):
  nodes, s, r = _karate()
  v, heads, c = len(nodes), 2, 3
  lin = jax.random.normal(jax.random.PRNGKey(1), (v, heads * c)) * 0.3
  ns = np.asarray([0, 5, 9], np.int32)
  nr = np.asarray([20, 30, 12], np.int32)
  got = graph.supergat_attention_loss(nodes, s, r, ns, nr, lin=lin, heads=heads,
                                      attention_type=kind)
  x = (nodes @ np.asarray(lin, np.float64)).reshape(v, heads, c)
  ps = np.concatenate([s, np.arange(v)])
  pr = np.concatenate([r, np.arange(v)])

  def logit(a, b):
    d = np.sum(x[a] * x[b], axis=-1) / (np.sqrt(c) if kind == "SD" else 1.0)
    return d.mean(axis=-1)

  z = np.concatenate([logit(pr, ps), logit(nr, ns)])
  y = np.concatenate([np.ones(len(ps)), np.zeros(len(ns))])
  want = np.mean(np.logaddexp(0, z) - y * z)
  np.testing.assert_allclose(got, want, **tolerances.OUTPUT[jnp.float32])


def test_linen_sows_the_loss_and_minimizing_it_separates_edges():
  nodes, s, r = _karate()
  layer = graph.SuperGATConv(out_channels=4, heads=2, attention_type="SD")
  variables = layer.init(jax.random.PRNGKey(0), nodes, s, r)
  _, state = layer.apply(variables, nodes, s, r, train=True, mutable=["intermediates"],
                         rngs={"negatives": jax.random.PRNGKey(1)})
  assert np.isfinite(float(state["intermediates"]["attention_loss"][0]))

  def loss(params, key):
    _, st = layer.apply({"params": params}, nodes, s, r, train=True, mutable=["intermediates"],
                        rngs={"negatives": key})
    return st["intermediates"]["attention_loss"][0]

  tx = optax.adam(0.05)
  params, opt = variables["params"], tx.init(variables["params"])

  @jax.jit
  def step(p, o, key):
    value, grads = jax.value_and_grad(loss)(p, key)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, value

  first = None
  for i in range(150):
    params, opt, value = step(params, opt, jax.random.PRNGKey(100 + i))
    first = float(value) if first is None else first
  # Held-out negatives: edges now get higher logits than non-edges (AUC well above chance).
  x = (nodes @ np.asarray(params["lin"])).reshape(len(nodes), 2, 4)
  ns, nr, ok = graph.negative_edges(jax.random.PRNGKey(7), jnp.asarray(s), jnp.asarray(r),
                                    len(nodes), 400)
  neg = np.sum(x[np.asarray(nr)] * x[np.asarray(ns)], axis=-1).mean(-1)[np.asarray(ok)]
  pos = np.sum(x[r] * x[s], axis=-1).mean(-1)
  auc = np.mean(pos[:, None] > neg[None, :])
  assert float(value) < first and auc > 0.8, (first, float(value), auc)
