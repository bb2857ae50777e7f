"""The lse residual is differentiable: gradients through (out, lse) of the chunked path equal the
reference's, which is what merging partial attention states (split-K, ring attention) relies on."""

import chex
import jax
import jax.numpy as jnp
import pytest

from attnjax.core import flex
from attnjax.core import masks
from tests import tolerances


@pytest.mark.parametrize("normalizer", ["softmax", "softpick"])
def test_gradients_through_lse_match_reference(normalizer):
  ks = jax.random.split(jax.random.PRNGKey(3), 4)
  q = jax.random.normal(ks[0], (2, 21, 4, 8))
  k = jax.random.normal(ks[1], (2, 27, 2, 8))
  v = jax.random.normal(ks[2], (2, 27, 2, 5))
  weights = jax.random.normal(ks[3], (2, 21, 4))
  mask = masks.and_masks(masks.causal(offset=6), masks.sliding_window(9, 0, offset=6))

  def loss(impl):
    def f(q, k, v):
      out, lse = flex.flex_attention(q, k, v, mask_mod=mask, normalizer=normalizer,
                                     return_residuals=True, implementation=impl)
      return jnp.sum(out ** 2) + jnp.sum(weights * lse)
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)   # one program, not op by op

  chex.assert_trees_all_close(loss("xla"), loss("reference"), **tolerances.grad(jnp.float32))
