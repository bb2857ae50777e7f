"""The layer's RoPE options: `rope_scaling` (context extension) and `fope` (Fourier Position
Embedding) reach q and k in the full forward and in decoding, and FoPE's coefficients are fixed
arrays in 'buffers'.

Checked: linear interpolation in the layer equals the plain-RoPE layer at positions p / s; prefill
and token-by-token decoding equal the full forward under YaRN and FoPE (both are functions of a
token's own position); FoPE's buffers have the kept-pair shape, stay out of 'params', and set to the
identity without clipping give the plain-RoPE layer; misuse raises.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from attnjax import registry
from attnjax.nn import MultiHeadAttention
from attnjax.ops.positional import fope
from tests import tolerances

B, T, D, N, K = 2, 11, 32, 4, 2
H = D // N
TOL = tolerances.output(jnp.float32)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}


def _layer(**kw):
  return MultiHeadAttention(num_heads=N, num_kv_heads=K, causal=True, rope_base=10000.0,
                            bias_init=nn.initializers.normal(0.1), **kw)


def _x(seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (B, T, D), jnp.float32)


def _init(layer, x):
  return jax.jit(lambda x: layer.init(jax.random.PRNGKey(0), x))(x)


def _decode_all(layer, variables, x, prefill):
  shapes = jax.eval_shape(lambda x: layer.init(jax.random.PRNGKey(9), x, decode=True), x)["cache"]
  cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  step = jax.jit(lambda cache, xs: layer.apply({**variables, "cache": cache}, xs, decode=True,
                                               mutable=["cache"]))
  out, mutated = step(cache, x[:, :prefill])
  outs, cache = [out], mutated["cache"]
  for t in range(prefill, x.shape[1]):
    out, mutated = step(cache, x[:, t:t + 1])
    outs.append(out)
    cache = mutated["cache"]
  return jnp.concatenate(outs, axis=1)


def test_linear_scaling_in_the_layer_is_rope_at_positions_over_factor():
  x = _x()
  scaled = _layer(rope_scaling={"rope_type": "linear", "factor": 2.5})
  plain = _layer()
  variables = _init(plain, x)
  out, want, unscaled = jax.jit(lambda v, x: (
      scaled.apply(v, x), plain.apply(v, x, positions=jnp.arange(T) / 2.5), plain.apply(v, x)))(
          variables, x)
  chex.assert_trees_all_close(out, want, **TOL)
  assert float(jnp.max(jnp.abs(out - unscaled))) > tolerances.CHANGED_MAX_ABS


@pytest.mark.parametrize("options", [{"rope_scaling": YARN},
                                     {"fope": {"train_length": 24, "sigma": 0.5}}])
def test_decode_equals_full_forward(options):
  x = _x(1)
  layer = _layer(**options)
  variables = _init(layer, x)
  full = jax.jit(layer.apply)(variables, x)
  chex.assert_trees_all_close(_decode_all(layer, variables, x, prefill=4), full, **TOL)


def test_fope_coefficients_are_fixed_buffers_of_the_kept_pairs():
  x = _x()
  layer = _layer(fope={"train_length": 24})
  variables = _init(layer, x)
  kept = fope.fope_kept_pairs(H, train_length=24)
  assert 0 < kept < H // 2
  buffers = variables[registry.BUFFERS]
  for name in ("fope_cos_coef", "fope_sin_coef"):
    chex.assert_shape(buffers[name], (K, kept, kept))
    assert name not in variables["params"]
  assert not jnp.allclose(buffers["fope_cos_coef"], jnp.eye(kept))   # σ = 0.3 by default
  shared = jax.eval_shape(_layer(fope={"train_length": 24, "separate_heads": False}).init,
                          jax.random.PRNGKey(0), x)
  chex.assert_shape(shared[registry.BUFFERS]["fope_cos_coef"], (1, kept, kept))
  # Identity coefficients and no clipping: the plain-RoPE layer with the same parameters.
  unclipped = _layer(fope={"train_length": None})
  eye = jnp.broadcast_to(jnp.eye(H // 2), (K, H // 2, H // 2))
  identity = {"params": variables["params"],
              registry.BUFFERS: {"fope_cos_coef": eye, "fope_sin_coef": eye}}
  out, want = jax.jit(lambda x: (unclipped.apply(identity, x),
                                 _layer().apply({"params": variables["params"]}, x)))(x)
  chex.assert_trees_all_close(out, want, **TOL)


@pytest.mark.parametrize("kw,match", [
    (dict(rope_base=None, rope_scaling=YARN), "set `rope_base`"),
    (dict(rope_scaling=YARN, fope={"train_length": 24}), "not combined"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "original_max_position_embeddings"),
    (dict(fope={"train_length": 3}), "clips every"),
])
def test_misuse_raises(kw, match):
  layer = MultiHeadAttention(num_heads=N, causal=True, **{"rope_base": 10000.0, **kw})
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(lambda x: layer.init(jax.random.PRNGKey(0), x), _x())
