"""SageAttention (#148): the operator against a float64 rewrite of the paper's algorithm (smoothed
keys, per-block int8 QKᵀ with the kernel's rounding, fp16 or FP8 P̃V over key tiles), the int8 scores
as the integer matmul times the two scales, and the paper's claims: smoothing the keys alone leaves
attention unchanged; int8 attention reaches cosine ≥ 0.999 on N(0, 1) inputs; with outlier key
channels, smoothing recovers the accuracy that no smoothing loses. Also: packed documents quantize as
alone, empty rows give zeros, and the gradients are straight-through (exact attention's)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import quantize
from attnjax.ops.quantized import sage_attention
from attnjax.ops.softmax import softmax_attention
from tests import inputs
from tests import numpy_math
from tests import tolerances
from tests.ops import quantized as np_ref

F32 = tolerances.output(jnp.float32)


def _cosine(a, b):
  a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def _rel_l1(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.abs(a - b).sum() / np.abs(b).sum())


def _softmax_float64(q, k, v, *, keep=None):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) * q.shape[-1] ** -0.5
  return np.einsum("bnts,bsnh->btnh", numpy_math.softmax(s, where=keep), v)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("pv", ["fp16", "fp8"])
@pytest.mark.parametrize("causal", [False, True])
def test_equals_a_float64_rewrite_of_the_papers_algorithm(implementation, pv, causal):
  # Blocks of 4 queries and 8 keys, so several blocks and tiles (running maxima) are exercised; GQA;
  # a padded row; two key channels offset, so smoothing matters.
  q, k, v = inputs.qkv(B=2, T=13, S=21, N=4, K=2, H=8, h=6, seed=1)
  k = k + 3.0 * (jnp.arange(8) < 2)
  lengths = np.array([21, 15], np.int32)
  out = inputs.jit_with(sage_attention, causal=causal, q_block=4, k_block=8, pv=pv,
                        implementation=implementation)(q, k, v, kv_lengths=jnp.asarray(lengths))
  want = np_ref.sage_int8(q, k, v, causal=causal, kv_lengths=lengths, q_block=4, k_block=8, pv=pv)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def test_scores_are_the_integer_product_times_the_two_scales():
  q, k, _ = inputs.qkv(B=1, T=9, N=2, K=1, H=16, seed=2)
  groups_q, groups_k = quantize.block_groups(1, 9, 4), quantize.block_groups(1, 9, 8)
  ops = quantize.int8_score_operands(q, k, jnp.zeros((1, 9, 1, 3)), scale=0.25,
                                     q_groups=groups_q, k_groups=groups_k)
  scores = np.asarray(quantize.scores_at(ops, jnp.arange(9)))[0, 0]        # [G, T, S]
  q_int, q_s = (np.asarray(x) for x in quantize.quantize_int8(q, groups_q,
                                                              multiplier=0.25 * np_ref.LOG2E))
  k_int, k_s = (np.asarray(x) for x in quantize.quantize_int8(k, groups_k))
  for g in range(2):
    product = q_int[0, :, g].astype(np.int32) @ k_int[0, :, 0].astype(np.int32).T   # int32 matmul
    want = product.astype(np.float64) * q_s[0, :, g, None] * k_s[0, None, :, 0]
    np.testing.assert_allclose(scores[g], want, **tolerances.ELEMENTWISE[jnp.float32])


def test_smoothing_the_keys_alone_leaves_attention_unchanged():
  # Keys with a large common offset per channel; softmax attention over the smoothed keys (the
  # operator's smoothing step, float32) equals float64 attention over the original keys.
  q, k, v = inputs.qkv(B=2, T=11, S=17, N=4, K=2, H=8, h=6, seed=3)
  k = k + 5.0 * jnp.sin(jnp.arange(8.0))
  lengths = jnp.asarray([17, 12])
  smoothed = quantize.smooth(k, lengths=lengths)
  assert np.abs(np.asarray(smoothed)).max() < np.abs(np.asarray(k)).max()
  for causal in (False, True):
    out = inputs.jit_with(softmax_attention, causal=causal)(q, smoothed, v, kv_lengths=lengths)
    keep = numpy_math.visible(2, 11, 17, causal=causal, kv_lengths=np.asarray(lengths))
    np.testing.assert_allclose(np.asarray(out), _softmax_float64(q, k, v, keep=keep), **F32)


def test_int8_reaches_cosine_0999_on_gaussian_inputs():
  q, k, v = inputs.qkv(B=1, T=128, N=2, K=2, H=64, h=64, seed=3)
  want = _softmax_float64(q, k, v)
  for causal in (False, True):
    keep = numpy_math.visible(1, 128, 128, causal=True) if causal else None
    out = inputs.jit_with(sage_attention, causal=causal)(q, k, v)
    assert _cosine(out, _softmax_float64(q, k, v, keep=keep) if causal else want) >= (
        tolerances.SAGE_INT8_COSINE_MIN)


def test_smoothing_recovers_the_accuracy_outlier_channels_cost():
  # Four of 64 key channels share an offset of 20 (the channel-wise outliers the paper finds in K):
  # without smoothing, int8's per-block scale is set by the offset and the other channels lose
  # their resolution; with it, the error is that of inputs without outliers.
  q, k, v = inputs.qkv(B=1, T=128, N=2, K=2, H=64, h=64, seed=3)
  k_out = k + 20.0 * (jnp.arange(64) < 4)
  want = _softmax_float64(q, k_out, v)
  smooth = np.asarray(inputs.jit_with(sage_attention)(q, k_out, v))
  raw = np.asarray(inputs.jit_with(sage_attention, smooth_k=False)(q, k_out, v))
  assert _cosine(smooth, want) >= tolerances.SAGE_INT8_COSINE_MIN > _cosine(raw, want)
  assert _rel_l1(raw, want) > tolerances.SMOOTHING_ERROR_REDUCTION_MIN * _rel_l1(smooth, want)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_packed_documents_quantize_as_they_would_alone(implementation):
  # Documents of 9 and 14 tokens with blocks of 4 queries / 8 keys: blocks, tiles and the mean
  # restart at each document, so each packed document equals its own call.
  lengths = (9, 14)
  q, k, v = inputs.qkv(B=2, T=23, N=2, K=1, H=8, h=6, seed=4)
  seg = jnp.asarray(np.broadcast_to(np.repeat([0, 1], lengths), (2, 23)))
  fn = inputs.jit_with(sage_attention, causal=True, q_block=4, k_block=8,
                       implementation=implementation)
  packed = np.asarray(fn(q, k, v, segment_ids=seg))
  start = 0
  for n in lengths:
    part = slice(start, start + n)
    np.testing.assert_allclose(packed[:, part], np.asarray(fn(q[:, part], k[:, part], v[:, part])),
                               **F32)
    start += n


def test_a_row_that_sees_no_key_gives_zeros_and_finite_gradients():
  q, k, v = inputs.qkv(B=2, T=5, N=2, K=2, H=8, h=6, seed=5)
  lengths = jnp.asarray([0, 5])
  loss = lambda q, k, v: jnp.sum(sage_attention(q, k, v, kv_lengths=lengths) ** 2)
  out, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
  out = jax.jit(lambda q, k, v: sage_attention(q, k, v, kv_lengths=lengths))(q, k, v)
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


def test_gradients_are_straight_through():
  """The paper is inference-only; the operator's gradients are those of exact softmax attention at
  the unquantized inputs (a straight-through estimator)."""
  q, k, v = inputs.qkv(B=1, T=9, N=2, K=1, H=8, h=6, seed=6)
  dout = jax.random.normal(jax.random.PRNGKey(7), (1, 9, 2, 6))
  inputs.assert_same_gradients(
      lambda q, k, v: sage_attention(q, k, v, causal=True),
      lambda q, k, v: softmax_attention(q, k, v, causal=True), (q, k, v), dout,
      ("dq", "dk", "dv"), tol=tolerances.grad(jnp.float32))
