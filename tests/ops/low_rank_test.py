"""Linformer, Agent attention, RITA group attention and YOSO: each paper's defining property.

Linformer with E = F = identity equals softmax attention; agent attention equals its generalized
linear attention form (an explicit `[T, S]` matrix softmax(Q Aᵀ) softmax(A Kᵀ) whose rows sum to 1)
at a cost linear in T; group attention with one group per key equals softmax attention, meets the
paper's error bound and its error shrinks as G grows on clustered keys; YOSO's expectation form
matches the closed-form collision kernel and the mean of the LSH estimator (sampled with a key, also
from the layer's 'sample' rng stream) converges to it.
"""

import chex
import flax.linen as nn
import jax
from jax.extend import core as jax_core
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.ops import low_rank
from tests import tolerances

F32 = tolerances.output(jnp.float32)


def _rand(seed, *shape):
  return jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _qkv(T=19, S=19, N=4, K=2, H=8, h=6, B=2, seed=0):
  return _rand(seed, B, T, N, H), _rand(seed + 1, B, S, K, H), _rand(seed + 2, B, S, K, h)


def _shapes(fn, *args):
  """Every intermediate shape of `fn(*args)`'s jaxpr, sub-jaxprs (scan, pjit, ...) included."""
  shapes = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      shapes.extend(getattr(var.aval, "shape", ()) for var in eqn.outvars)
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if isinstance(sub, jax_core.ClosedJaxpr):
            walk(sub.jaxpr)
          elif isinstance(sub, jax_core.Jaxpr):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return shapes


def _has_t_by_s(shapes, T, S):
  """Whether some intermediate has both a T axis and a distinct S axis (T, S chosen unusual)."""
  if T == S:
    return any(sum(d == T for d in s) >= 2 for s in shapes)
  return any(T in s and S in s for s in shapes)


def _softmax(x, axis=-1):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


# --------------------------------------------------------------------------------------------------
# Linformer


def test_linformer_identity_projection_equals_softmax_attention():
  q, k, v = _qkv(T=13, S=13)
  eye = jnp.broadcast_to(jnp.eye(13), (2, 13, 13))
  out = low_rank.linformer_attention(q, k, v, proj_k=eye, proj_v=eye)
  chex.assert_trees_all_close(out, aj.dot_product_attention(q, k, v), **F32)
  shared = low_rank.linformer_attention(q, k, v, proj_k=eye[:1], proj_v=eye[:1])
  chex.assert_trees_all_close(shared, out, **F32)


def test_linformer_slices_projections_to_length_and_rejects_longer_inputs():
  q, k, v = _qkv(T=11, S=9)
  e, f = _rand(7, 2, 5, 16), _rand(8, 2, 5, 16)
  out = low_rank.linformer_attention(q, k, v, proj_k=e, proj_v=f, kv_lengths=jnp.array([9, 6]))
  # Float64 form of softmax(Q (E K)ᵀ / √H)(F V) with padded keys zeroed, GQA head n -> n // 2.
  qn, kn, vn, en, fn = (np.asarray(x, np.float64) for x in (q, k, v, e, f))
  kn[1, 6:], vn[1, 6:] = 0.0, 0.0
  ek = np.einsum("kps,bskh->bpkh", en[:, :, :9], kn).repeat(2, axis=2)
  fv = np.einsum("kps,bskh->bpkh", fn[:, :, :9], vn).repeat(2, axis=2)
  w = _softmax(np.einsum("btnh,bpnh->bntp", qn, ek) * 8 ** -0.5)
  chex.assert_trees_all_close(out, np.einsum("bntp,bpnh->btnh", w, fv).astype(np.float32), **F32)
  with pytest.raises(ValueError, match="exceeds the projections' maximum length n=16"):
    low_rank.linformer_attention(*_qkv(S=17), proj_k=e, proj_v=f)


def test_linformer_cost_is_linear_in_length():
  T = S = 131
  q, k, v = _qkv(T=T, S=S, B=1)
  e = _rand(3, 2, 16, 256)
  fn = lambda q, k, v: low_rank.linformer_attention(q, k, v, proj_k=e, proj_v=e,
                                                    implementation="reference")
  assert not _has_t_by_s(_shapes(fn, q, k, v), T, S)


