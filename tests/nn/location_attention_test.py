"""GMMAttention and DynamicConvolutionAttention layers (Battenberg et al., arXiv:1910.10288): the
decoder-step layers over location.py.

Checked: shapes and parameters; one call over T decoder steps equals T calls of one step carrying
the state (how an autoregressive decoder uses them); GMM's output biases start the mean steps at
softplus(1) and the widths at softplus(10) with uniform mixture weights (GMMv2b), so an untrained
layer's first step puts its means at softplus(1) for a query of zeros; DCA's alignments are
distributions over the unpadded memory and its filter widths must be odd.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.nn import DynamicConvolutionAttention, GMMAttention
from tests import tolerances

B, T, S, DQ, h = 2, 5, 13, 6, 4
TOL = tolerances.output(jnp.float32)


def _normal(seed, shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


@pytest.mark.parametrize("layer", [GMMAttention(num_mixtures=3),
                                   DynamicConvolutionAttention(attention_dim=8, static_filters=2,
                                                               static_width=5, dynamic_filters=3,
                                                               dynamic_width=3)])
def test_steps_with_carried_state_equal_one_call(layer):
  queries, memory = _normal(0, (B, T, DQ)), _normal(1, (B, S, h))
  kv_lengths = jnp.array([S, 9])
  variables = jax.jit(layer.init)(jax.random.PRNGKey(2), queries, memory)

  @jax.jit
  def run(variables):
    full = layer.apply(variables, queries, memory, kv_lengths=kv_lengths)
    state, contexts, alignments = None, [], []
    for t in range(T):
      context, alignment, state = layer.apply(variables, queries[:, t:t + 1], memory,
                                              kv_lengths=kv_lengths, state=state)
      contexts.append(context)
      alignments.append(alignment)
    return full, (jnp.concatenate(contexts, 1), jnp.concatenate(alignments, 1), state)

  full, stepped = run(variables)
  chex.assert_shape(full[0], (B, T, h))
  chex.assert_shape(full[1], (B, T, S))
  chex.assert_trees_all_close(stepped, full, **TOL)
  assert np.all(np.asarray(full[1]) >= 0)
  chex.assert_trees_all_equal(full[1][1, :, 9:], jnp.zeros((T, S - 9)))
  if isinstance(layer, DynamicConvolutionAttention):
    np.testing.assert_allclose(jnp.sum(full[1], -1), np.ones((B, T)),
                               **tolerances.FEATURE_SUM[jnp.float32])


def test_gmm_initial_biases_start_the_alignment_moving():
  layer = GMMAttention(num_mixtures=4)
  queries, memory = jnp.zeros((B, 1, DQ)), _normal(1, (B, S, h))
  variables = jax.jit(layer.init)(jax.random.PRNGKey(0), queries, memory)
  bias = variables["params"]["mixture"]["bias"]
  np.testing.assert_array_equal(bias, np.r_[np.zeros(4), np.ones(4), np.full(4, 10.0)])
  _, _, means = jax.jit(layer.apply)(variables, queries, memory)
  np.testing.assert_allclose(means, np.full((B, 4), np.log1p(np.e)),
                             **tolerances.ELEMENTWISE[jnp.float32])


def test_dca_parameters_and_bad_widths():
  layer = DynamicConvolutionAttention()
  queries, memory = _normal(0, (B, 1, DQ)), _normal(1, (B, S, h))
  params = jax.eval_shape(layer.init, jax.random.PRNGKey(0), queries, memory)["params"]
  chex.assert_shape(params["static_filters"], (8, 21))
  chex.assert_shape(params["dynamic_filter_proj"]["kernel"], (128, 8 * 21))
  chex.assert_shape(params["v"], (128,))
  with pytest.raises(ValueError, match="odd"):
    jax.eval_shape(DynamicConvolutionAttention(static_width=4).init, jax.random.PRNGKey(0),
                   queries, memory)
  with pytest.raises(ValueError, match="same B"):
    jax.eval_shape(GMMAttention().init, jax.random.PRNGKey(0), queries, memory[:1])
