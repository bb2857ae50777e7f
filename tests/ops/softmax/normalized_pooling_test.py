"""Normalized attention pooling (#242): the weights are the scores standardized over each row's
visible keys (zero mean, unit population variance; the authors' ε = 1e-3 on the standard deviation),
times a gain plus a shift per head, with no softmax. Checked against a float64 rewrite of the
authors' `NormalizeAttention` on every implementation (values and finite-difference gradients) with
causal, padded, cross and packed masks, and the defining properties: with gain 1, shift 0 and ε = 0
the weights of every row have mean 0 and variance 1 over exactly its visible keys, they sum to
shift × (visible keys) instead of 1 (no probability cage: negative weights, outputs outside the
convex hull of the values), a one-key row gets the shift alone, and a fully masked row gives zeros."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.softmax import normalized_attention_pooling
from tests import inputs
from tests import numpy_math
from tests import tolerances

F32 = tolerances.output(jnp.float32)
GRAD = tolerances.grad(jnp.float32)
SUM = tolerances.FEATURE_SUM[jnp.float32]
ZERO_SUM = dict(atol=tolerances.CANCELLING_SUM_ABS, **SUM)
B, T, N, K, H, h = 2, 11, 4, 2, 8, 6
GAIN = np.array([1.0, 0.7, 1.3, 1.1], np.float32)
SHIFT = np.array([0.0, 0.2, -0.3, 0.5], np.float32)


def _weights_float64(q, k, visible, gain, shift, *, scale=1.0, eps=1e-3):
  """The authors' `(gain · normalize_masked(logits, mask) + bias) · mask` in float64: the mean and
  the population standard deviation over the visible keys, ε added to the deviation."""
  q, k = (np.asarray(x, np.float64) for x in (q, k))
  k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
  s = scale * np.einsum("btnh,bsnh->bnts", q, k)
  mask = visible.astype(np.float64)
  count = np.maximum(mask.sum(-1, keepdims=True), 1.0)
  mean = (s * mask).sum(-1, keepdims=True) / count
  centered = (s - mean) * mask
  std = np.sqrt((centered ** 2).sum(-1, keepdims=True) / count) + eps
  z = np.where(std > 0, centered / np.where(std > 0, std, 1.0), 0.0)
  g, b = (np.asarray(x, np.float64)[None, :, None, None] for x in (gain, shift))
  return (g * z + b) * mask


def _float64(q, k, v, visible, gain=GAIN, shift=SHIFT, **kw):
  v = np.repeat(np.asarray(v, np.float64), q.shape[2] // v.shape[2], axis=2)
  return np.einsum("bnts,bsnh->btnh", _weights_float64(q, k, visible, gain, shift, **kw), v)


CASES = {
    "causal": dict(T=T, S=T, kw=dict(causal=True)),
    "padded_cross": dict(T=T, S=14, kw=dict(kv_lengths=np.array([14, 6]))),
    "packed_causal": dict(T=T, S=T, kw=dict(causal=True,
                                            segment_ids=np.array([[0] * 4 + [1] * 7, [0] * 11]))),
}


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_the_authors_normalization(case, implementation):
  c = CASES[case]
  q, k, v = inputs.qkv(B=B, T=c["T"], S=c["S"], N=N, K=K, H=H, h=h, seed=2)
  kw = c["kw"]
  static = dict(causal=kw.get("causal", False), implementation=implementation)
  out = inputs.jit_with(normalized_attention_pooling, **static)(
      q, k, v, gain=GAIN, shift=SHIFT, kv_lengths=kw.get("kv_lengths"),
      segment_ids=kw.get("segment_ids"))
  vis = numpy_math.visible(B, c["T"], c["S"], causal=static["causal"],
                           kv_lengths=kw.get("kv_lengths"), segments=kw.get("segment_ids"))
  np.testing.assert_allclose(np.asarray(out), _float64(q, k, v, vis), **F32)


def test_gradients_match_float64_finite_differences():
  q, k, v = inputs.qkv(B=1, T=9, N=4, K=2, H=4, h=3, seed=6)
  rng = np.random.default_rng(0)
  c = rng.standard_normal((1, 9, 4, 3))
  vis = numpy_math.visible(1, 9, 9, causal=True)

  def loss(q, k, v, gain, shift):
    out = normalized_attention_pooling(q, k, v, gain=gain, shift=shift, causal=True,
                                       implementation="xla")
    return jnp.sum(out * jnp.asarray(c, jnp.float32))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))(q, k, v, GAIN, SHIFT)
  args = [np.asarray(x, np.float64) for x in (q, k, v, GAIN, SHIFT)]
  loss64 = lambda q, k, v, g, b: float(np.sum(_float64(q, k, v, vis, g, b) * c))
  numpy_math.check_directional_derivatives(grads, args, loss64, ("q", "k", "v", "gain", "shift"),
                                           rng=rng, tol=GRAD)


def _weights(q, k, *, gain, shift, eps, kv_lengths=None, causal=False):
  """The weights `[B, T, S]` of head 0, read through one-hot values."""
  S = k.shape[1]
  v = jnp.eye(S)[None, :, None, :].repeat(q.shape[0], axis=0)
  f = inputs.jit_with(normalized_attention_pooling, causal=causal, eps=eps)
  return np.asarray(f(q, k, v, gain=gain, shift=shift, kv_lengths=kv_lengths))[:, :, 0]


def test_weights_are_standardized_scores_over_the_visible_keys():
  q, k, _ = inputs.qkv(B=2, T=13, N=1, K=1, H=H, seed=4)
  lengths = np.array([13, 9])
  w = _weights(q, k, gain=jnp.ones(1), shift=jnp.zeros(1), eps=0.0, kv_lengths=jnp.asarray(lengths),
               causal=True)
  vis = numpy_math.visible(2, 13, 13, causal=True, kv_lengths=lengths)[:, 0]
  assert np.all(w[~vis] == 0.0)                       # hidden keys: exactly no weight
  n = vis.sum(-1)
  rows = n >= 2
  mean = w.sum(-1) / n
  var = (w ** 2).sum(-1) / n - mean ** 2
  np.testing.assert_allclose(mean[rows], 0.0, **ZERO_SUM)
  np.testing.assert_allclose(var[rows], 1.0, **SUM)
  assert (w < 0).any()                                 # not a distribution
  # A row with one visible key (row 0) has s - μ = 0: its weight is the shift alone.
  w1 = _weights(q, k, gain=jnp.ones(1), shift=jnp.full((1,), 0.4), eps=1e-3, causal=True)
  np.testing.assert_allclose(w1[:, 0, 0], 0.4, **SUM)


def test_rows_sum_to_shift_times_visible_keys_not_to_one():
  # Σ_j (s_ij - μ_i) = 0, so a row's weights sum to b · N_i: with b = 0 the output is a signed
  # combination with zero total weight, outside the convex hull of the values.
  q, k, _ = inputs.qkv(B=2, T=9, N=1, K=1, H=H, seed=5)
  for b in (0.0, 0.35):
    w = _weights(q, k, gain=jnp.full((1,), 1.7), shift=jnp.full((1,), b), eps=1e-3, causal=True)
    np.testing.assert_allclose(w.sum(-1), np.broadcast_to(b * np.arange(1, 10), (2, 9)),
                               **ZERO_SUM)


def test_fully_masked_row_gives_zeros_and_bad_params_name_the_argument():
  q, k, v = inputs.qkv(B=2, T=5, N=N, K=K, H=H, h=h)
  f = lambda q, k, v: normalized_attention_pooling(q, k, v, gain=GAIN, shift=SHIFT,
                                                   kv_lengths=jnp.array([0, 5]))
  out, grads = jax.jit(lambda *a: (f(*a), jax.grad(lambda *b: jnp.sum(f(*b) ** 2),
                                                    argnums=(0, 1, 2))(*a)))(q, k, v)
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
  assert np.abs(np.asarray(out[1])).max() > 0.0
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  with pytest.raises(ValueError, match="gain"):
    normalized_attention_pooling(q, k, v, gain=jnp.ones((N + 1,)), shift=SHIFT)