# --------------------------------------------------------------------------------------------------
# Agent attention


def test_adaptive_pool_bins_match_adaptive_avg_pool():
  w = np.asarray(low_rank.adaptive_pool_weights(jnp.array([10]), 4, 12))[0]
  # AdaptiveAvgPool1d(4) on 10 positions: [0, 3), [2, 5), [5, 8), [7, 10); 2 padded positions
  # unused.
  for row, (a, b) in zip(w, [(0, 3), (2, 5), (5, 8), (7, 10)], strict=True):
    expected = np.zeros(12)
    expected[a:b] = 1 / (b - a)
    np.testing.assert_allclose(row, expected, rtol=1e-6)


def _interp(table, size):
  """Linear interpolation of the last axis with half-pixel centres, clamped at the ends."""
  L0 = table.shape[-1]
  x = (np.arange(size) + 0.5) * L0 / size - 0.5
  return np.apply_along_axis(lambda r: np.interp(x, np.arange(L0), r), -1, table)


def _agent_params(N=4, K=2, n=5, h=6, seed=20):
  return dict(agent_bias_k=_rand(seed, N, n, 7) * 0.3, agent_bias_q=_rand(seed + 1, N, 7, n) * 0.3,
              dwc_kernel=_rand(seed + 2, K, 3, h), dwc_bias=_rand(seed + 3, K, h))


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_agent_attention_equals_generalized_linear_attention(implementation):
  q, k, v = _qkv(T=17, S=17)
  p = _agent_params()
  out = low_rank.agent_attention(q, k, v, **p, implementation=implementation)
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  kn, vr = kn.repeat(2, axis=2), vn.repeat(2, axis=2)
  pool = np.asarray(low_rank.adaptive_pool_weights(jnp.array([17, 17]), 5, 17), np.float64)
  agents = np.einsum("bit,btnh->binh", pool, qn)
  s = 8 ** -0.5
  bias_k = _interp(np.asarray(p["agent_bias_k"], np.float64), 17)                   # [N, n, S]
  bias_q = _interp(np.swapaxes(np.asarray(p["agent_bias_q"], np.float64), 1, 2), 17)
  phi_k = _softmax(np.einsum("binh,bsnh->bnis", agents, kn) * s + bias_k)          # [B,N,n,S]
  phi_q = _softmax(np.einsum("btnh,binh->bnti", qn, agents) * s + np.swapaxes(bias_q, 1, 2))
  weights = np.einsum("bnti,bnis->bnts", phi_q, phi_k)                              # [B,N,T,S]
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-12)
  w, bias = np.asarray(p["dwc_kernel"], np.float64), np.asarray(p["dwc_bias"], np.float64)
  vp = np.pad(vn, ((0, 0), (1, 1), (0, 0), (0, 0)))
  dwc = sum(vp[:, j:j + 17] * w[:, j] for j in range(3)) + bias
  expected = np.einsum("bnts,bsnh->btnh", weights, vr) + dwc.repeat(2, axis=2)
  chex.assert_trees_all_close(out, expected.astype(np.float32), **F32)


def test_agent_attention_with_one_agent_is_softmax_attention_of_the_mean_query():
  """n = 1: softmax over one agent is 1, so every token receives V_A = softmax(s · a Kᵀ) V with
  a = mean_t q_t (the agent aggregation is softmax attention of the pooled query), plus DWC(V)."""
  q, k, v = _qkv(T=15, S=15)
  p = {**_agent_params(n=1), "agent_bias_k": jnp.zeros((4, 1, 7)),
       "agent_bias_q": jnp.zeros((4, 7, 1)), "dwc_kernel": jnp.zeros((2, 3, 6))}
  out = low_rank.agent_attention(q, k, v, **p)
  mean_q = jnp.mean(q, axis=1, keepdims=True)
  want = aj.dot_product_attention(mean_q, k, v) + jnp.repeat(p["dwc_bias"], 2, axis=0)
  chex.assert_trees_all_close(out, jnp.broadcast_to(want, out.shape), **F32)


def test_agent_attention_cost_is_linear_in_length():
  T = S = 263
  q, k, v = _qkv(T=T, S=S, B=1)
  p = _agent_params()
  fn = lambda q, k, v: low_rank.agent_attention(q, k, v, **p, implementation="reference")
  assert not _has_t_by_s(_shapes(fn, q, k, v), T, S)


