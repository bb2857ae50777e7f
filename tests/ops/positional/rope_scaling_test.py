"""RoPE context extension (rope_scaling.py): each method's defining property.

Position interpolation rotates position p as plain RoPE rotates p / s; NTK-aware scaling keeps the
highest frequency and divides the lowest by s; dynamic NTK leaves RoPE alone up to the training
length and follows Hugging Face's base formula past it, per sequence; YaRN's frequencies match a
float64 rewrite of the paper's NTK-by-parts (eqs. 17-23 as Hugging Face's
`_compute_yarn_parameters`), and its attention factor multiplies every logit by (0.1 ln s + 1)²
(the temperature 1/t). A factor of 1 gives plain RoPE, and the relative-position property survives.
"""

import math

import beartype
import chex
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

from attnjax.ops.positional import rope, rope_scaling
from tests import tolerances

B, T, N, H = 2, 11, 3, 16
TOL = tolerances.output(jnp.float32)


def _x(shape=(B, T, N, H), seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _yarn(factor, length, **extra):
  return {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": length,
          **extra}


def _yarn_reference(dim, base, factor, length, beta_fast=32.0, beta_slow=1.0, truncate=True):
  """YaRN's frequencies in float64, written from the paper's equations: r(d) = L / λ_d rotations,
  ramp between the dims whose r equals β_fast and β_slow, interpolate θ/s below the ramp."""
  i = np.arange(dim // 2, dtype=np.float64)
  theta = base ** (-2.0 * i / dim)

  def dim_of(rotations):  # the (fractional) pair index whose wavelength fits `rotations` times in L
    return dim * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(base))

  lo, hi = dim_of(beta_fast), dim_of(beta_slow)
  if truncate:
    lo, hi = math.floor(lo), math.ceil(hi)
  lo, hi = max(lo, 0), min(hi, dim - 1)
  if lo == hi:
    hi += 0.001
  keep = 1.0 - np.clip((i - lo) / (hi - lo), 0.0, 1.0)
  return theta / factor * (1.0 - keep) + theta * keep


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 1.0}, {"rope_type": "ntk", "factor": 1.0},
    _yarn(1.0, 16), {"rope_type": "dynamic", "factor": 3.0, "original_max_position_embeddings": 32},
    {"rope_type": "default"}])
def test_factor_one_is_plain_rope(scaling):
  """(Dynamic: a sequence within the training length.)"""
  x, pos = _x(), jnp.arange(T)
  chex.assert_trees_all_close(rope.apply_rope(x, pos, scaling=scaling), rope.apply_rope(x, pos),
                              **TOL)


def test_linear_interpolation_rotates_position_p_as_p_over_factor():
  x = _x()
  pos = jnp.array([np.arange(T) * 5 + 3, np.arange(T) * 2])
  for factor in (2.0, 4.0, 3.5):
    out = rope.apply_rope(x, pos, scaling={"rope_type": "linear", "factor": factor})
    chex.assert_trees_all_close(out, rope.apply_rope(x, pos / factor), **TOL)


def test_ntk_keeps_the_highest_frequency_and_divides_the_lowest_by_the_factor():
  d, base, factor = 16, 10000.0, 8.0
  theta = rope.rope_frequencies(d, base=base)
  ntk = rope.rope_frequencies(d, base=base, scaling={"rope_type": "ntk", "factor": factor})
  want = (base * factor ** (d / (d - 2))) ** (-np.arange(0, d, 2) / d)
  np.testing.assert_allclose(ntk, want, **tolerances.ELEMENTWISE[jnp.float32])
  np.testing.assert_allclose(ntk[0], theta[0], **tolerances.ELEMENTWISE[jnp.float32])
  np.testing.assert_allclose(ntk[-1], theta[-1] / factor, **tolerances.ELEMENTWISE[jnp.float32])
  assert np.all(np.diff(np.asarray(ntk / theta)) < 0)  # lower frequencies are stretched more


@pytest.mark.parametrize("dim,base,factor,length,extra", [
    (16, 10000.0, 4.0, 64, {}), (32, 10000.0, 8.0, 512, {}), (24, 500.0, 2.5, 48, {}),
    (32, 10000.0, 16.0, 2048, {"beta_fast": 16.0, "beta_slow": 2.0}),
    (32, 10000.0, 4.0, 512, {"truncate": False})])
def test_yarn_frequencies_match_float64_rewrite(dim, base, factor, length, extra):
  theta, m = rope.rope_parameters(dim, base=base, scaling=_yarn(factor, length, **extra))
  want = _yarn_reference(dim, base, factor, length, **extra)
  np.testing.assert_allclose(theta, want, **tolerances.ELEMENTWISE[jnp.float32])
  assert m == pytest.approx(0.1 * math.log(factor) + 1)
  # The ramp is not vacuous here: some pairs keep θ, some are interpolated to θ / s.
  base_theta = base ** (-np.arange(0, dim, 2) / dim)
  assert np.isclose(want[0], base_theta[0]) and np.isclose(want[-1], base_theta[-1] / factor)


