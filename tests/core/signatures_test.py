"""The primitives' jaxtyping annotations hold under `jaxtyped` (GQA, h != H, T != S) and catch a
mis-shaped argument before the body runs. Traced only (`eval_shape`): nothing is compiled.

The registered mechanisms get the same check in tests/conformance/conformance_test.py.
"""

import beartype
import chex
import jax
import jax.numpy as jnp
import jaxtyping
import pytest

from attnjax.core import flex
from attnjax.core import kvcache
from attnjax.core import linear
from tests import inputs

B, T, S, N, K, H, HV = 2, 5, 7, 4, 2, 8, 6


def _checked(fn):
  return jaxtyping.jaxtyped(fn, typechecker=beartype.beartype)


def test_flex_attention_and_split_k_annotations_hold():
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=HV)
  out, lse = jax.eval_shape(lambda *a: _checked(flex.flex_attention)(*a, return_residuals=True),
                            q, k, v)
  chex.assert_shape((out, lse), ((B, T, N, HV), (B, T, N)))
  out = jax.eval_shape(lambda *a: _checked(kvcache.split_k_attention)(*a, split_size=3), q, k, v)
  chex.assert_shape(out, (B, T, N, HV))
  with pytest.raises(jaxtyping.TypeCheckError):
    jax.eval_shape(_checked(flex.flex_attention), q, k[..., :H - 2], v)
  with pytest.raises(jaxtyping.TypeCheckError):   # the values' length is the keys' length
    jax.eval_shape(lambda *a: _checked(kvcache.split_k_attention)(*a, split_size=3),
                   q, k, v[:, :S - 1])


def test_decode_attention_annotations_hold():
  q, k, v = inputs.qkv(B=B, T=1, S=S, N=N, K=K, H=H, h=HV)
  cache = kvcache.KVCache(k, v, jnp.full((B,), S, jnp.int32))
  out = jax.eval_shape(lambda q, c: _checked(kvcache.decode_attention)(q, c, split_size=3), q, cache)
  chex.assert_shape(out, (B, 1, N, HV))


@pytest.mark.parametrize("normalize", [False, True])
def test_gated_linear_attention_annotations_hold(normalize):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV)
  state = linear.zero_state(B, N, H, HV, normalize=normalize)
  gla = _checked(linear.gated_linear_attention)
  out, final = jax.eval_shape(
      lambda *a: gla(*a, normalize=normalize, initial_state=state, return_final_state=True), q, k, v)
  chex.assert_shape((out, final), ((B, T, N, HV), (B, N, H, HV + int(normalize))))
  o, new = jax.eval_shape(
      lambda *a: _checked(linear.gated_linear_attention_step)(*a, normalize=normalize),
      q[:, 0], k[:, 0], v[:, 0], state)
  chex.assert_shape((o, new), ((B, N, HV), state.shape))
  out = jax.eval_shape(
      lambda *a: _checked(linear.gated_linear_attention_cached)(*a, q_offset=0, normalize=normalize),
      q[:, :2], k, v)
  chex.assert_shape(out, (B, 2, N, HV))
  with pytest.raises(jaxtyping.TypeCheckError):   # a state of the wrong head count
    jax.eval_shape(lambda *a: gla(*a, initial_state=state[:, :1]), q, k, v)
