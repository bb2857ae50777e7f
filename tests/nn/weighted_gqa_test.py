"""Weighted grouped-query attention (#49): the layer equals a float64 rewrite of the paper's
definition (each group's key/value head the weighted combination of its member heads' projections),
and so does the plain K-head `MultiHeadAttention` with the folded parameters; at initialization (and
after `from_mha`) it is the mean-pooled GQA conversion; gradients reach every combination weight;
decoding keeps GQA's K-head cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.nn import MultiHeadAttention, WeightedGroupedQueryAttention
from tests import inputs
from tests import tolerances

F32 = tolerances.output(jnp.float32)
B, T, D, N, K = 2, 7, 16, 4, 2
H, G = D // N, N // K


def _x(seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (B, T, D))


def _np(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


def _attention64(x, query, keys, values, out, *, causal=True):
  """Float64 GQA: `keys`, `values` `[B, T, K, H]` already projected; query and out from params."""
  q = np.einsum("btd,dnh->btnh", x, query["kernel"]) + query["bias"]
  keys, values = np.repeat(keys, G, axis=2), np.repeat(values, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, keys) / np.sqrt(H)
  if causal:
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
  w = np.exp(s - s.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum("bnts,bsnh->btnh", w, values)
  return np.einsum("btnh,nhf->btf", o, out["kernel"]) + out["bias"]


def _combined64(x, members, weights, weighting):
  """The paper's definition, unfolded: each member head projects the input, then a group's head is
  the weighted sum of its members' (for "feature", the weights scale the input of each member)."""
  kernel = members["kernel"].reshape(D, K, G, H)
  bias = members["bias"].reshape(K, G, H)
  if weighting == "feature":
    projected = np.einsum("btd,kgd,dkgh->btkgh", x, weights, kernel)
    return projected.sum(3) + bias.mean(1)
  projected = np.einsum("btd,dkgh->btkgh", x, kernel) + bias
  w = weights[..., None] if weighting == "head" else weights
  return np.einsum("btkgh,kgh->btkh", projected, np.broadcast_to(w, (K, G, H)))


def _layer(weighting):
  return WeightedGroupedQueryAttention(num_heads=N, num_kv_heads=K, weighting=weighting,
                                       causal=True)


@pytest.mark.parametrize("weighting", ["head", "channel", "feature"])
def test_folded_equals_unfolded(weighting):
  layer, x = _layer(weighting), _x()
  params = inputs.perturbed(layer.init(jax.random.PRNGKey(1), x)["params"], seed=2)
  got = layer.apply({"params": params}, x)
  p, x64 = _np(params), np.asarray(x, np.float64)
  want = _attention64(x64, p["attention"]["query"],
                      _combined64(x64, p["key"], p["key_weights"], weighting),
                      _combined64(x64, p["value"], p["value_weights"], weighting),
                      p["attention"]["out"])
  np.testing.assert_allclose(np.asarray(got), want, **F32)
  folded = layer.fold(params)
  assert folded["key"]["kernel"].shape == (D, K, H)
  plain = MultiHeadAttention(num_heads=N, num_kv_heads=K, causal=True).apply({"params": folded}, x)
  np.testing.assert_allclose(np.asarray(plain), want, **F32)


@pytest.mark.parametrize("weighting", ["head", "channel", "feature"])
def test_at_initialization_it_is_mean_pooled_gqa(weighting):
  layer, x = _layer(weighting), _x()
  x64 = np.asarray(x, np.float64)

  def mean_pooled(members):
    return (np.einsum("btd,dkgh->btkh", x64, members["kernel"].reshape(D, K, G, H)) / G
            + members["bias"].reshape(K, G, H).mean(1))

  # A trained MHA (N key/value heads, biases moved off zero) converted by from_mha.
  mha = inputs.perturbed(MultiHeadAttention(num_heads=N, causal=True).init(
      jax.random.PRNGKey(3), x)["params"], seed=4)
  fresh = layer.init(jax.random.PRNGKey(1), x)["params"]
  for params in (fresh, layer.from_mha(mha)):
    p = _np(params)
    want = _attention64(x64, p["attention"]["query"], mean_pooled(p["key"]),
                        mean_pooled(p["value"]), p["attention"]["out"])
    np.testing.assert_allclose(np.asarray(layer.apply({"params": params}, x)), want, **F32)
  converted = layer.from_mha(mha)
  np.testing.assert_array_equal(np.asarray(converted["key"]["kernel"]), np.asarray(
      mha["key"]["kernel"]))
  np.testing.assert_array_equal(np.asarray(converted["attention"]["query"]["kernel"]),
                                np.asarray(mha["query"]["kernel"]))


@pytest.mark.parametrize("weighting", ["head", "channel", "feature"])
def test_gradients_reach_every_combination_weight(weighting):
  layer, x = _layer(weighting), _x()
  params = inputs.perturbed(layer.init(jax.random.PRNGKey(1), x)["params"], seed=2)
  target = _x(seed=5)
  grads = jax.jit(jax.grad(lambda p: jnp.mean((layer.apply({"params": p}, x) - target) ** 2)))(
      params)
  for name in ("key_weights", "value_weights"):
    g = np.asarray(grads[name])
    assert g.shape == params[name].shape
    assert np.all(np.isfinite(g)) and np.all(np.abs(g) > tolerances.REACHED_ABS), name


def test_decoding_keeps_a_k_head_cache_and_equals_the_full_forward():
  layer, x = _layer("channel"), _x()
  params = inputs.perturbed(layer.init(jax.random.PRNGKey(1), x)["params"], seed=2)
  full = layer.apply({"params": params}, x)
  cache = layer.init(jax.random.PRNGKey(1), x, decode=True)["cache"]
  assert cache["attention"]["cached_key"].shape == (B, T, K, H)
  step = jax.jit(lambda cache, x: layer.apply({"params": params, "cache": cache}, x, decode=True,
                                              mutable=["cache"]))
  out, mutated = step(cache, x[:, :5])
  outs = [out]
  for t in range(5, T):
    out, mutated = step(mutated["cache"], x[:, t:t + 1])
    outs.append(out)
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, axis=1)), np.asarray(full), **F32)


def test_bad_settings_are_clear_errors():
  x = _x()
  with pytest.raises(ValueError, match="WeightedGroupedQueryAttention: `weighting` must be one of"):
    WeightedGroupedQueryAttention(num_heads=N, num_kv_heads=K, weighting="row").init(
        jax.random.PRNGKey(0), x)
  gqa = MultiHeadAttention(num_heads=N, num_kv_heads=K).init(jax.random.PRNGKey(0), x)["params"]
  with pytest.raises(ValueError, match=r"from_mha: `key/kernel` must have shape \[D, N, H\]"):
    _layer("head").from_mha(gqa)
  params = _layer("head").init(jax.random.PRNGKey(0), x)["params"]
  with pytest.raises(ValueError, match=r"fold: `key_weights` must have shape \(2, 2, 4\)"):
    _layer("channel").fold(params)
