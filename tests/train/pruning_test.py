"""ASWL (#169, arXiv:2111.02399, rule of the reference code kisonho/aswl): higher layer attention
gives a lower pruning ratio p = (1 - clip(a))^α, masks prune exactly ⌊n p⌋ smallest magnitudes
(numpy loop), the kept-fraction penalty, and dense weights (pruned entries included) keep being
updated by the gradient taken at the sparse weights."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from attnjax.train import pruning
from tests import tolerances


def _params():
  rng = np.random.default_rng(0)
  return {"l1": jnp.asarray(rng.standard_normal((4, 6)), jnp.float32),
          "l2": jnp.asarray(rng.standard_normal((6, 3)), jnp.float32)}


def test_higher_attention_is_pruned_less():
  att = {"a": jnp.float32(0.2), "b": jnp.float32(0.7), "c": jnp.float32(2.0), "d": jnp.float32(-1)}
  for alpha in (1.0, 2.0):
    p = pruning.pruning_ratios(att, alpha)
    np.testing.assert_allclose(p["a"], 0.8 ** alpha, **tolerances.ELEMENTWISE[jnp.float32])
    np.testing.assert_allclose(p["b"], 0.3 ** alpha, **tolerances.ELEMENTWISE[jnp.float32])
    assert p["c"] == 0.0                     # attention clipped to 1: nothing pruned
    np.testing.assert_allclose(p["d"], 0.99 ** alpha, **tolerances.ELEMENTWISE[jnp.float32])
    assert p["d"] > p["a"] > p["b"] > p["c"]


def test_mask_keeps_the_stated_ratio_of_largest_magnitudes():
  w = np.asarray(np.random.default_rng(1).standard_normal((7, 9)), np.float32)
  n = w.size
  for ratio in (0.0, 0.1, 0.5, 0.73, 0.99):
    mask = np.asarray(pruning.magnitude_mask(jnp.asarray(w), ratio))
    pruned = int(np.floor(n * ratio))
    assert mask.sum() == n - pruned, ratio
    order = np.argsort(np.abs(w).reshape(-1))
    want = np.ones(n, bool)
    for i in order[:pruned]:
      want[i] = False
    np.testing.assert_array_equal(mask.reshape(-1), want)


def test_prune_uses_each_layers_ratio():
  params = _params()
  att = {"l1": jnp.float32(0.25), "l2": jnp.float32(0.9)}
  sparse = pruning.prune(params, att)
  for k, a in (("l1", 0.25), ("l2", 0.9)):
    n = params[k].size
    kept = np.count_nonzero(np.asarray(sparse[k]))
    assert kept == n - int(np.floor(n * (1 - a))), (k, kept)
    nz = np.asarray(sparse[k]) != 0
    np.testing.assert_array_equal(np.asarray(sparse[k])[nz], np.asarray(params[k])[nz])


def test_attention_penalty_matches_kept_fraction():
  params = _params()
  att = {"l1": jnp.float32(0.25), "l2": jnp.float32(0.001)}
  got = pruning.attention_penalty(att, params, decay=5.0, pruning_factor=1.0, target=0.1)
  p = np.array([0.75, 0.99])               # 1 - clip(0.001) = 0.99 (and clipped at 0.99)
  sizes = np.array([24.0, 18.0])
  want = 5.0 * (((1 - p) * sizes).sum() / sizes.sum() - 0.1) ** 2
  np.testing.assert_allclose(got, want, **tolerances.output(jnp.float32))
  # With target 0 the penalty lowers attention (more pruning): its gradient is positive.
  g = jax.grad(lambda a: pruning.attention_penalty(a, params))({"l1": jnp.float32(0.5),
                                                                "l2": jnp.float32(0.5)})
  assert g["l1"] > 0 and g["l2"] > 0


def _loss(sparse, att, batch):
  x, y = batch
  h = jnp.tanh(x @ sparse["l1"]) * pruning.layer_scale(att["l1"])
  out = (h @ sparse["l2"]) * pruning.layer_scale(att["l2"])
  return jnp.mean((out - y) ** 2)


def test_train_step_updates_dense_weights_including_pruned_ones():
  params = _params()
  att = pruning.init_attentions(params)
  rng = np.random.default_rng(2)
  batch = (jnp.asarray(rng.standard_normal((5, 4)), jnp.float32),
           jnp.asarray(rng.standard_normal((5, 3)), jnp.float32))
  lr = 0.1
  opt = optax.sgd(lr)
  state = opt.init((params, att))
  sparse = pruning.prune(params, att)
  pruned = np.asarray(sparse["l1"]) == 0
  assert pruned.sum() == int(np.floor(params["l1"].size * 0.5))
  dense, att2, state, loss = pruning.train_step(_loss, params, att, state, opt, batch, decay=5.0)
  # The update is the gradient at the sparse weights applied to the dense ones.
  total = lambda s, a: _loss(s, a, batch) + pruning.attention_penalty(a, s, decay=5.0)  # noqa: E731
  gs, ga = jax.grad(total, argnums=(0, 1))(sparse, att)
  for k in params:
    np.testing.assert_allclose(dense[k], params[k] - lr * gs[k], **tolerances.GRAD[jnp.float32])
    np.testing.assert_allclose(att2[k], att[k] - lr * ga[k], **tolerances.GRAD[jnp.float32])
  np.testing.assert_allclose(loss, total(sparse, att), **tolerances.output(jnp.float32))
  moved = np.asarray(dense["l1"])[pruned] != np.asarray(params["l1"])[pruned]
  # Pruned weights keep receiving updates wherever the loss depends on them (a weight feeding only
  # pruned weights downstream has a zero gradient).
  assert moved.sum() > pruned.sum() // 2
  np.testing.assert_array_equal(moved, np.asarray(gs["l1"])[pruned] != 0)


def test_attentions_must_match_params():
  with pytest.raises(ValueError, match="structure of params"):
    pruning.prune(_params(), {"l1": jnp.float32(0.5)})
