"""YOLOv12 area attention (#232): softmax attention inside l equal areas cut by reshaping the map.

The defining property is the reference code's reshape: `x.reshape(B·l, L/l, C)` over the row-major
flattened map, attention per area, reshape back. Checked against a float64 numpy rewrite that does
exactly that reshape (and, for a vertical split, first transposes the map), for both
implementations and their gradients; then that l = 1 is full attention, that an area ignores every
token outside it, and the extension to lengths l does not divide (areas ⌊i·l/L⌋).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.local import area_attention
from tests import inputs
from tests import numpy_math
from tests import tolerances


def _attend64(q, k, v, scale):
  """Plain softmax attention `[B, L, N, H]` in float64 (GQA by repeating k, v)."""
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  w = numpy_math.softmax(np.einsum("btnh,bsnh->bnts", q, k) * scale)
  return np.einsum("bnts,bsnh->btnh", w, v)


def _area_reshape64(q, k, v, *, num_areas, spatial_shape=None, axis=0):
  """The reference code's computation: (transpose the map so `axis` is slowest,) reshape into
  `num_areas` contiguous areas, attend inside each, undo."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  B, L = q.shape[:2]
  shape = tuple(spatial_shape or (L,))
  order = (axis,) + tuple(d for d in range(len(shape)) if d != axis)
  perm = np.arange(L).reshape(shape).transpose(order).reshape(-1)   # token at each new position
  xs = [x[:, perm] for x in (q, k, v)]
  xs = [x.reshape((B * num_areas, L // num_areas) + x.shape[2:]) for x in xs]
  out = _attend64(*xs, scale=q.shape[-1] ** -0.5).reshape((B, L) + (q.shape[2], v.shape[-1]))
  restored = np.empty_like(out)
  restored[:, perm] = out
  return restored


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("spatial_shape,axis", [(None, 0), ((4, 6), 0), ((4, 6), 1)])
def test_equals_the_reference_codes_reshape(implementation, spatial_shape, axis):
  q, k, v = inputs.qkv(B=2, T=24, N=4, K=2, H=8, h=6, seed=1)
  fn = inputs.jit_with(area_attention, num_areas=4, spatial_shape=spatial_shape, axis=axis,
                       implementation=implementation)
  want = _area_reshape64(q, k, v, num_areas=4, spatial_shape=spatial_shape, axis=axis)
  np.testing.assert_allclose(np.asarray(fn(q, k, v)), want, **tolerances.output(jnp.float32))


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_gradients_match_the_reshaped_dense_form(implementation):
  q, k, v = inputs.qkv(B=1, T=12, N=2, K=1, H=4, h=3, seed=3)
  dout = jax.random.normal(jax.random.PRNGKey(4), (1, 12, 2, 3))

  def dense(q, k, v):
    split = lambda x: jnp.repeat(x.reshape((3, 4) + x.shape[2:]), 2 // x.shape[2], axis=2)
    w = jax.nn.softmax(jnp.einsum("atnh,asnh->ants", split(q), split(k)) / 2.0, axis=-1)
    return jnp.einsum("ants,asnh->atnh", w, split(v)).reshape(1, 12, 2, 3)

  op = lambda *a: area_attention(*a, num_areas=3, implementation=implementation)
  inputs.assert_same_gradients(op, dense, (q, k, v), dout, ("dq", "dk", "dv"),
                               tol=tolerances.grad(jnp.float32))


def test_one_area_is_full_attention():
  q, k, v = inputs.qkv(B=2, T=13, N=4, K=2, H=8, h=6, seed=5)
  out = area_attention(q, k, v, num_areas=1)
  want = _attend64(*(np.asarray(x, np.float64) for x in (q, k, v)), scale=8 ** -0.5)
  np.testing.assert_allclose(np.asarray(out), want, **tolerances.output(jnp.float32))


def test_an_area_ignores_tokens_outside_it_and_sees_those_inside():
  # (4, 6) map, vertical strips of 3 columns: rewrite the keys and values of the right strip.
  q, k, v = inputs.qkv(B=1, T=24, N=2, K=2, H=8, h=6, seed=6)
  fn = inputs.jit_with(area_attention, num_areas=2, spatial_shape=(4, 6), axis=1)
  right = (np.arange(24) % 6) >= 3
  noise = 5.0 * jax.random.normal(jax.random.PRNGKey(7), k.shape)
  k2 = jnp.where(right[None, :, None, None], noise, k)
  v2 = jnp.where(right[None, :, None, None], noise[..., :6], v)
  base, moved = np.asarray(fn(q, k, v)), np.asarray(fn(q, k2, v2))
  np.testing.assert_allclose(moved[:, ~right], base[:, ~right], **tolerances.output(jnp.float32))
  assert tolerances.rel_rms(moved[:, right], base[:, right]) > tolerances.STRONG_CHANGE_REL_RMS


def test_lengths_the_areas_do_not_divide_split_at_floor_i_l_over_L():
  T, areas = 19, 4
  q, k, v = inputs.qkv(B=2, T=T, N=4, K=2, H=8, h=6, seed=8)
  kv_lengths = jnp.array([19, 17])
  out = area_attention(q, k, v, num_areas=areas, kv_lengths=kv_lengths)
  a = np.arange(T) * areas // T
  assert sorted(np.bincount(a).tolist()) == [4, 5, 5, 5]      # nearly equal areas
  q64 = np.asarray(q, np.float64)
  k64, v64 = (np.repeat(np.asarray(x, np.float64), 2, axis=2) for x in (k, v))
  where = (a[:, None] == a[None, :])[None, None] & numpy_math.visible(
      2, T, T, kv_lengths=np.asarray(kv_lengths))
  w = numpy_math.softmax(np.einsum("btnh,bsnh->bnts", q64, k64) * 8 ** -0.5, where=where)
  want = np.einsum("bnts,bsnh->btnh", w, v64)
  np.testing.assert_allclose(np.asarray(out), want, **tolerances.output(jnp.float32))


def test_bad_settings_name_the_operator_and_argument():
  q, k, v = inputs.qkv(B=1, T=12, N=2, K=2, H=4, h=4)
  with pytest.raises(ValueError, match="area_attention: `num_areas`"):
    area_attention(q, k, v, num_areas=0)
  with pytest.raises(ValueError, match="area_attention: `axis`"):
    area_attention(q, k, v, spatial_shape=(3, 4), axis=2)
  with pytest.raises(ValueError, match="area_attention: `spatial_shape`"):
    area_attention(q, k, v, spatial_shape=(5, 4))
  with pytest.raises(ValueError, match="area_attention: causal"):
    area_attention(q, k, v, causal=True)
