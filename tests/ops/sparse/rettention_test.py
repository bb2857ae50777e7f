"""Re-ttention (arXiv:2505.22918): sparse softmax attention rescaled by the normalizer ratio
ρ = Σ_{mask} e^s / Σ e^s and shifted by the residual o_full - ρ·o_sparse, both cached at a
full-attention denoising step and reused at later sparse steps.

Checked against a float64 numpy rewrite of the authors' processors (`get_attention_scores_and_ratio`,
`get_attention_scores_with_denominator_ratio`, `cached_residual = full - window`) at both
implementations, causal and not, with GQA; the identity behind the method (the rescaled sparse
weights are exactly the full weights on the mask, the residual is the full attention over the
dropped keys, so statistics of the same step give full attention); the claim it rests on (with
inputs that drift little between steps, the reshaped output is far closer to full attention than
the sparse one, its error first order in the drift); and empty rows (ratio 0, no NaN).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import masks
from attnjax.ops.sparse import rettention
from tests import inputs
from tests import numpy_math
from tests import tolerances

B, T, N, K, H, HV = 2, 13, 4, 2, 8, 6
RADIUS = 1                                     # the sparse pattern: keys within 1 of the query
MASK = masks.sliding_window(RADIUS, RADIUS)


def _sparse_keep(t, s):
  j = np.arange(s)
  return (np.abs(np.arange(t)[:, None] - j[None, :]) <= RADIUS)[None, None]


def _scores(q, k):
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  kk = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
  return q.shape[-1] ** -0.5 * np.einsum("btnh,bsnh->bnts", q, kk)


def _values(q, v):
  return np.repeat(np.asarray(v, np.float64), q.shape[2] // v.shape[2], axis=2)


def _statistics_numpy(q, k, v, *, causal):
  """float64 `get_attention_scores_and_ratio` + `cached_residual = full - window_with_ratio`."""
  s = _scores(q, k)
  t_, s_ = s.shape[-2:]
  keep = numpy_math.visible(q.shape[0], t_, s_, causal=causal)
  e = np.where(keep, np.exp(s - s.max(-1, keepdims=True)), 0.0)
  den = e.sum(-1, keepdims=True)
  ratio = (e * _sparse_keep(t_, s_)).sum(-1, keepdims=True) / den
  full = np.einsum("bnts,bsnh->btnh", e / den, _values(q, v))
  window = _sparse_step_numpy(q, k, v, ratio=ratio, causal=causal)
  return ratio[..., 0].transpose(0, 2, 1), full - window


def _sparse_step_numpy(q, k, v, *, ratio, causal):
  """float64 `get_attention_scores_with_denominator_ratio`: e^s / (Σ_mask e^s / ρ) over the mask."""
  s = _scores(q, k)
  t_, s_ = s.shape[-2:]
  keep = numpy_math.visible(q.shape[0], t_, s_, causal=causal) & _sparse_keep(t_, s_)
  e = np.where(keep, np.exp(s - np.where(keep, s, -np.inf).max(-1, keepdims=True)), 0.0)
  w = e / (e.sum(-1, keepdims=True) / ratio)
  return np.einsum("bnts,bsnh->btnh", w, _values(q, v))


@pytest.mark.parametrize("causal,implementation",
                         [(False, "xla"), (True, "xla"), (False, "reference")])
def test_statistics_and_sparse_step_match_the_authors_processors(causal, implementation):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=1)
  q2, k2, v2 = (x + 0.3 * y for x, y in zip((q, k, v), inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV,
                                                                    seed=2), strict=True))
  kw = dict(mask_mod=MASK, causal=causal, implementation=implementation)
  ratio, residual = jax.jit(lambda *a: rettention.rettention_statistics(*a, **kw))(q, k, v)
  want_ratio, want_residual = _statistics_numpy(q, k, v, causal=causal)
  np.testing.assert_allclose(ratio, want_ratio, **tolerances.output(jnp.float32))
  np.testing.assert_allclose(residual, want_residual, **tolerances.output(jnp.float32))
  step = jax.jit(lambda *a: rettention.rettention_attention(*a[:3], ratio=a[3], residual=a[4], **kw))
  got = step(q2, k2, v2, ratio, residual)
  want = _sparse_step_numpy(q2, k2, v2, ratio=want_ratio.transpose(0, 2, 1)[..., None],
                            causal=causal) + want_residual
  np.testing.assert_allclose(got, want, **tolerances.output(jnp.float32))


def test_rescaled_sparse_weights_are_the_full_weights_on_the_mask():
  """One-hot values (v_j = e_j) make outputs the weight rows: ρ·softmax_mask = softmax on the
  mask, the residual is the full weights off the mask, and same-step statistics give full
  attention."""
  q, k, _ = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=3)
  v = jnp.broadcast_to(jnp.eye(T)[None, :, None, :], (B, T, K, T))
  stats = jax.jit(lambda *a: rettention.rettention_statistics(*a, mask_mod=MASK))
  ratio, residual = stats(q, k, v)
  sparse_w = jax.jit(lambda *a: rettention.rettention_attention(
      *a, ratio=jnp.ones((B, T, N)), residual=jnp.zeros((B, T, N, T)), mask_mod=MASK))(q, k, v)
  full_w = numpy_math.softmax(_scores(q, k)).transpose(0, 2, 1, 3)            # [B, T, N, S]
  on_mask = np.broadcast_to(_sparse_keep(T, T)[0, 0][None, :, None, :], full_w.shape)
  rescaled = np.asarray(ratio)[..., None] * np.asarray(sparse_w)
  np.testing.assert_allclose(np.where(on_mask, rescaled, 0.0), np.where(on_mask, full_w, 0.0),
                             **tolerances.output(jnp.float32))
  np.testing.assert_allclose(residual, np.where(on_mask, 0.0, full_w),
                             **tolerances.output(jnp.float32))
  same_step = jax.jit(lambda *a: rettention.rettention_attention(
      *a[:3], ratio=a[3], residual=a[4], mask_mod=MASK))(q, k, v, ratio, residual)
  np.testing.assert_allclose(same_step, full_w, **tolerances.output(jnp.float32))


def test_small_drift_between_steps_keeps_the_output_close_to_full_attention():
  """The temporal redundancy it exploits: inputs at the next step = these + ε·noise. The sparse
  output alone is far from full attention; the reshaped one is off by O(ε) only (doubling ε
  doubles the error)."""
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=4)
  noise = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=5)
  stats = jax.jit(lambda *a: rettention.rettention_statistics(*a, mask_mod=MASK))
  step = jax.jit(lambda *a: rettention.rettention_attention(
      *a[:3], ratio=a[3], residual=a[4], mask_mod=MASK))
  sparse = jax.jit(lambda *a: rettention.rettention_attention(
      *a, ratio=jnp.ones((B, T, N)), residual=jnp.zeros((B, T, N, HV)), mask_mod=MASK))
  ratio, residual = stats(q, k, v)
  errors = []
  for eps in (0.01, 0.02):
    q2, k2, v2 = (x + eps * y for x, y in zip((q, k, v), noise, strict=True))
    full = numpy_math.softmax(_scores(q2, k2)) @ np.swapaxes(_values(q2, v2), 1, 2)  # [B, N, T, h]
    full = np.swapaxes(full, 1, 2)
    errors.append(tolerances.rel_rms(step(q2, k2, v2, ratio, residual), full))
    sparse_error = tolerances.rel_rms(sparse(q2, k2, v2), full)
    assert errors[-1] < tolerances.RETTENTION_DRIFT_ERROR_RATIO_MAX * sparse_error, (
        eps, errors[-1], sparse_error)
  np.testing.assert_allclose(errors[1] / errors[0], 2.0, **tolerances.FIRST_ORDER_RATIO)


def test_empty_rows_give_ratio_zero_and_finite_gradients():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, seed=6)
  lengths = jnp.asarray([0, 7])                  # row 0 sees nothing; row 1's late queries miss
  nothing_near = masks.sliding_window(0, 0)      # only the key at the query's own position

  def loss(q, k, v):
    ratio, residual = rettention.rettention_statistics(q, k, v, mask_mod=nothing_near,
                                                       kv_lengths=lengths)
    out = rettention.rettention_attention(q, k, v, ratio=ratio, residual=residual,
                                          mask_mod=nothing_near, kv_lengths=lengths)
    return jnp.sum(out ** 2), (ratio, out)

  (_, (ratio, out)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
      q, k, v)
  np.testing.assert_array_equal(ratio[0], 0.0)
  np.testing.assert_array_equal(out[0], 0.0)
  np.testing.assert_array_equal(ratio[1, 7:], 0.0)        # own position at or past the length
  assert np.all(np.asarray(ratio[1, :7]) > 0)
  for g in grads:
    assert np.all(np.isfinite(np.asarray(g)))


def test_bad_statistics_shape_names_the_operator():
  q, k, v = inputs.qkv(B=1, T=5, N=2, K=2, H=4, h=4)
  with pytest.raises(ValueError, match="rettention_attention: `ratio`"):
    rettention.rettention_attention(q, k, v, ratio=jnp.ones((1, 5)), residual=jnp.zeros((1, 5, 2, 4)),
                                    mask_mod=MASK)
