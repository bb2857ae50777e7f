"""Streamable normalizers: shifted forms are exactly f·e^{-m}, derivatives, the registry, and a custom
normalizer plugged into both flex implementations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import flex
from attnjax.core import masks
from attnjax.core import normalizers
from tests import tolerances

S = jnp.linspace(-6.0, 6.0, 41)

CLOSED_FORMS = {
    "softmax": (jnp.exp, jnp.exp),
    "softpick": (lambda s: jax.nn.relu(jnp.exp(s) - 1), lambda s: jnp.abs(jnp.exp(s) - 1)),
    "sigmoid": (jax.nn.sigmoid, jax.nn.sigmoid),
    "relu": (jax.nn.relu, jax.nn.relu),
}


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_shifted_forms_are_exact(name):
  norm = normalizers.get_normalizer(name)
  f, h = CLOSED_FORMS[name]
  for m in (0.0, 1.5, 4.0):
    shift = jnp.exp(-m) if norm.normalized else 1.0
    w, mass = norm.weight_and_mass(S, jnp.asarray(m))
    chex.assert_trees_all_close(w, f(S) * shift, **tolerances.output(jnp.float32))
    if norm.normalized:
      chex.assert_trees_all_close(mass, h(S) * shift, **tolerances.output(jnp.float32))


@pytest.mark.parametrize("name", sorted(CLOSED_FORMS))
def test_weight_grads_match_autodiff(name):
  norm = normalizers.get_normalizer(name)
  s = S + 0.05     # keep off relu's kink at 0
  m = jnp.asarray(1.0)
  w, dw, dh = norm.weight_grads(s, m)
  chex.assert_trees_all_close(w, norm.weight(s, m), **tolerances.output(jnp.float32))
  chex.assert_trees_all_close(dw, jax.vmap(jax.grad(lambda x: norm.weight(x, m)))(s),
                              **tolerances.grad(jnp.float32))
  mass = norm.weight if norm.mass is None else norm.mass
  chex.assert_trees_all_close(dh, jax.vmap(jax.grad(lambda x: mass(x, m)))(s),
                              **tolerances.grad(jnp.float32))


def test_shift_and_denominator():
  row_max = jnp.asarray([-3.0, 0.5, -jnp.inf])
  np.testing.assert_array_equal(normalizers.SOFTMAX.shift(row_max), row_max)
  np.testing.assert_array_equal(normalizers.SOFTPICK.shift(row_max), [0.0, 0.5, 0.0])
  np.testing.assert_array_equal(normalizers.SIGMOID.shift(row_max), 0.0)
  m = jnp.asarray(2.0)
  chex.assert_trees_all_close(normalizers.SOFTPICK.denominator(jnp.asarray(3.0), m),
                              3.0 + normalizers.SOFTPICK.eps * jnp.exp(-2.0),
                              **tolerances.output(jnp.float32))
  assert float(normalizers.SOFTMAX.denominator(jnp.asarray(3.0), m)) == 3.0


def test_registry():
  assert {"softmax", "softpick", "sigmoid", "relu"} <= set(normalizers.list_normalizers())
  assert normalizers.get_normalizer("softpick") is normalizers.SOFTPICK
  assert normalizers.get_normalizer(normalizers.RELU) is normalizers.RELU
  with pytest.raises(ValueError, match="unknown normalizer"):
    normalizers.get_normalizer("nope")
  with pytest.raises(ValueError, match="already registered"):
    normalizers.register_normalizer(normalizers.Normalizer("softmax", weight=lambda s, m: s))
  assert normalizers.register_normalizer(normalizers.SOFTMAX) is normalizers.SOFTMAX


def test_custom_normalizer_plugs_into_both_implementations():
  # "Softmax plus one" (an attention sink in the denominator): f = h = e^s, ε = 1, streamed by the
  # same kernel with no new code.
  plus_one = normalizers.Normalizer("test_softmax_plus_one", weight=lambda s, m: jnp.exp(s - m), eps=1.0)
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 21, 2, 4)), jnp.float32) for _ in range(3))
  s = np.einsum("btnh,bsnh->bnts", np.float64(q), np.float64(k)) / 2.0
  causal = np.tril(np.ones((21, 21), bool))
  e = np.where(causal, np.exp(s), 0.0)
  want = np.einsum("bnts,bsnh->btnh", e / (e.sum(-1, keepdims=True) + 1.0), np.float64(v))
  grads = {}
  for impl in ("xla", "reference"):
    out = flex.flex_attention(q, k, v, mask_mod=masks.causal(), normalizer=plus_one,
                              implementation=impl)
    chex.assert_trees_all_close(out, want.astype(np.float32), **tolerances.output(jnp.float32))
    grads[impl] = jax.grad(lambda q, k, v: jnp.sum(flex.flex_attention(
        q, k, v, mask_mod=masks.causal(), normalizer=plus_one, implementation=impl) ** 2),
                           argnums=(0, 1, 2))(q, k, v)
  chex.assert_trees_all_close(grads["xla"], grads["reference"], **tolerances.grad(jnp.float32))
