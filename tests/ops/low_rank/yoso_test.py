"""YOSO: the expectation matches the collision kernel; the LSH estimator's mean converges."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.ops import low_rank
from tests import tolerances
from tests.ops.low_rank.common import has_t_by_s as _has_t_by_s
from tests.ops.low_rank.common import qkv as _qkv
from tests.ops.low_rank.common import rand as _rand
from tests.ops.low_rank.common import shapes as _shapes

F32 = tolerances.output(jnp.float32)


# --------------------------------------------------------------------------------------------------
# YOSO


def _yoso_numpy(q, k, v, tau):
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  qn = qn / np.linalg.norm(qn, axis=-1, keepdims=True)
  kn = kn / np.linalg.norm(kn, axis=-1, keepdims=True)
  G = qn.shape[2] // kn.shape[2]
  cos = np.einsum("btnh,bsnh->bnts", qn, kn.repeat(G, axis=2))
  kernel = (1 - np.arccos(np.clip(cos, -1, 1)) / np.pi) ** tau
  return np.einsum("bnts,bsnh->btnh", kernel, vn.repeat(G, axis=2))


def test_yoso_expectation_matches_closed_form_collision_kernel():
  q, k, v = _qkv(T=9, S=14)
  raw = low_rank.yoso_attention(q, k, v, hash_bits=6, normalize_output=False)
  expected = _yoso_numpy(q, k, v, 6)
  chex.assert_trees_all_close(raw, expected.astype(np.float32), **F32)
  out = low_rank.yoso_attention(q, k, v, hash_bits=6)
  normed = expected / np.linalg.norm(expected, axis=-1, keepdims=True)
  chex.assert_trees_all_close(out, normed.astype(np.float32), **F32)


def _assert_mean_converges(samples, expected, draws):
  """Each draw is an independent unbiased estimate: the error of the mean is a standard error
  sd/√draws; over these few entries a 5-sigma bound is exceeded with probability < 1e-4 (and the
  seed is fixed). The error also falls with more draws (√10 ≈ 3.2 times in expectation)."""
  samples, expected = np.asarray(samples, np.float64), np.asarray(expected, np.float64)
  mean, sd = samples.mean(0), samples.std(0, ddof=1)
  assert np.all(np.abs(mean - expected) <= tolerances.SIGMAS * sd / np.sqrt(draws)
                + tolerances.SAMPLE_MEAN_SLACK)
  err_few = np.abs(samples[:draws // 10].mean(0) - expected).mean()
  assert np.abs(mean - expected).mean() < err_few / 2


def test_yoso_sampled_estimator_mean_converges_to_expectation():
  """With a key, yoso_attention is the paper's hashing estimate; its mean over draws is the
  collision-kernel expectation (float64 closed form)."""
  q, k, v = _qkv(B=1, T=5, S=12, N=2, K=1, H=8, h=3, seed=40)
  draws = 1000
  one = jax.jit(lambda key: low_rank.yoso_attention(q, k, v, rng=key, hash_bits=3, num_hashes=1,
                                                    normalize_output=False))
  samples = jax.lax.map(one, jax.random.split(jax.random.PRNGKey(0), draws))
  assert float(jnp.max(jnp.abs(samples[0] - samples[1]))) > 0      # the key changes the hashes
  _assert_mean_converges(samples, _yoso_numpy(q, k, v, 3), draws)


def test_yoso_layer_samples_from_the_sample_rng_stream_else_runs_the_expectation():
  layer = aj.nn.MultiHeadAttention(num_heads=2, num_kv_heads=1, mechanism="yoso_attention",
                                   head_dim=8, mechanism_kwargs=dict(
                                       hash_bits=3, num_hashes=1, normalize_output=False))
  x = _rand(51, 1, 6, 8)
  params = layer.init(jax.random.PRNGKey(0), x)
  exact = layer.apply(params, x)
  draws = 1000
  sampled = jax.jit(jax.vmap(lambda key: layer.apply(params, x, rngs={"sample": key})))(
      jax.random.split(jax.random.PRNGKey(1), draws))
  # A key reached the mechanism.
  assert float(jnp.max(jnp.abs(sampled[0] - exact))) > tolerances.CHANGED_MAX_ABS
  # The output projection is affine, so the mean output is the expectation's output.
  _assert_mean_converges(sampled, exact, draws)


def test_yoso_rejects_a_scale():
  q, k, v = _qkv(T=4, S=5)
  with pytest.raises(ValueError, match="yoso_attention: `scale` must be None"):
    low_rank.yoso_attention(q, k, v, scale=0.5)


def test_yoso_sampled_form_drops_padding_and_causal_calls_use_the_expectation():
  q, k, v = _qkv(T=8, S=15)
  key = jax.random.PRNGKey(3)
  padded = low_rank.yoso_attention(q, k, v, rng=key, kv_lengths=jnp.array([15, 9]))
  alone = low_rank.yoso_attention(q[1:], k[1:, :9], v[1:, :9], rng=key)
  chex.assert_trees_all_close(padded[1], alone[0], **F32)
  # No causal sampled estimator exists: a causal call is the exact expectation, rng or not.
  causal = low_rank.yoso_attention(q, k, v, rng=key, causal=True)
  chex.assert_trees_all_equal(causal, low_rank.yoso_attention(q, k, v, causal=True))


def test_yoso_sampled_form_is_linear_and_expectation_is_not():
  T, S = 127, 263
  q, k, v = _qkv(T=T, S=S, B=1)
  sampled = lambda q, k, v: low_rank.yoso_attention(q, k, v, rng=jax.random.PRNGKey(0))
  assert not _has_t_by_s(_shapes(sampled, q, k, v), T, S)
  # The check does see a [T, S] array where there is one.
  assert _has_t_by_s(_shapes(low_rank.yoso_attention, q, k, v), T, S)


@pytest.mark.slow
def test_yoso_empty_rows_are_zero_with_finite_gradients():
  q, k, v = _qkv(T=6, S=6)
  run = lambda q, k, v: low_rank.yoso_attention(q, k, v, kv_lengths=jnp.array([0, 4]))
  assert float(jnp.max(jnp.abs(run(q, k, v)[0]))) == 0.0
  loss = lambda *a: jnp.sum(run(*a) ** 2)
  chex.assert_tree_all_finite(jax.grad(loss, argnums=(0, 1, 2))(q, k, v))
  # Identical query and key directions (arccos' derivative is infinite there) stay finite too.
  chex.assert_tree_all_finite(jax.grad(lambda q: jnp.sum(low_rank.yoso_attention(
      q, q[:, :, :2], v) ** 2))(q))
