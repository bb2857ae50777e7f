"""FoPE (fope.py): RoPE with a Fourier series per rotated pair and the untrainable low frequencies
clipped to zero.

Checked: against a float64 rewrite of the paper's per-pair series (explicit sums, GQA head mapping,
partial rotary, clipping); identity coefficients without clipping are RoPE; clipped pairs are never
rotated, so they carry no position, and the kept count is the number of frequencies ≥ 2π/L; the
relative-position property holds exactly without the extra frequencies, and with them is broken
only to first order in σ (the deviation doubles when σ doubles), as the module docstring says.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.positional import fope, rope
from tests import tolerances

B, T, N, K, H = 2, 13, 4, 2, 16
TOL = tolerances.output(jnp.float32)


def _x(shape=(B, T, N, H), seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _reference(x, positions, cos_coef, sin_coef, base, d, train_length):
  """FoPE in float64, pair by pair: C_m(p) = Σ_k A[k, m] cos(ω_k p), S_m likewise with sines,
  over the kept frequencies ω_k ≥ 2π / L; clipped pairs unchanged."""
  x = np.asarray(x, np.float64)
  out = x.copy()
  positions = np.broadcast_to(np.asarray(positions, np.float64), x.shape[:2])
  omega = base ** (-2.0 * np.arange(d // 2) / d)
  kept = [k for k in range(d // 2) if omega[k] >= 2 * math.pi / train_length]
  heads = x.shape[2]
  a, s = np.asarray(cos_coef, np.float64), np.asarray(sin_coef, np.float64)
  for n in range(heads):
    c = n // (heads // a.shape[0])       # the coefficient head of query/key head n
    for m in kept:
      cos_series = sum(a[c, k, m] * np.cos(omega[k] * positions) for k in kept)
      sin_series = sum(s[c, k, m] * np.sin(omega[k] * positions) for k in kept)
      x1, x2 = x[:, :, n, m], x[:, :, n, m + d // 2]
      out[:, :, n, m] = x1 * cos_series - x2 * sin_series
      out[:, :, n, m + d // 2] = x2 * cos_series + x1 * sin_series
  return out, len(kept)


@pytest.mark.parametrize("heads,fraction,train_length,base", [
    (K, 1.0, 64, 10000.0), (1, 1.0, 200, 100.0), (N, 0.5, 30, 10000.0), (K, 1.0, None, 10000.0)])
def test_matches_float64_rewrite(heads, fraction, train_length, base):
  d = rope.rotary_dim(H, fraction)
  kept = fope.fope_kept_pairs(d, base=base, train_length=train_length)
  cos_coef, sin_coef = fope.fope_coefficients(jax.random.PRNGKey(3), heads=heads, kept=kept,
                                              sigma=0.5)
  x = _x()
  pos = jnp.array([np.arange(T), np.arange(T) * 3 + 11])
  out = fope.apply_fope(x, pos, cos_coef=cos_coef, sin_coef=sin_coef, base=base,
                        train_length=train_length, fraction=fraction)
  want, want_kept = _reference(x, pos, cos_coef, sin_coef, base, d, train_length or 10 ** 9)
  assert kept == want_kept
  chex.assert_trees_all_close(out, want.astype(np.float32), **TOL)


def test_identity_coefficients_without_clipping_are_rope():
  x, pos = _x(), jnp.arange(T) + 5
  eye = jnp.eye(H // 2)
  for coef in (eye, jnp.stack([eye, eye])):
    out = fope.apply_fope(x, pos, cos_coef=coef, sin_coef=coef)
    chex.assert_trees_all_close(out, rope.apply_rope(x, pos), **TOL)
  # sigma = 0 draws the identity.
  cos_coef, sin_coef = fope.fope_coefficients(jax.random.PRNGKey(0), heads=K, kept=H // 2, sigma=0.0)
  chex.assert_trees_all_equal(cos_coef, jnp.broadcast_to(eye, (K, H // 2, H // 2)))
  chex.assert_trees_all_equal(sin_coef, cos_coef)


def test_clipped_pairs_are_never_rotated_and_carry_no_position():
  base, length = 10000.0, 48
  kept = fope.fope_kept_pairs(H, base=base, train_length=length)
  omega = base ** (-2.0 * np.arange(H // 2) / H)
  assert kept == int(np.sum(omega >= 2 * math.pi / length)) and 0 < kept < H // 2
  cos_coef, sin_coef = fope.fope_coefficients(jax.random.PRNGKey(1), heads=K, kept=kept, sigma=0.4)
  x = _x()
  clipped = np.r_[kept:H // 2, H // 2 + kept:H]
  for pos in (jnp.arange(T), jnp.arange(T) * 1000 + 7):   # far beyond the training length
    out = fope.apply_fope(x, pos, cos_coef=cos_coef, sin_coef=sin_coef, base=base,
                          train_length=length)
    chex.assert_trees_all_equal(out[..., clipped], x[..., clipped])
    assert not np.allclose(out[..., :kept], x[..., :kept])


def _logit_spread(sigma, offset=3, starts=(0, 7, 40, 91)):
  """max - min over start positions of the FoPE logit q·k at (start, start + offset), for
  coefficients I + σE with one fixed draw E."""
  kept = fope.fope_kept_pairs(H, train_length=64)
  cos_coef, sin_coef = fope.fope_coefficients(jax.random.PRNGKey(5), heads=1, kept=kept,
                                              sigma=sigma)
  q, k = _x((1, 1, 1, H), seed=6), _x((1, 1, 1, H), seed=7)
  apply = lambda x, p: fope.apply_fope(x, jnp.array([p]), cos_coef=cos_coef, sin_coef=sin_coef,
                                       train_length=64)
  logits = np.array([float(jnp.sum(apply(q, m) * apply(k, m + offset))) for m in starts])
  return logits.max() - logits.min(), logits


def test_relative_property_exact_without_extra_frequencies():
  spread, logits = _logit_spread(0.0)
  assert spread <= TOL["atol"] + TOL["rtol"] * np.abs(logits).max()


def test_extra_frequencies_break_the_relative_property_to_first_order_in_sigma():
  small, _ = _logit_spread(0.005)
  double, _ = _logit_spread(0.01)
  assert small > tolerances.CHANGED_MAX_ABS          # broken: the logit moves with the start
  np.testing.assert_allclose(double / small, 2.0, **tolerances.FIRST_ORDER_RATIO)


@pytest.mark.parametrize("settings,match", [
    ({"train_length": 6}, "clips every"),
    ({"sigma": -1.0}, "sigma"),
    ({"train_length": 64.0}, "train_length"),
    ({"lenght": 64}, "unknown keys"),
    ({"separate_heads": 1}, "separate_heads"),
])
def test_bad_settings_raise(settings, match):
  with pytest.raises(ValueError, match=match):
    checked = fope.check_fope(settings)
    fope.fope_kept_pairs(H, train_length=checked["train_length"])


def test_bad_coefficients_raise():
  eye = jnp.eye(H // 2)
  with pytest.raises(ValueError, match="kept pairs"):
    fope.apply_fope(_x(), jnp.arange(T), cos_coef=eye, sin_coef=eye, train_length=64)
  with pytest.raises(ValueError, match="dividing N"):
    fope.apply_fope(_x(), jnp.arange(T), cos_coef=jnp.stack([eye] * 3),
                    sin_coef=jnp.stack([eye] * 3))