@pytest.mark.slow
def test_agent_attention_padding_equals_unpadded_and_empty_rows_are_zero():
  q, k, v = _qkv(T=16, S=16)
  # Zero biases: a bias table is interpolated to the padded length, so only then are they equal.
  p = {**_agent_params(), "agent_bias_k": jnp.zeros((4, 5, 7)),
       "agent_bias_q": jnp.zeros((4, 7, 5))}
  padded = low_rank.agent_attention(q, k, v, **p, kv_lengths=jnp.array([16, 11]))
  alone = low_rank.agent_attention(q[1:, :11], k[1:, :11], v[1:, :11], **p)
  chex.assert_trees_all_close(padded[1, :11], alone[0], **F32)
  loss = lambda q, k, v: jnp.sum(low_rank.agent_attention(q, k, v, **p,
                                                          kv_lengths=jnp.array([0, 5])) ** 2)
  out = low_rank.agent_attention(q, k, v, **p, kv_lengths=jnp.array([0, 5]))
  assert float(jnp.max(jnp.abs(out[0]))) == 0.0
  chex.assert_tree_all_finite(jax.grad(loss, argnums=(0, 1, 2))(q, k, v))


# --------------------------------------------------------------------------------------------------
# Group attention


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_group_attention_with_one_group_per_key_equals_softmax(implementation):
  q, k, v = _qkv(T=13, S=21)
  out = low_rank.group_attention(q, k, v, num_groups=21, implementation=implementation)
  chex.assert_trees_all_close(out, aj.dot_product_attention(q, k, v), **F32)


# Compiled once per shape and setting: eager dispatch of the k-means loop is several times slower.
_group = jax.jit(low_rank.group_attention, static_argnames=("num_groups", "num_iters",
                                                            "implementation"))
_kmeans = jax.jit(low_rank.kmeans_groups, static_argnums=(2, 3))


def _clustered_keys(seed, lengths, H=8, noise=0.05):
  """Time-series-like keys `[1, Σ lengths, 1, H]`: regimes of consecutive steps (of the given
  lengths), each a tight cluster around its own centre."""
  centres = _rand(seed, len(lengths), H) * 2.0
  k = jnp.repeat(centres, np.asarray(lengths), axis=0, total_repeat_length=sum(lengths))
  return (k + noise * _rand(seed + 1, sum(lengths), H))[None, :, None]


def test_group_attention_meets_the_papers_error_bound():
  """RITA's guarantee: keys within distance d of their group's centroid give weights within a
  factor exp(±2 s ‖q_i‖ d) of softmax attention's, and an output error at most
  (exp(2 s ‖q_i‖ d) - 1) max_j ‖v_j‖. The weights are read off with one-hot values (v = I_S);
  unequal group sizes make the log |g| term matter."""
  S, G, H = 24, 4, 8
  k = _clustered_keys(30, (3, 5, 7, 9), H=H, noise=0.02)
  q = _rand(32, 1, 5, 2, H)                                     # two query heads share the kv head
  out = _group(q, k, jnp.eye(S)[None, :, None, :], num_groups=G, num_iters=3)
  weights = np.asarray(out, np.float64)[0]                                         # [T, N, S]
  qn, kn = np.asarray(q, np.float64)[0], np.asarray(k, np.float64)[0, :, 0]        # [T,N,H], [S,H]
  s = H ** -0.5
  exact = _softmax(np.einsum("tnh,sh->tns", qn, kn) * s)
  onehot = np.asarray(_kmeans(k, jnp.ones((1, S), bool), G, 3), np.float64)[0, :, 0]
  assert sorted(onehot.sum(0)) == [3, 5, 7, 9]                   # k-means found the regimes
  centroids = (onehot.T @ kn) / onehot.sum(0)[:, None]                             # [G, H]
  d = np.max(np.linalg.norm(kn - onehot @ centroids, axis=-1))
  slack = 2 * s * np.linalg.norm(qn, axis=-1) * d                                  # [T, N]
  assert np.max(slack) < 0.5                                     # a bound that means something
  ratio = weights / exact
  rtol = F32["rtol"]
  assert np.all(ratio <= np.exp(slack)[..., None] * (1 + rtol))
  assert np.all(ratio >= np.exp(-slack)[..., None] * (1 - rtol))
  assert np.max(np.abs(ratio - 1)) > 1e-3                        # the groups really are coarser
  v = _rand(33, 1, S, 1, 6)
  vn = np.asarray(v, np.float64)[0, :, 0]
  out = np.asarray(_group(q, k, v, num_groups=G, num_iters=3), np.float64)[0]
  err = np.linalg.norm(out - np.einsum("tns,sh->tnh", exact, vn), axis=-1)
  assert np.all(err <= (np.exp(slack) - 1) * np.max(np.linalg.norm(vn, axis=-1)) + F32["atol"])


