"""Length-scaled softplus attention (#61): LSSA's weights softplus(log d · log N_i · cos(q_i, k_j)),
l1-normalized over the row's visible keys, and LSSAR's re-weighting relu(N_i a - O_i)^p
renormalized, checked against a float64 rewrite of the paper's equations on every implementation
(values and finite-difference gradients), and the defining properties: the weights are a
distribution, the scale factor follows the number of keys a row sees (not the padded length), and the
re-weighting sharpens each row (lower entropy, keys below the row's mean weight dropped) while rows
still sum to 1."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.softmax import softplus_length_scaled_attention
from tests import inputs
from tests import numpy_math
from tests import tolerances

F32 = tolerances.output(jnp.float32)
GRAD = tolerances.grad(jnp.float32)
SUM = tolerances.FEATURE_SUM[jnp.float32]
B, T, N, K, H, h = 2, 11, 4, 2, 8, 6


def _weights_float64(q, k, *, causal, kv_lengths=None, scale=None, power=None):
  """`[B, N, T, S]` weights of the paper's equations in float64 (GQA by repeating key heads)."""
  q, k = (np.asarray(x, np.float64) for x in (q, k))
  Hq, S = q.shape[-1], k.shape[1]
  k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
  qn = q / np.linalg.norm(q, axis=-1, keepdims=True)
  kn = k / np.linalg.norm(k, axis=-1, keepdims=True)
  cos = np.einsum("btnh,bsnh->bnts", qn, kn)
  visible = np.ones((q.shape[0], 1, q.shape[1], S), bool)
  if causal:
    visible = visible & np.tril(np.ones((q.shape[1], S), bool))
  if kv_lengths is not None:
    visible = visible & (np.arange(S) < np.asarray(kv_lengths)[:, None])[:, None, None, :]
  n = visible.sum(-1, keepdims=True)                                  # N_i: keys row i sees
  lam = (math.log(Hq) if scale is None else scale) * np.log(np.maximum(n, 1))
  a = np.where(visible, np.logaddexp(0.0, lam * cos), 0.0)             # softplus
  a = a / np.where(n > 0, a.sum(-1, keepdims=True), 1.0)
  if power is not None:
    offset = np.where(n > 3, 1.0, 0.0)                                 # O: first three rows 0
    r = np.where(visible, np.maximum(n * a - offset, 0.0) ** power, 0.0)
    total = r.sum(-1, keepdims=True)
    a = np.where(total > 0, r / np.where(total > 0, total, 1.0), 0.0)
  return a


def _float64(q, k, v, **kw):
  v = np.asarray(v, np.float64)
  v = np.repeat(v, q.shape[2] // v.shape[2], axis=2)
  return np.einsum("bnts,bsnh->btnh", _weights_float64(q, k, **kw), v)


def _weights(q, k, kv_lengths=None, **static):
  """The operator's weights `[B, T, S]` for one head, read through one-hot values (compiled; the
  dense path compiles fastest, and every path equals the float64 rewrite above)."""
  S = k.shape[1]
  v = jnp.eye(S)[None, :, None, :].repeat(q.shape[0], axis=0)
  f = inputs.jit_with(softplus_length_scaled_attention, implementation="reference", **static)
  return np.asarray(f(q, k, v, kv_lengths=kv_lengths))[:, :, 0]


@pytest.mark.parametrize("power", [None, 15.0])
@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("case", ["causal", "padded"])
def test_equals_the_papers_equations(case, implementation, power):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=3)
  kw = dict(causal=True) if case == "causal" else dict(causal=False, kv_lengths=np.array([T, 7]))
  out = inputs.jit_with(softplus_length_scaled_attention, implementation=implementation,
                        reweight_power=power, causal=kw["causal"])(
                            q, k, v, kv_lengths=kw.get("kv_lengths"))
  np.testing.assert_allclose(np.asarray(out), _float64(q, k, v, power=power, **kw), **F32)


@pytest.mark.parametrize("power", [None, 15.0])
def test_gradients_match_float64_finite_differences(power):
  q, k, v = inputs.qkv(B=1, T=9, N=4, K=2, H=H, h=3, seed=6)
  rng = np.random.default_rng(0)
  c = rng.standard_normal((1, 9, 4, 3))

  def loss(q, k, v):
    out = softplus_length_scaled_attention(q, k, v, causal=True, reweight_power=power,
                                           implementation="xla")
    return jnp.sum(out * jnp.asarray(c, jnp.float32))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  args = [np.asarray(x, np.float64) for x in (q, k, v)]
  loss64 = lambda *a: float(np.sum(_float64(*a, causal=True, power=power) * c))
  numpy_math.check_directional_derivatives(grads, args, loss64, "qkv", rng=rng,
                                           tol=GRAD)


