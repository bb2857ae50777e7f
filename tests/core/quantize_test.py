"""The low-precision formats of `attnjax.core.quantize` against numpy rewrites on the formats' grids
(E2M1 and E4M3 rounding to nearest, ties to even; NVFP4 microscaling; the kernel's int8), the groups
their statistics run over, SageAttention3's two-level P scaling (its claim: more accurate than one
level), and the blocked attention loop against exact softmax attention."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import contract
from attnjax.core import quantize
from tests import inputs
from tests import numpy_math
from tests import tolerances
from tests.ops import quantized as np_ref

F32 = tolerances.output(jnp.float32)
EXACT = tolerances.EXACT_VALUES[jnp.float32]


def _log_uniform(shape, lo, hi, seed):
  rng = np.random.default_rng(seed)
  mag = np.exp(rng.uniform(np.log(lo), np.log(hi), shape))
  return (mag * rng.choice([-1.0, 1.0], shape)).astype(np.float32)


def test_e2m1_rounds_to_nearest_even_on_its_grid_and_saturates():
  ties = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.25, -2.5, -5.0], np.float32)
  x = np.concatenate([ties, _log_uniform((500,), 0.01, 12.0, 0), [0.0, 7.0, -100.0]])
  got = np.asarray(quantize.to_e2m1(jnp.asarray(x)))
  np.testing.assert_array_equal(got, np_ref.e2m1(x))
  assert set(np.abs(got)) <= {0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0}
  np.testing.assert_array_equal(got[:7], [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0])   # halves to even


def test_e4m3_rounds_to_nearest_even_with_subnormals_and_saturates():
  x = np.concatenate([_log_uniform((2000,), 2.0 ** -12, 600.0, 1),
                      [2.0 ** -10, 1.5 * 2.0 ** -9, 464.0, 470.0, 1e6, 0.0]]).astype(np.float32)
  got = np.asarray(quantize.to_e4m3(jnp.asarray(x)))
  np.testing.assert_array_equal(got, np_ref.e4m3(x))
  np.testing.assert_array_equal(got[-6:], [0.0, 2.0 ** -8, 448.0, 448.0, 448.0, 0.0])


def test_nvfp4_blocks_of_16_with_e4m3_scales_match_numpy():
  # 40 channels: two full blocks and a short one; one block of zeros; magnitudes over 2^-8..2^6.
  x = _log_uniform((3, 5, 40), 2.0 ** -8, 64.0, 2)
  x[0, 0, :16] = 0.0
  got = np.asarray(quantize.quantize_nvfp4(jnp.asarray(x)))
  np.testing.assert_allclose(got, np_ref.nvfp4(x), **EXACT)
  assert np.all(got[0, 0, :16] == 0.0)


def test_nvfp4_along_tokens_uses_16_token_groups_per_channel():
  x = np.asarray(inputs.qkv(B=2, T=37, N=2, K=2, H=8, seed=3)[1])           # [B, S, K, C]
  got = np.asarray(quantize.quantize_nvfp4_tokens(jnp.asarray(x),
                                                  quantize.block_groups(2, 37, 16)))
  want = np.concatenate([np.moveaxis(np_ref.nvfp4(np.moveaxis(x[:, s:s + 16], 1, -1)), -1, 1)
                         for s in range(0, 37, 16)], axis=1)
  np.testing.assert_allclose(got, want, **EXACT)


@pytest.mark.parametrize("multiplier", [1.0, 0.5 * np.log2(np.e)])
def test_int8_blocks_match_the_kernels_rounding(multiplier):
  x = np.asarray(inputs.qkv(B=2, T=11, N=3, H=8, seed=4)[0])                 # [B, L, heads, C]
  ints, scales = quantize.quantize_int8(jnp.asarray(x), quantize.block_groups(2, 11, 4),
                                        multiplier=multiplier)
  ints, scales = np.asarray(ints), np.asarray(scales)
  for b in range(2):
    for n in range(3):
      want_i, want_s = np_ref.int8_rows(x[b, :, n], 4, multiplier)
      np.testing.assert_array_equal(ints[b, :, n], want_i)
      # XLA may divide by 127 as a product with 1/127: an ulp, which the integers above did not feel.
      np.testing.assert_allclose(scales[b, :, n], want_s, **tolerances.ELEMENTWISE[jnp.float32])
  assert np.abs(ints).max() == 127 and np.all(ints == np.round(ints))
  # Dequantized error at most half a step (the rounding of x·multiplier/s, plus float32 rounding).
  err = np.abs(ints * scales[..., None] - x * np.float32(multiplier))
  assert np.all(err <= scales[..., None] * (0.5 + tolerances.ELEMENTWISE[jnp.float32]["rtol"]))


def test_groups_restart_at_each_packed_document():
  seg = jnp.asarray([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2]])
  np.testing.assert_array_equal(np.asarray(quantize.block_groups(1, 12, 3, seg))[0],
                                [0, 0, 0, 3, 3, 5, 5, 5, 8, 8, 8, 11])
  np.testing.assert_array_equal(np.asarray(quantize.block_groups(1, 5, 2))[0], [0, 0, 2, 2, 4])


def test_smoothing_removes_each_documents_mean_over_real_keys():
  k = np.asarray(inputs.qkv(B=2, T=10, N=2, K=2, H=4, seed=5)[1]) + 3.0
  k[1, 7:] = 1e4                                                     # padding garbage
  seg = np.array([[0] * 4 + [1] * 6, [0] * 10], np.int32)
  lengths = np.array([10, 7], np.int32)
  got = np.asarray(quantize.smooth(jnp.asarray(k), segment_ids=jnp.asarray(seg),
                                   lengths=jnp.asarray(lengths)))
  want = np.zeros_like(k, np.float64)
  for b, parts in ((0, (slice(0, 4), slice(4, 10))), (1, (slice(0, 7),))):
    for part in parts:
      want[b, part] = k[b, part] - k[b, part].astype(np.float64).mean(axis=0)
  np.testing.assert_allclose(got, want, **F32)


def test_two_level_p_scaling_is_more_accurate_than_one_level():
  # Peaked rows of softmax numerators e^{s - max} over a tile of 128 keys (scores of spread 6, as
  # trained attention concentrates): SageAttention3 scales each row into [0, 448·6] before the
  # per-block FP8 scales; one level leaves the scales of small blocks in E4M3's subnormals or below.
  # The paper's claim: the two-level error is smaller (here the weight mass misplaced, Σ|p̂ - p| / Σp).
  s = 6.0 * np.asarray(jax.random.normal(jax.random.PRNGKey(6), (32, 128)))
  p = np.exp(s - s.max(-1, keepdims=True)).astype(np.float32)
  two = np.asarray(quantize.quantize_p_nvfp4(jnp.asarray(p)))
  one = np.asarray(quantize.quantize_nvfp4(jnp.asarray(p)))
  want = np.stack([np_ref.p_two_level_fp4(row) for row in p.astype(np.float64)])
  np.testing.assert_allclose(two, want, **EXACT)
  misplaced = lambda x: np.abs(x - p).sum() / p.sum()
  assert misplaced(two) * tolerances.TWO_LEVEL_GAIN_MIN < misplaced(one)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("packed", [False, True])
def test_blocked_loop_without_quantization_is_softmax_attention(implementation, packed):
  """Unquantized operands and an identity P̃ quantizer: the tiled online softmax (tiles of 4 keys
  from each document's start, running maxima, kv_lengths, causal) is exact softmax attention."""
  B, T, N, K, H, h = 2, 12, 4, 2, 8, 6
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=7)
  seg = jnp.asarray([[0] * 5 + [1] * 7, [0] * 3 + [1] * 9]) if packed else None
  lengths = jnp.asarray([12, 10])
  mask_mod = contract.contract_mask(B=B, T=T, S=T, causal=True, segment_ids=seg,
                                    kv_lengths=lengths)
  first = None if seg is None else quantize.first_key_positions(seg, seg)

  def attend(q, k, v):
    ops = quantize.ScoreOperands(
        qa=q.reshape(B, T, K, N // K, H), ka=k, q_mult=jnp.ones((B, T, K, N // K)),
        k_mult=jnp.ones((B, T, K)), qb=None, kb=None, vd=contract.zero_padded(v, lengths),
        score_scale=H ** -0.5, base2=False)
    return quantize.blocked_attention("test", ops, mask_mod=mask_mod, first=first, tile=4,
                                      p_quant=lambda p: p, implementation=implementation)

  out, lse = jax.jit(attend)(q, k, v)
  keep = numpy_math.visible(B, T, T, causal=True, kv_lengths=np.asarray(lengths),
                            segments=None if seg is None else np.asarray(seg))
  s = np.einsum("btnh,bsnh->bnts", np.asarray(q, np.float64),
                np.repeat(np.asarray(k, np.float64), N // K, axis=2)) * H ** -0.5
  w = numpy_math.softmax(s, where=keep)
  want = np.einsum("bnts,bsnh->btnh", w, np.repeat(np.asarray(v, np.float64), N // K, axis=2))
  np.testing.assert_allclose(np.asarray(out), want, **F32)
  want_lse = np.log(np.sum(np.where(keep, np.exp(s), 0.0), axis=-1)).transpose(0, 2, 1)
  np.testing.assert_allclose(np.asarray(lse), want_lse, **F32)