def test_group_attention_error_shrinks_with_more_groups_on_clustered_keys():
  k = _clustered_keys(30, (2, 3, 4, 4, 5, 6))
  q, v = _rand(32, 1, 5, 1, 8), _rand(33, 1, 24, 1, 6)
  exact = aj.dot_product_attention(q, k, v)
  err = {G: tolerances.rel_rms(_group(q, k, v, num_groups=G, num_iters=4), exact)
         for G in (1, 3, 6, 24)}
  assert err[1] > err[3] > err[6] > err[24]
  assert err[6] < 0.05 and err[24] < 1e-5


def test_group_attention_equals_size_weighted_centroid_form():
  q, k, v = _qkv(T=7, S=30)
  out = _group(q, k, v, num_groups=5, num_iters=3)
  onehot = np.asarray(_kmeans(k, jnp.ones((2, 30), bool), 5, 3), np.float64)
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  n = onehot.sum(1)                                                                # [B, K, G]
  cent = np.einsum("bskg,bskh->bgkh", onehot, kn) / np.maximum(n, 1).transpose(0, 2, 1)[..., None]
  vsum = np.einsum("bskg,bskh->bgkh", onehot, vn)                                 # Σ_{j∈g} v_j
  e = np.exp(np.einsum("btnh,bgnh->bntg", qn, cent.repeat(2, axis=2)) * 8 ** -0.5)
  n4 = n.repeat(2, axis=1)[:, :, None, :]
  expected = np.einsum("bntg,bgnh->btnh", e, vsum.repeat(2, axis=2)) / (e * n4).sum(-1).transpose(
      0, 2, 1)[..., None]
  chex.assert_trees_all_close(out, expected.astype(np.float32), **F32)


@pytest.mark.slow
def test_group_attention_padding_equals_truncated_keys_and_empty_rows_are_zero():
  q, k, v = _qkv(T=6, S=20)
  padded = low_rank.group_attention(q, k, v, num_groups=4, kv_lengths=jnp.array([20, 13]))
  alone = low_rank.group_attention(q[1:], k[1:, :13], v[1:, :13], num_groups=4)
  chex.assert_trees_all_close(padded[1], alone[0], **F32)
  empty = low_rank.group_attention(q, k, v, num_groups=4, kv_lengths=jnp.array([0, 3]))
  assert float(jnp.max(jnp.abs(empty[0]))) == 0.0


def test_group_attention_cost_is_linear_in_length():
  T, S = 127, 263
  q, k, v = _qkv(T=T, S=S, B=1)
  fn = lambda q, k, v: low_rank.group_attention(q, k, v, num_groups=8, implementation="reference")
  assert not _has_t_by_s(_shapes(fn, q, k, v), T, S)


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
  assert np.all(np.abs(mean - expected) <= 5 * sd / np.sqrt(draws) + 1e-6)
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
  assert float(jnp.max(jnp.abs(sampled[0] - exact))) > 1e-3        # a key reached the mechanism
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


# --------------------------------------------------------------------------------------------------
# Flax layer


@pytest.mark.parametrize("name", ["linformer_attention", "agent_attention", "group_attention",
                                  "yoso_attention"])
def test_usable_by_name_in_multi_head_attention(name):
  layer = aj.nn.MultiHeadAttention(num_heads=4, num_kv_heads=2, mechanism=name, head_dim=8)
  x = _rand(50, 2, 12, 16)
  params = layer.init(jax.random.PRNGKey(0), x)
  out = layer.apply(params, x)
  chex.assert_shape(out, (2, 12, 16))
  chex.assert_tree_all_finite(out)
  assert isinstance(layer, nn.Module)
