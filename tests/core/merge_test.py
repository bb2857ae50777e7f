"""merge_attention_states: attention over disjoint key sets combines exactly into attention over
their union (the reduction behind split-K decoding; Lean Attention, arXiv:2405.10480)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import flex
from attnjax.core import masks
from attnjax.core.merge import merge_attention_states
from tests import tolerances

_merge = jax.jit(merge_attention_states)
B, T, S, N, K, H, h = 2, 6, 19, 4, 2, 8, 5


def _normal(rng, shape):
  return jnp.asarray(rng.standard_normal(shape, np.float32))


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  return _normal(rng, (B, T, N, H)), _normal(rng, (B, S, K, H)), _normal(rng, (B, S, K, h))


@jax.jit
def _attend(q, k, v, keep):
  """(out, lse) of attention restricted to the keys where `keep [B, N, T, S]` is True."""
  return flex.flex_attention(q, k, v, mask_mod=masks.from_array(keep), return_residuals=True,
                             implementation="reference")


@pytest.mark.parametrize("num_parts,seed", [(2, 0), (3, 1), (5, 2)])
def test_merge_over_random_partition_equals_full_attention(num_parts, seed):
  q, k, v = _inputs(seed)
  # Causal with offset -2: the first two query rows see no key at all (zeros, lse = -inf).
  base = masks.evaluate_mask(masks.causal(offset=-2 + S - T), B, N, T, S)
  base = base.at[:, :, :2].set(False)
  part = jnp.asarray(np.random.default_rng(100 + seed).integers(0, num_parts, S))
  # Part `num_parts` receives no key: an empty part, which must be ignored.
  states = [_attend(q, k, v, base & (part == i)[None, None, None, :]) for i in range(num_parts + 1)]
  assert np.isneginf(np.asarray(states[-1][1])).all()
  outs, lses = zip(*states, strict=True)
  out, lse = _merge(list(outs), list(lses))
  want_out, want_lse = _attend(q, k, v, base)
  chex.assert_trees_all_close(out, want_out, **tolerances.output(jnp.float32))
  chex.assert_trees_all_close(lse, want_lse, **tolerances.output(jnp.float32))
  assert np.isneginf(np.asarray(lse[:, :2])).all()
  chex.assert_trees_all_equal(out[:, :2], jnp.zeros_like(out[:, :2]))
  # The stacked form is the same computation.
  stacked = _merge(jnp.stack(outs), jnp.stack(lses))
  chex.assert_trees_all_close(stacked, (out, lse), **tolerances.output(jnp.float32))


def test_empty_parts_are_ignored_whatever_their_outputs():
  q, k, v = _inputs()
  out, lse = _attend(q, k, v, jnp.ones((B, N, T, S), bool))
  junk = jnp.full_like(out, 123.0)
  empty = jnp.full_like(lse, -jnp.inf)
  merged = _merge([junk, out, junk], [empty, lse, empty])
  chex.assert_trees_all_close(merged, (out, lse), **tolerances.output(jnp.float32))


def test_all_empty_gives_zeros_lse_neg_inf_and_finite_gradients():
  outs = jnp.ones((3, B, T, N, h))
  lses = jnp.full((3, B, T, N), -jnp.inf)
  out, lse = _merge(outs, lses)
  chex.assert_trees_all_equal(out, jnp.zeros((B, T, N, h)))
  assert np.isneginf(np.asarray(lse)).all()
  grads = jax.jit(jax.grad(lambda o, l: jnp.sum(merge_attention_states(o, l)[0]),
                           argnums=(0, 1)))(outs, lses)
  chex.assert_tree_all_finite(grads)


def test_dtypes_out_follows_outs_lse_is_float32():
  rng = np.random.default_rng(0)
  outs = _normal(rng, (2, B, T, N, h)).astype(jnp.bfloat16)
  lses = _normal(rng, (2, B, T, N)).astype(jnp.bfloat16)
  out, lse = _merge(outs, lses)
  assert out.dtype == jnp.bfloat16 and lse.dtype == jnp.float32
  chex.assert_shape(out, (B, T, N, h))
  chex.assert_shape(lse, (B, T, N))


def test_single_part_is_the_identity():
  q, k, v = _inputs()
  out, lse = _attend(q, k, v, jnp.ones((B, N, T, S), bool))
  chex.assert_trees_all_close(_merge([out], [lse]), (out, lse),
                              **tolerances.output(jnp.float32))


@pytest.mark.parametrize("outs_shape,lses_shape", [
    ((2, B, T, N, h), (2, B, T)),          # lse missing the head axis
    ((2, B, T, N, h), (3, B, T, N)),       # different number of parts
    ((2, B, T, N, h), (2, B, T, N + 1)),   # heads differ
    ((2, B, T, N, h), (2, B, T, N, h)),    # lse with a value axis
])
def test_bad_shapes_raise(outs_shape, lses_shape):
  with pytest.raises(ValueError, match="merge_attention_states"):
    merge_attention_states(jnp.zeros(outs_shape), jnp.zeros(lses_shape))


def test_parts_of_different_shapes_raise():
  with pytest.raises(ValueError):
    merge_attention_states([jnp.zeros((B, T, N, h)), jnp.zeros((B, T + 1, N, h))],
                           [jnp.zeros((B, T, N)), jnp.zeros((B, T + 1, N))])
