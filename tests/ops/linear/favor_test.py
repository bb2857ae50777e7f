"""Performer FAVOR+ (attnjax/ops/linear/favor.py): an unbiased estimate of the softmax kernel,
exact under large inputs.

Each property is checked against an explicit evaluation of the formula written out here."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.core import feature_maps as fm
from attnjax.ops import linear as lin
from tests import tolerances
from tests.inputs import jit_with, qkv
from tests.ops.linear.helpers import assert_rel


FAVOR = aj.get_mechanism("favor_plus_attention")


def _layer_draws(key, count, m, H):
  """`count` independent draws of the random features, by the init the layer uses."""
  (spec,) = FAVOR.params
  return jax.jit(jax.vmap(lambda key: spec.init(key, (m, H))))(jax.random.split(key, count))


def test_favor_plus_features_are_fixed_orthogonal_draws():
  (spec,) = FAVOR.params
  assert not spec.trainable              # the layer keeps them in 'buffers', out of the optimizer
  H = 8
  w = spec.init(jax.random.PRNGKey(0), spec.shape(4, 2, H))
  assert w.shape == (4 * H, H)
  for block in np.split(np.asarray(w, np.float64), 4):
    gram = block @ block.T
    np.testing.assert_allclose(gram - np.diag(np.diag(gram)), 0.0,
                               **tolerances.ORTHOGONALITY[jnp.float32])
  # Chi-distributed norms, not all √H.
  assert np.std(np.linalg.norm(w, axis=-1)) > tolerances.RANDOM_NORM_SPREAD_MIN


def test_favor_plus_kernel_estimate_is_unbiased_with_the_layers_draw():
  """Over independent draws of W by the layer's init (orthogonal blocks), the mean of φ(q)·φ(k) is
  exp(q·k) within its standard error."""
  H, m, draws = 8, 16, 4000
  kq, kk, kw = jax.random.split(jax.random.PRNGKey(0), 3)
  q = 0.4 * jax.random.normal(kq, (5, H))
  k = 0.4 * jax.random.normal(kk, (5, H))
  exact = jnp.exp(jnp.sum(q * k, axis=-1))
  ws = _layer_draws(kw, draws, m, H)
  samples = jax.vmap(lambda w: jnp.sum(fm.favor_plus(q, w) * fm.favor_plus(k, w), axis=-1))(ws)
  mean, stderr = jnp.mean(samples, 0), jnp.std(samples, 0) / draws ** 0.5
  z = np.asarray(jnp.abs(mean - exact) / stderr)
  assert np.all(z < tolerances.Z_SCORE_MAX), z   # a false alarm once in ~10^5 runs per pair
  assert np.all(samples > 0)    # positive features: every estimate is a valid (positive) weight


@pytest.mark.parametrize("causal", [False, True])
def test_favor_plus_attention_error_shrinks_with_the_number_of_features(causal):
  """The mechanism's output converges to softmax attention like the Monte-Carlo 1/√m."""
  B, T, N, H, h = 1, 16, 2, 8, 8
  q, k, v = qkv(B=B, T=T, N=N, K=N, H=H, h=h, seed=3)
  q, k = 0.5 * q, 0.5 * k
  exact = jax.nn.dot_product_attention(q, k, v, is_causal=causal)
  ws = _layer_draws(jax.random.PRNGKey(1), 8, 256, H)
  run = jax.jit(jax.vmap(lambda w: lin.favor_plus_attention(q, k, v, projection=w, causal=causal)))

  def mean_error(m):             # the first m rows of an orthogonal draw are an orthogonal draw
    out = run(ws[:, :m])
    return float(jnp.mean(jnp.sqrt(jnp.mean((out - exact) ** 2, axis=(1, 2, 3, 4))
                                   / jnp.mean(exact ** 2))))

  e4, e32, e256 = mean_error(4), mean_error(32), mean_error(256)
  # 1/√m predicts 2.8x for 8x the features and 8x for 64x; eight draws leave room for noise.
  assert e4 / e32 > tolerances.MC_ERROR_RATIO_8X_MIN, (e4, e32, e256)
  assert e4 / e256 > tolerances.MC_ERROR_RATIO_64X_MIN, (e4, e32, e256)
  assert e256 < tolerances.RANDOM_FEATURES_256_REL_ERROR_MAX, (e4, e32, e256)