def test_weights_are_a_distribution_over_the_visible_keys():
  q, k, _ = inputs.qkv(B=2, T=13, N=1, K=1, H=H, seed=4)
  w = _weights(q, k, causal=True, kv_lengths=jnp.array([13, 9]))
  assert np.all(w >= 0.0)
  assert np.all(w[:, np.triu_indices(13, 1)[0], np.triu_indices(13, 1)[1]] == 0.0)  # future
  assert np.all(w[1, :, 9:] == 0.0)                                                   # padding
  np.testing.assert_allclose(w.sum(-1), 1.0, **SUM)
  # softplus > 0: every visible key keeps some weight (no hard zeros before the re-weighting).
  assert np.all(w[0][np.tril(np.ones((13, 13), bool))] > 0.0)


def test_scale_factor_is_log_d_times_log_of_the_keys_a_row_sees():
  # One query against keys of known cosines 0.9 and 0.3; the row sees the first n keys
  # (kv_lengths). The weight ratio of the two keys is softplus(λ 0.9) / softplus(λ 0.3) with
  # λ = log d · log n, for the row's own n (not the padded length S = 16): it grows with n.
  S = 16
  e = np.eye(H)
  q = jnp.asarray(3.0 * e[0])[None, None, None, :]
  others = np.random.default_rng(2).standard_normal((S - 2, H))
  keys = np.concatenate([[0.9 * e[0] + math.sqrt(1 - 0.81) * e[1]],
                         [2.0 * (0.3 * e[0] + math.sqrt(1 - 0.09) * e[2])], others])
  k = jnp.asarray(keys, jnp.float32)[None, :, None, :]
  ratios = []
  for n in (2, 5, 16):
    w = _weights(q, k, kv_lengths=jnp.array([n]))[0, 0]
    lam = math.log(H) * math.log(n)
    want = np.logaddexp(0, lam * 0.9) / np.logaddexp(0, lam * 0.3)
    np.testing.assert_allclose(w[0] / w[1], want, **SUM)
    ratios.append(w[0] / w[1])
  assert ratios[0] < ratios[1] < ratios[2]
  # `scale` replaces the constant log d.
  w = _weights(q, k, kv_lengths=jnp.array([5]), scale=2.5)[0, 0]
  lam = 2.5 * math.log(5)
  np.testing.assert_allclose(w[0] / w[1], np.logaddexp(0, lam * 0.9) / np.logaddexp(0, lam * 0.3),
                             **SUM)


def _entropy(w):
  return -np.sum(np.where(w > 0, w * np.log(np.where(w > 0, w, 1.0)), 0.0), axis=-1)


def test_reweighting_sharpens_and_keeps_rows_summing_to_one():
  q, k, _ = inputs.qkv(B=2, T=17, N=1, K=1, H=H, seed=8)
  lssa = _weights(q, k, causal=True)
  soft = _weights(q, k, causal=True, reweight_power=3.0)
  sharp = _weights(q, k, causal=True, reweight_power=15.0)
  for w in (soft, sharp):
    np.testing.assert_allclose(w.sum(-1), 1.0, **SUM)
    assert np.all(w >= 0.0)
  rows = slice(1, None)                              # row 0 has one key: weight 1 in every form
  assert np.all(_entropy(soft)[:, rows] < _entropy(lssa)[:, rows])
  # A larger power sharpens further, strictly unless a single key is left (entropy 0 in both).
  spread = (soft > 0).sum(-1) > 1
  assert np.all(_entropy(sharp)[spread] < _entropy(soft)[spread])
  assert np.all(_entropy(sharp)[~spread] == 0.0)
  assert np.all(sharp.max(-1)[:, rows] > lssa.max(-1)[:, rows])
  # Rows that see more than three keys keep only the keys above their mean weight (N_i a_ij > 1).
  n = np.arange(1, 18)[None, :, None]
  below = (n * lssa <= 1.0) & (n > 3) & np.tril(np.ones((17, 17), bool))
  assert below.any()
  assert np.all(soft[below] == 0.0) and np.all(sharp[below] == 0.0)


def test_empty_rows_give_zeros_and_a_power_below_one_is_rejected():
  q, k, v = inputs.qkv(B=2, T=5, N=N, K=K, H=H, h=h, seed=1)
  # The re-weighted form runs all three passes (counts, log-sum-exp, weights).
  f = lambda q, k, v: softplus_length_scaled_attention(q, k, v, kv_lengths=jnp.array([0, 5]),
                                                       reweight_power=3.0)
  out, grads = jax.jit(lambda *a: (f(*a), jax.grad(lambda *b: jnp.sum(f(*b) ** 2),
                                                    argnums=(0, 1, 2))(*a)))(q, k, v)
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
  assert np.abs(np.asarray(out[1])).max() > 0.0
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)
  with pytest.raises(ValueError, match="reweight_power"):
    softplus_length_scaled_attention(q, k, v, reweight_power=0.5)
