"""Rotary position embedding: float64 reference, relative positions, partial rotary, shapes."""

import beartype
import chex
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from attnjax.ops.positional import rope
from tests import tolerances

B, T, N, H = 2, 9, 3, 16


def _x(shape=(B, T, N, H), dtype=jnp.float32, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32).astype(dtype)


def _reference(x, positions, base, d):
  """Half-split RoPE in float64 numpy, pair by pair."""
  x = np.asarray(x, np.float64)
  out = x.copy()
  positions = np.broadcast_to(np.asarray(positions, np.float64), x.shape[:2])
  for i in range(d // 2):
    theta = positions * base ** (-2.0 * i / d)
    c, s = np.cos(theta)[..., None], np.sin(theta)[..., None]
    a, b = x[..., i], x[..., i + d // 2]
    out[..., i] = a * c - b * s
    out[..., i + d // 2] = b * c + a * s
  return out


@pytest.mark.parametrize("fraction,base", [(1.0, 10000.0), (0.5, 10000.0), (0.25, 500.0)])
def test_matches_float64_reference(fraction, base):
  x = _x()
  positions = jnp.array([np.arange(T), np.arange(T) * 3 + 7])
  out = rope.apply_rope(x, positions, base=base, fraction=fraction)
  want = _reference(x, positions, base, rope.rotary_dim(H, fraction))
  chex.assert_trees_all_close(out, want.astype(np.float32), **tolerances.output(jnp.float32))


def test_relative_position_property():
  """⟨rope(q, m), rope(k, n)⟩ depends only on n - m."""
  q, k = _x((1, 1, 1, H), seed=1), _x((1, 1, 1, H), seed=2)

  def logit(m, n):
    return jnp.sum(rope.apply_rope(q, jnp.array([m]))[0, 0, 0] *
                   rope.apply_rope(k, jnp.array([n]))[0, 0, 0])

  for delta in (0, 1, 5, -3):
    logits = jnp.stack([logit(m, m + delta) for m in (0, 4, 17, 40)])
    chex.assert_trees_all_close(logits, jnp.full_like(logits, logits[0]),
                                **tolerances.output(jnp.float32))
  # And different offsets really differ (the property is not vacuous).
  assert abs(float(logit(0, 1)) - float(logit(0, 6))) > tolerances.CHANGED_MAX_ABS


def test_position_zero_is_identity_and_norm_is_kept():
  x = _x()
  chex.assert_trees_all_close(rope.apply_rope(x, jnp.zeros((T,), jnp.int32)), x,
                              **tolerances.output(jnp.float32))
  out = rope.apply_rope(x, jnp.arange(T))
  chex.assert_trees_all_close(jnp.linalg.norm(out, axis=-1), jnp.linalg.norm(x, axis=-1),
                              **tolerances.output(jnp.float32))


def test_partial_rotary_leaves_tail_unchanged():
  x = _x()
  out = rope.apply_rope(x, jnp.arange(T) + 1, fraction=0.25)
  d = rope.rotary_dim(H, 0.25)
  assert d == 4
  chex.assert_trees_all_equal(out[..., d:], x[..., d:])
  assert not np.allclose(out[..., :d], x[..., :d])


def test_positions_1d_equal_broadcast_2d():
  x = _x()
  pos = jnp.arange(T) + 3
  chex.assert_trees_all_close(rope.apply_rope(x, pos),
                              rope.apply_rope(x, jnp.broadcast_to(pos, (B, T))),
                              **tolerances.output(jnp.float32))


def test_dtype_and_explicit_dim():
  x = _x(dtype=jnp.bfloat16)
  out = rope.apply_rope(x, jnp.arange(T), dim=6)
  assert out.dtype == jnp.bfloat16
  chex.assert_shape(out, x.shape)
  chex.assert_trees_all_equal(out[..., 6:], x[..., 6:])


def test_segment_positions_restart_per_segment():
  seg = jnp.array([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
  np.testing.assert_array_equal(rope.segment_positions(seg),
                                [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])


def test_frequencies():
  np.testing.assert_allclose(rope.rope_frequencies(8, base=100.0),
                             [1.0, 100 ** -0.25, 100 ** -0.5, 100 ** -0.75],
                             **tolerances.ELEMENTWISE[jnp.float32])


@pytest.mark.parametrize("call,match", [
    (lambda: rope.apply_rope(_x((B, T, N, 7)), jnp.arange(T)), "even head dim"),
    (lambda: rope.apply_rope(_x(), jnp.arange(T), dim=5), "even"),
    (lambda: rope.apply_rope(_x(), jnp.arange(T), dim=2 * H), "even"),
    (lambda: rope.apply_rope(_x(), jnp.arange(T), fraction=0.0), "fraction"),
    (lambda: rope.apply_rope(_x(), jnp.arange(T), fraction=0.05), "no pair"),
    (lambda: rope.apply_rope(_x(), jnp.arange(T + 1)), "positions"),
    (lambda: rope.apply_rope(_x(), jnp.zeros((B + 1, T))), "positions"),
    (lambda: rope.apply_rope(_x((B, T, H)), jnp.arange(T)), r"\[B, T, N, H\]"),
    (lambda: rope.rope_frequencies(8, base=1.0), "base"),
])
def test_bad_input_raises(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_odd_head_dim_with_partial_rotary_works():
  x = _x((B, T, N, 7))
  out = rope.apply_rope(x, jnp.arange(T), fraction=0.9)   # 6.3 -> 6 rotated dims
  chex.assert_trees_all_equal(out[..., 6:], x[..., 6:])


def test_signature_shapes_hold_under_jaxtyped():
  """The annotations hold ([B, T] or [T] positions, integer or float; `d / 2` frequencies), and
  positions of the wrong length fail the shape check before the body runs."""
  check = lambda fn: jaxtyping.jaxtyped(fn, typechecker=beartype.beartype)
  x = _x()
  assert check(rope.apply_rope)(x, jnp.arange(T)).shape == x.shape
  assert check(rope.apply_rope)(x, jnp.zeros((B, T)) + 0.5).shape == x.shape
  assert check(rope.rope_frequencies)(8).shape == (4,)
  assert check(rope.segment_positions)(jnp.zeros((B, T), jnp.int32)).shape == (B, T)
  with pytest.raises(jaxtyping.TypeCheckError):
    check(rope.apply_rope)(x, jnp.arange(T + 1))