def _favor_float64(q, k, v, w, *, causal):
  """FAVOR+ attention with the same features, unstabilized, in float64 log space:
  `A_ts = Σ_m exp(a_tm + b_sm)`, a, b the exponents `w·x - ‖x‖²/2` of x·scale^{1/2}."""
  q, k, v, w = (np.asarray(x, np.float64) for x in (q, k, v, w))
  N, H = q.shape[2], q.shape[3]
  exponents = lambda x: (np.einsum("...f,mf->...m", x * H ** -0.25, w)
                         - 0.5 * np.sum((x * H ** -0.25) ** 2, -1, keepdims=True))
  a, b = exponents(q), np.repeat(exponents(k), N // k.shape[2], 2)
  log_w = np.logaddexp.reduce(a[:, :, None] + b[:, None], axis=-1)            # [B,T,S,N]
  if causal:
    log_w = np.where(np.tril(np.ones(log_w.shape[1:3], bool))[None, :, :, None], log_w, -np.inf)
  p = np.exp(log_w - log_w.max(2, keepdims=True))
  return np.einsum("btsn,bsnh->btnh", p / p.sum(2, keepdims=True), np.repeat(v, N // v.shape[2], 2))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("factor", [10.0, 30.0])
def test_favor_plus_large_inputs_stay_exact(factor, causal):
  """q, k ×10 and ×30 (exponents in the hundreds): no row collapses to zero, and the stabilized
  float32 result equals the same estimate computed exactly (float64, log space)."""
  q, k, v = qkv(T=29)
  w = FAVOR.example_kwargs["projection"]
  out = jit_with(lin.favor_plus_attention, projection=w, causal=causal)(
      factor * q, factor * k, v)
  assert not np.any(np.all(np.asarray(out) == 0, axis=-1))
  assert_rel(out, _favor_float64(factor * q, factor * k, v, w, causal=causal))


def test_favor_plus_recurrent_decode_of_large_inputs_from_a_zero_state():
  """The carried running max keeps decoding exact at large scale; an all-zero state (as a layer
  initializes it) is the empty state."""
  q, k, v = qkv(T=12)
  q, k = 30.0 * q, 30.0 * k
  w = FAVOR.example_kwargs["projection"]
  favor = jit_with(lin.favor_plus_attention, projection=w, causal=True)
  recurrent = jit_with(lin.favor_plus_attention, projection=w, causal=True,
                       return_final_state=True)
  full = favor(q, k, v)
  state = jax.tree.map(jnp.zeros_like, jax.eval_shape(recurrent, q, k, v)[1])
  outs = []
  for part in (slice(0, 5), slice(5, 12)):                   # a prefill, then the rest
    out, state = recurrent(q[:, part], k[:, part], v[:, part], initial_state=state)
    outs.append(out)
  assert_rel(jnp.concatenate(outs, axis=1), full)
  assert_rel(full, _favor_float64(q, k, v, w, causal=True))


@pytest.mark.parametrize("causal", [False, True])
def test_favor_plus_packed_documents_of_different_scales(causal):
  """The key maxima are per document: a small-scale document packed after a large one is as exact
  as alone."""
  q, k, v = qkv(T=20)
  boost = jnp.where(jnp.arange(20) < 9, 30.0, 1.0)[None, :, None, None]
  q, k = q * boost, k * boost
  w = FAVOR.example_kwargs["projection"]
  seg = jnp.broadcast_to((jnp.arange(20) >= 9).astype(jnp.int32), (2, 20))
  packed = jit_with(lin.favor_plus_attention, projection=w, causal=causal)(
      q, k, v, segment_ids=seg)
  for part in (slice(0, 9), slice(9, 20)):
    alone = _favor_float64(q[:, part], k[:, part], v[:, part], w, causal=causal)
    assert_rel(packed[:, part], alone)
