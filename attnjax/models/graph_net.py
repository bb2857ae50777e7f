"""Graph attention networks over `attnjax.graph` layers, and the runs that compare them.

  GraphNetwork(layer, hidden, heads, depth, num_classes)   node classifier: (depth - 1) attention
      layers of `heads` x `hidden` (concatenated, ELU), then one attention layer to the classes
      (heads averaged), as the GAT paper's transductive model (arXiv:1710.10903, Sec. 3.3)
  LookupNetwork(layer, k, hidden, heads)                  the GATv2 paper's DictionaryLookup model
      (arXiv:2105.14491, Sec. 4.1): node embedding, one attention layer over the key → query
      edges (no self-loops), a linear read-out of each query node to the k values
  train_node_classifier(data, layer, ...)                  full-batch Adam on the labelled nodes;
      SuperGAT adds its edge loss λ_E · L_E; returns train / test accuracy
  train_dictionary_lookup(layer, k, ...)                   Adam on fresh random instances; returns
      the accuracy on held-out instances (`experiments/graph_attention.py` records both)
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from attnjax import graph
from attnjax.data import graphs as graph_data

__all__ = ["LAYERS", "GraphNetwork", "LookupNetwork", "train_dictionary_lookup",
           "train_node_classifier"]

LAYERS = {"gat": graph.GATConv, "gatv2": graph.GATv2Conv, "supergat": graph.SuperGATConv}
_ATTENTION_LOSS = "attention_loss"


def _conv(layer: str, **kwargs) -> nn.Module:
  if layer not in LAYERS:
    raise ValueError(f"graph_net: layer must be one of {sorted(LAYERS)}, got {layer!r}")
  return LAYERS[layer](**kwargs)


class GraphNetwork(nn.Module):
  """Node classifier (module docstring): `(nodes [V, F], senders, receivers) -> logits [V, C]`."""
  layer: str = "gatv2"
  num_classes: int = 2
  hidden: int = 8
  heads: int = 4
  depth: int = 2
  add_self_loops: bool = True

  @nn.compact
  def __call__(self, nodes, senders, receivers, *, train: bool = False):
    x = nodes
    for i in range(self.depth - 1):
      conv = _conv(self.layer, out_channels=self.hidden, heads=self.heads,
                   add_self_loops=self.add_self_loops, name=f"conv_{i}")
      x = nn.elu(conv(x, senders, receivers, train=train))
    out = _conv(self.layer, out_channels=self.num_classes, heads=1, concat=False,
                add_self_loops=self.add_self_loops, name=f"conv_{self.depth - 1}")
    return out(x, senders, receivers, train=train)


class LookupNetwork(nn.Module):
  """DictionaryLookup model (module docstring): `nodes [2k, 2k] -> logits [k, k]` for the queries."""
  layer: str = "gatv2"
  k: int = 8
  hidden: int = 32
  heads: int = 1

  @nn.compact
  def __call__(self, nodes, *, train: bool = False):
    senders, receivers = graph_data.dictionary_lookup_graph(self.k)
    x = nn.Dense(self.hidden, name="embed")(nodes)
    conv = _conv(self.layer, out_channels=self.hidden, heads=self.heads, concat=False,
                 add_self_loops=False, name="conv")
    x = nn.elu(conv(x, senders, receivers, train=train))
    return nn.Dense(self.k, name="readout")(x[self.k:])


def _accuracy(logits, labels, mask) -> float:
  right = (np.asarray(jnp.argmax(logits, -1)) == np.asarray(labels))
  return float(right[np.asarray(mask)].mean())


def train_node_classifier(data: dict, layer: str, *, steps: int = 200, learning_rate: float = 0.01,
                          hidden: int = 8, heads: int = 4, weight_decay: float = 5e-4,
                          attention_loss_weight: float = 4.0, self_loops_only: bool = False,
                          seed: int = 0) -> dict[str, Any]:
  """Trains `GraphNetwork` on `data` (an `attnjax.data.graphs` task) full batch and returns
  {"train_accuracy", "test_accuracy", "loss"}. `attention_loss_weight` is SuperGAT's λ_E (used by
  "supergat" only); `self_loops_only` drops the graph's edges (each node sees itself: the features
  alone, the baseline the edges must beat)."""
  s, r = data["senders"], data["receivers"]
  if self_loops_only:
    s = r = np.zeros((0,), np.int32)
  model = GraphNetwork(layer=layer, num_classes=int(data["num_classes"]), hidden=hidden,
                       heads=heads)
  nodes, labels = jnp.asarray(data["nodes"]), jnp.asarray(data["labels"])
  train_w = jnp.asarray(data["train"], jnp.float32)
  params = model.init(jax.random.PRNGKey(seed), nodes, s, r)["params"]
  tx = optax.adamw(learning_rate, weight_decay=weight_decay)

  def loss_fn(p, key):
    logits, state = model.apply({"params": p}, nodes, s, r, train=True,
                                mutable=["intermediates"], rngs={"negatives": key})
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    loss = jnp.sum(nll * train_w) / jnp.sum(train_w)
    extra = [v for path, v in jax.tree_util.tree_leaves_with_path(state)
             if any(getattr(k, "key", None) == _ATTENTION_LOSS for k in path)]
    return loss + attention_loss_weight * sum(extra) if extra else loss

  @jax.jit
  def step(p, o, key):
    loss, grads = jax.value_and_grad(loss_fn)(p, key)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  opt, loss = tx.init(params), None
  for i in range(steps):
    params, opt, loss = step(params, opt, jax.random.PRNGKey(1000 + i))
  logits = jax.jit(lambda p: model.apply({"params": p}, nodes, s, r))(params)
  return {"train_accuracy": _accuracy(logits, labels, data["train"]),
          "test_accuracy": _accuracy(logits, labels, data["test"]), "loss": float(loss)}


def train_dictionary_lookup(layer: str, k: int, *, steps: int = 1000, batch: int = 64,
                            learning_rate: float = 3e-3, hidden: int = 32, heads: int = 1,
                            eval_instances: int = 512, seed: int = 0) -> dict[str, Any]:
  """Trains `LookupNetwork` on fresh DictionaryLookup instances of size `k`; returns
  {"train_accuracy" (the last 20 batches), "test_accuracy" (held-out instances), "loss"}."""
  model = LookupNetwork(layer=layer, k=k, hidden=hidden, heads=heads)
  rng = np.random.default_rng(seed)
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((2 * k, 2 * k)))["params"]
  tx = optax.adam(learning_rate)
  apply = jax.vmap(lambda p, x: model.apply({"params": p}, x), in_axes=(None, 0))

  def loss_fn(p, nodes, labels):
    logits = apply(p, nodes)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), logits

  @jax.jit
  def step(p, o, nodes, labels):
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, nodes, labels)
    updates, o = tx.update(grads, o, p)
    right = jnp.mean(jnp.argmax(logits, -1) == labels)
    return optax.apply_updates(p, updates), o, loss, right

  opt, recent, loss = tx.init(params), [], None
  for _ in range(steps):
    b = graph_data.dictionary_lookup(rng, k, batch)
    params, opt, loss, right = step(params, opt, jnp.asarray(b["nodes"]), jnp.asarray(b["labels"]))
    recent = (recent + [float(right)])[-20:]
  held = graph_data.dictionary_lookup(np.random.default_rng(seed + 10_000), k, eval_instances)
  logits = jax.jit(apply)(params, jnp.asarray(held["nodes"]))
  test = float(np.mean(np.asarray(jnp.argmax(logits, -1)) == held["labels"]))
  return {"train_accuracy": float(np.mean(recent)), "test_accuracy": test, "loss": float(loss)}