@pytest.mark.parametrize("factor", [2.0, 8.0, 40.0])
def test_yarn_attention_factor_multiplies_logits_by_the_temperature(factor):
  """q·k with YaRN = (0.1 ln s + 1)² × q·k with the same frequencies and no factor."""
  q, k = _x((1, T, 1, H), seed=1), _x((1, T, 1, H), seed=2)
  pos = jnp.arange(T) * 7
  with_m = _yarn(factor, 32)
  without_m = _yarn(factor, 32, attention_factor=1.0)
  logits = lambda s: jnp.einsum("tnh,snh->ts", rope.apply_rope(q, pos, scaling=s)[0],
                                rope.apply_rope(k, pos, scaling=s)[0])
  temperature = (0.1 * math.log(factor) + 1.0) ** 2
  chex.assert_trees_all_close(logits(with_m), temperature * logits(without_m), **TOL)
  # DeepSeek's form: m(s, mscale) / m(s, mscale_all_dim).
  deepseek = _yarn(factor, 32, mscale=1.0, mscale_all_dim=0.5)
  ratio = (0.1 * math.log(factor) + 1.0) / (0.05 * math.log(factor) + 1.0)
  chex.assert_trees_all_close(logits(deepseek), ratio ** 2 * logits(without_m), **TOL)


def test_yarn_keeps_the_relative_position_property():
  q, k = _x((1, 1, 1, H), seed=3), _x((1, 1, 1, H), seed=4)
  scaling = _yarn(4.0, 32)

  def logit(m, n):
    return jnp.sum(rope.apply_rope(q, jnp.array([m]), scaling=scaling) *
                   rope.apply_rope(k, jnp.array([n]), scaling=scaling))

  for delta in (0, 3, -5):
    logits = jnp.stack([logit(m, m + delta) for m in (0, 9, 50)])
    chex.assert_trees_all_close(logits, jnp.full_like(logits, logits[0]), **TOL)


def test_dynamic_ntk_follows_the_current_length_per_sequence():
  d, base, factor, length = 16, 10000.0, 2.0, 8
  scaling = {"rope_type": "dynamic", "factor": factor, "original_max_position_embeddings": length}
  theta = rope.rope_frequencies(d, base=base, scaling=scaling, seq_len=jnp.array([5, 8, 20]))
  i = np.arange(0, d, 2) / d
  plain = base ** -i
  grown = (base * (factor * 20 / length - (factor - 1)) ** (d / (d - 2))) ** -i
  np.testing.assert_allclose(theta, np.stack([plain, plain, grown]),
                             **tolerances.ELEMENTWISE[jnp.float32])
  # In apply_rope each sequence's length is its own largest position + 1: a long row does not
  # change a short row of the same batch.
  x = _x((2, T, N, H))
  pos = jnp.array([np.arange(T), np.arange(T) + 30])
  both = rope.apply_rope(x, pos, scaling=scaling)
  alone = rope.apply_rope(x[:1], pos[:1], scaling=scaling)
  chex.assert_trees_all_close(both[:1], alone, **TOL)
  chex.assert_trees_all_close(both[1:], rope.apply_rope(x[1:], pos[1:], scaling=scaling,
                                                        seq_len=jnp.array([T + 30])), **TOL)
  assert not np.allclose(both[1:], rope.apply_rope(x[1:], pos[1:]))


def test_partial_rotary_scales_only_the_rotated_dims():
  x = _x()
  out = rope.apply_rope(x, jnp.arange(T), fraction=0.5, scaling=_yarn(4.0, 32))
  chex.assert_trees_all_equal(out[..., H // 2:], x[..., H // 2:])


@pytest.mark.parametrize("scaling,match", [
    ({"rope_type": "cubic", "factor": 2.0}, "rope_type"),
    ({"factor": 2.0}, "rope_type"),
    ({"rope_type": "linear"}, "needs the keys"),
    ({"rope_type": "linear", "factor": 0.5}, ">= 1"),
    ({"rope_type": "linear", "factor": 2.0, "beta_fast": 3.0}, "unknown keys"),
    ({"rope_type": "yarn", "factor": 2.0}, "original_max_position_embeddings"),
    (_yarn(2.0, 64, beta_fast=1.0, beta_slow=2.0), "beta_fast"),
    (_yarn(2.0, 64.5), "positive integer"),
    ({"type": "linear", "rope_type": "yarn", "factor": 2.0}, "disagree"),
    ("yarn", "dict"),
])
def test_bad_scaling_raises_naming_the_key(scaling, match):
  with pytest.raises(ValueError, match=match):
    rope.apply_rope(_x(), jnp.arange(T), scaling=scaling)


def test_huggingface_type_alias_is_accepted():
  checked = rope_scaling.check_rope_scaling({"type": "linear", "factor": 2.0})
  assert checked == {"rope_type": "linear", "factor": 2.0}


def test_signatures_hold_under_jaxtyped():
  check = lambda fn: jaxtyping.jaxtyped(fn, typechecker=beartype.beartype)
  dynamic = {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 4}
  assert check(rope.rope_frequencies)(8, scaling=dynamic, seq_len=jnp.array([3, 9])).shape == (2, 4)
  x = _x()
  out = check(rope.apply_rope)(x, jnp.arange(T), scaling=dynamic, seq_len=jnp.array([T, T]))
  assert out.shape == x.shape
