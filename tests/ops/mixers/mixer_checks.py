"""Inputs and checks shared by the token-mixer tests (tests/ops/mixers/*_test.py)."""

import beartype
import chex
import jax
import jax.numpy as jnp
import jaxtyping
import pytest

import attnjax as aj
from tests import inputs


def normal(seed, shape, scale=1.0):
  """`scale · N(0, 1)` float32 drawn from `PRNGKey(seed)`."""
  return scale * jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def check_reads_only_values_and_rejects_scale(name):
  """The paper's mixer reads one stream (v here): q and k leave the output bit-identical, the layer
  makes no projection for them; no scores, so a logit scale is an error, not silently ignored."""
  mech = aj.get_mechanism(name)
  assert mech.reads == frozenset({"v"})
  causal = "causal_self" in mech.patterns
  example = mech.example_kwargs_for(N=4, K=2, H=8, h=6)
  q, k, v = inputs.qkv(B=2, T=12, N=4, K=2, H=8, h=6, key_per_array=True)
  fn = jax.jit(lambda q, k, v: mech(q, k, v, causal=causal, **example))
  q2, k2, _ = inputs.qkv(B=2, T=12, N=4, K=2, H=8, h=6, seed=9, key_per_array=True)
  chex.assert_trees_all_equal(fn(q2, k2, v), fn(q, k, v))
  with pytest.raises(ValueError, match=f"{name}: `scale` must be None"):
    mech(q, k, v, causal=causal, scale=0.5, **example)


def check_signature_shapes(name):
  """The operator's jaxtyping annotations hold under `jaxtyped` at the conformance sizes, and a
  learned array of the wrong width fails the shape check before the body runs."""
  mech = aj.get_mechanism(name)
  checked = jaxtyping.jaxtyped(mech.fn, typechecker=beartype.beartype)
  causal = "causal_self" in mech.patterns
  example = {key: jnp.asarray(x) for key, x in mech.example_kwargs_for(N=4, K=2, H=8, h=6).items()}
  q, k, v = inputs.qkv(B=2, T=12, N=4, K=2, H=8, h=6)
  assert checked(q, k, v, causal=causal, **example).shape == (2, 12, 4, 6)
  first = next(iter(example))
  with pytest.raises(jaxtyping.TypeCheckError):
    checked(q, k, v, causal=causal, **{**example, first: example[first][..., :-1]})
