"""Perceiver (arXiv:2103.03206): the whole forward against a float64 numpy rewrite (Fourier features,
pre-LN cross-attention from the latents, the shared latent transformer, cross_1 reused by every
block after the first); the compiled cost is linear in the input length (FLOPs' second difference
over M = 64..512 is ~0, where self-attention over the inputs is quadratic); without position
features the input is a set (permutation invariant), with them it is not."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.cross import perceiver
from tests import tolerances

SMALL = dict(num_latents=3, latent_dim=8, num_heads=2, latent_layers=2, num_bands=2, num_blocks=3)
# The FLOP count's curvature in M relative to its slope: exactly linear programs give ~0; a
# quadratic term (self-attention over the inputs) gives order 1 (checked below).
LINEAR_CURVATURE_MAX = 0.02


def _np_ln(x, p):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"]


def _np_attn(zq, xkv, p):
  q = np.einsum("nd,dhk->nhk", zq, p["query"])
  k = np.einsum("mc,chk->mhk", xkv, p["key"])
  v = np.einsum("mc,chk->mhk", xkv, p["value"])
  out = np.zeros_like(q)
  for h in range(q.shape[1]):
    for n in range(q.shape[0]):
      s = k[:, h] @ q[n, h] / np.sqrt(q.shape[-1])
      w = np.exp(s - s.max())
      out[n, h] = (w / w.sum()) @ v[:, h]
  return np.einsum("nhk,hkd->nd", out, p["out"])


def _np_gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _np_mlp(x, p):
  return _np_gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def _np_perceiver(x, params, num_blocks, num_bands):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  m = x.shape[0]
  pos = np.linspace(-1, 1, m)[:, None]
  f = np.linspace(1, m / 2, num_bands)[None]
  h = np.concatenate([x, pos, np.sin(np.pi * pos * f), np.cos(np.pi * pos * f)], axis=-1)
  z = p["latents"].copy()
  for b in range(num_blocks):
    c = p["cross_0"] if b == 0 else p["cross_1"]
    z = z + _np_attn(_np_ln(z, c["norm_latents"]), _np_ln(h, c["norm_inputs"]), c["attention"])
    z = z + _np_mlp(_np_ln(z, c["norm_mlp"]), c["mlp"])
    for i in range(len(p["latent_layers"])):
      layer = p["latent_layers"][f"layer_{i}"]
      a = _np_ln(z, layer["norm_attention"])
      z = z + _np_attn(a, a, layer["attention"])
      z = z + _np_mlp(_np_ln(z, layer["norm_mlp"]), layer["mlp"])
  return z


def _moved(params, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda a: jnp.asarray(np.asarray(a) + 0.2 * rng.standard_normal(a.shape),
                                            jnp.float32), params)


def test_forward_matches_numpy_rewrite():
  layer = perceiver.Perceiver(**SMALL)
  x = np.random.default_rng(1).standard_normal((2, 11, 3)).astype(np.float32)
  params = _moved(layer.init(jax.random.PRNGKey(0), x)["params"])
  assert set(params) == {"latents", "cross_0", "cross_1", "latent_layers"}  # 3 blocks, 2 weight sets
  got = jax.jit(lambda p: layer.apply({"params": p}, x))(params)
  for b in range(2):
    np.testing.assert_allclose(got[b], _np_perceiver(x[b].astype(np.float64), params, 3, 2),
                               **tolerances.OUTPUT[jnp.float32])


def test_fourier_features():
  phi = np.asarray(perceiver.fourier_features(5, 3, max_freq=8.0))
  pos = np.linspace(-1, 1, 5)
  f = np.asarray([1.0, 2.5, 4.0])
  want = np.concatenate([pos[:, None], np.sin(np.pi * pos[:, None] * f),
                         np.cos(np.pi * pos[:, None] * f)], axis=1)
  np.testing.assert_allclose(phi, want, **tolerances.OUTPUT[jnp.float32])


def _flops(fn, m):
  x = jax.ShapeDtypeStruct((1, m, 4), jnp.float32)
  cost = jax.jit(fn).lower(x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


def _curvature(fn):
  f = [_flops(fn, m) for m in (64, 128, 256, 512)]
  slopes = np.diff(f) / np.diff([64, 128, 256, 512])
  return abs(slopes[-1] - slopes[0]) / slopes[0]


def test_cost_is_linear_in_the_input_length():
  layer = perceiver.Perceiver(num_latents=8, latent_dim=16, num_heads=2, latent_layers=1,
                              num_bands=4)
  params = layer.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 4)))["params"]
  assert _curvature(lambda x: layer.apply({"params": params}, x)) < LINEAR_CURVATURE_MAX

  def self_attention(x):   # the quadratic alternative the Perceiver avoids
    return jax.nn.dot_product_attention(x[:, :, None], x[:, :, None], x[:, :, None])

  assert _curvature(self_attention) > 10 * LINEAR_CURVATURE_MAX


@pytest.mark.parametrize("fourier", [False, True])
def test_set_invariance_without_position_features(fourier):
  layer = perceiver.Perceiver(**{**SMALL, "fourier": fourier})
  x = np.random.default_rng(2).standard_normal((1, 9, 3)).astype(np.float32)
  params = _moved(layer.init(jax.random.PRNGKey(0), x)["params"])
  apply = jax.jit(functools.partial(layer.apply, {"params": params}))
  y, y_perm = apply(x), apply(x[:, np.random.default_rng(3).permutation(9)])
  if fourier:
    assert tolerances.rel_rms(y_perm, y) > tolerances.CHANGED_REL_RMS
  else:
    np.testing.assert_allclose(y_perm, y, **tolerances.OUTPUT[jnp.float32])


def test_errors_name_the_argument():
  with pytest.raises(ValueError, match="`x` must be"):
    perceiver.perceiver_block(jnp.zeros((4, 3)), latents=jnp.zeros((2, 8)), cross_0={},
                              latent_layers={})
  with pytest.raises(ValueError, match="cross_1"):
    perceiver.perceiver_block(jnp.zeros((1, 4, 3)), latents=jnp.zeros((2, 8)), cross_0={},
                              latent_layers={}, num_blocks=2)
  with pytest.raises(ValueError, match="divisible"):
    perceiver.Perceiver(latent_dim=6, num_heads=4).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 3)))


def test_masked_inputs_are_not_read():
  layer = perceiver.Perceiver(**SMALL)
  rng = np.random.default_rng(4)
  x = rng.standard_normal((2, 9, 3)).astype(np.float32)
  mask = np.ones((2, 9), bool)
  mask[0, 6:] = False
  mask[1] = False   # an empty input: the latents read nothing and stay finite
  params = _moved(layer.init(jax.random.PRNGKey(0), x)["params"])
  apply = jax.jit(lambda x, m: layer.apply({"params": params}, x, m))
  y = apply(x, mask)
  x2 = x.copy()
  x2[0, 6:] += 5.0
  x2[1] += 5.0
  np.testing.assert_allclose(apply(x2, mask), y, **tolerances.OUTPUT[jnp.float32])
  assert bool(jnp.all(jnp.isfinite(y)))
  x3 = x.copy()
  x3[0, :6] += 5.0
  assert tolerances.rel_rms(apply(x3, mask)[0], y[0]) > tolerances.CHANGED_REL_RMS
