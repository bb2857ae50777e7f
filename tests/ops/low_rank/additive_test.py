"""SwiftFormer and Ladaformer additive attention: each paper's defining computation and its claims.

Both papers claim a cost linear in the number of tokens (no `[T, T]` query-key matrix): checked on
the traced program. Each operator is tied to its paper's formula written out in float64 numpy
(SwiftFormer: unit q, k, scores L2-normalised over the tokens, `Q̂ + T(g ⊙ K̂)` with `v = q`, and the
softmax reading as an option; Ladaformer: softmax-pooled global query, `v ⊙ k ⊙ g`); packed
sequences pool within their own run and padding neither enters the pool nor gets an output.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.ops.low_rank import additive
from tests import inputs
from tests import tolerances
from tests.ops.low_rank import common
from tests.ops.low_rank.common import rand as _rand

F32 = tolerances.output(jnp.float32)


def _qkv8(T, B=2, h=8):
  """Self-attention inputs `common.qkv` with S = T and value width h = 8 (this file's sizes)."""
  return common.qkv(T=T, S=T, B=B, h=h)


def _swift_params(N=4, H=8, h=8, seed=10):
  return dict(score_vector=_rand(seed, N, H), proj=_rand(seed + 1, N, H, h) / 3,
              proj_bias=_rand(seed + 2, N, h) * 0.1)


def _softmax_pool(q, logits):
  """g = Σ_t softmax_t(logits) q_t, per batch and head: q [B, T, N, H], logits [B, T, N]."""
  a = np.exp(logits - logits.max(1, keepdims=True))
  a = a / a.sum(1, keepdims=True)
  return np.einsum("btn,btnh->bnh", a, q)


def _max_square_axes(fn, T, *args):
  """Largest number of axes of length T in any intermediate of `fn(*args)` (sub-jaxprs included)."""
  return max(sum(d == T for d in shape) for shape in inputs.intermediate_shapes(fn, *args))


# --------------------------------------------------------------------------------------------------
# SwiftFormer (#89)


def _unit64(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _swift_paper(q, k, v, p):
  """The paper's equations in float64, per head: Q̂, K̂ (and the residual V̂) unit per token,
  α = Q̂ w_a / √d L2-normalised over the tokens, g = Σ α_i Q̂_i, x̂ = V̂ + T(g ⊙ K̂)."""
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  G = qn.shape[2] // kn.shape[2]
  qn, kn, vn = _unit64(qn), _unit64(kn.repeat(G, axis=2)), _unit64(vn.repeat(G, axis=2))
  w, W, b = (np.asarray(p[n], np.float64) for n in ("score_vector", "proj", "proj_bias"))
  alpha = np.einsum("btnh,nh->btn", qn, w) / np.sqrt(qn.shape[-1])
  alpha = alpha / np.linalg.norm(alpha, axis=1, keepdims=True)
  g = np.einsum("btn,btnh->bnh", alpha, qn)
  return np.einsum("btnh,nhd->btnd", g[:, None] * kn, W) + b + vn


def test_swiftformer_default_is_the_papers_l2_pooled_form():
  q, k, v = _qkv8(T=13)
  p = _swift_params()
  out = additive.efficient_additive_attention(q, k, v, **p)
  chex.assert_trees_all_close(out, _swift_paper(q, k, v, p).astype(np.float32), **F32)
  # Paper: x̂ = Q̂ + T(g ⊙ K̂): the residual is the token's own normalised query when v = q.
  k_full = jnp.repeat(k, 2, axis=2)
  paper = additive.efficient_additive_attention(q, k_full, q, **p)
  chex.assert_trees_all_close(paper, _swift_paper(q, k_full, q, p).astype(np.float32), **F32)


def test_swiftformer_l2_pooling_has_no_softmax_and_ignores_query_length_and_score_scale():
  """α / ‖α‖ cancels a positive scale of w_a, and unit queries ignore each token's length (a
  softmax pool would change with both); negating w_a flips g, which a softmax cannot do."""
  q, k, v = _qkv8(T=9)
  p = _swift_params()
  out = additive.efficient_additive_attention(q, k, v, **p)
  lengths = jnp.exp(_rand(4, 2, 9, 4, 1))
  scaled = {**p, "score_vector": 7.0 * p["score_vector"]}
  chex.assert_trees_all_close(
      additive.efficient_additive_attention(q * lengths, k, v, **scaled), out, **F32)
  negated = {**p, "score_vector": -p["score_vector"]}
  flipped = additive.efficient_additive_attention(q, k, v, **negated)
  # o(-w) - b - v̂ = -(o(w) - b - v̂): the transform term is linear in g.
  residual = p["proj_bias"] + jnp.repeat(v / jnp.linalg.norm(v, axis=-1, keepdims=True), 2, 2)
  chex.assert_trees_all_close(flipped - residual, -(out - residual), **F32)
  softmax = additive.efficient_additive_attention(q, k, v, pooling="softmax", **p)
  assert tolerances.rel_rms(softmax, out) > tolerances.OTHER_FORMULA_REL_RMS


def test_swiftformer_softmax_option_equals_its_formula():
  q, k, v = _qkv8(T=13)
  p = _swift_params()
  out = additive.efficient_additive_attention(q, k, v, pooling="softmax", scale=0.3, **p)
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  kn, vn = kn.repeat(2, axis=2), vn.repeat(2, axis=2)
  w, W, b = (np.asarray(p[n], np.float64) for n in ("score_vector", "proj", "proj_bias"))
  g = _softmax_pool(qn, np.einsum("btnh,nh->btn", qn, w) * 0.3)                    # [B, N, H]
  want = np.einsum("btnh,nhd->btnd", g[:, None] * kn, W) + b + vn
  chex.assert_trees_all_close(out, want.astype(np.float32), **F32)


def test_swiftformer_scale_with_l2_pooling_and_unknown_pooling_are_errors():
  q, k, v = _qkv8(T=6)
  with pytest.raises(ValueError, match="`scale` has no effect with pooling='l2'"):
    additive.efficient_additive_attention(q, k, v, scale=0.5, **_swift_params())
  with pytest.raises(ValueError, match="unknown pooling 'max'"):
    additive.efficient_additive_attention(q, k, v, pooling="max", **_swift_params())


def test_swiftformer_has_no_token_by_token_matrix():
  T = 97
  q, k, v = _qkv8(T=T, B=1)
  p = _swift_params()
  fn = lambda q, k, v: additive.efficient_additive_attention(q, k, v, **p)
  assert _max_square_axes(fn, T, q, k, v) == 1


def test_swiftformer_softmax_global_query_is_a_convex_combination_of_queries():
  """pooling="softmax": with all-equal queries the pool returns that query, whatever w_a."""
  q0 = _rand(3, 1, 1, 4, 8)
  q = jnp.broadcast_to(q0, (1, 9, 4, 8))
  _, k, v = _qkv8(T=9, B=1)
  p = _swift_params()
  out = additive.efficient_additive_attention(q, k, v, pooling="softmax", **p)
  kn = jnp.repeat(k, 2, axis=2)
  want = jnp.einsum("btnh,nhd->btnd", q0 * kn, p["proj"]) + p["proj_bias"] + jnp.repeat(v, 2, 2)
  chex.assert_trees_all_close(out, want, **F32)


# --------------------------------------------------------------------------------------------------
# Ladaformer (#219)


def test_ladaformer_equals_its_formula():
  q, k, v = _qkv8(T=13)
  W = _rand(20, 4, 8, 4) / 4
  out = additive.linear_additive_attention(q, k, v, score_proj=W)
  qn, kn, vn = (np.asarray(x, np.float64) for x in (q, k, v))
  kn, vn = kn.repeat(2, axis=2), vn.repeat(2, axis=2)
  # One logit per head from the concatenated heads' queries (the authors' dense layer).
  logits = np.einsum("btnh,nhm->btm", qn, np.asarray(W, np.float64)) * 8 ** -0.5
  g = _softmax_pool(qn, logits)
  chex.assert_trees_all_close(out, (vn * kn * g[:, None]).astype(np.float32), **F32)


def test_ladaformer_has_no_token_by_token_matrix():
  T = 97
  q, k, v = _qkv8(T=T, B=1)
  W = _rand(20, 4, 8, 4) / 4
  fn = lambda q, k, v: additive.linear_additive_attention(q, k, v, score_proj=W)
  assert _max_square_axes(fn, T, q, k, v) == 1


def test_ladaformer_value_map_identity_is_the_paper_and_width_mismatch_is_an_error():
  q, k, v = _qkv8(T=13, h=8)
  W = _rand(20, 4, 8, 4) / 4
  eye = jnp.broadcast_to(jnp.eye(8), (4, 8, 8))
  chex.assert_trees_all_close(
      additive.linear_additive_attention(q, k, v, score_proj=W, value_map=eye),
      additive.linear_additive_attention(q, k, v, score_proj=W), **F32)
  with pytest.raises(ValueError, match="value_map"):
    additive.linear_additive_attention(q, k, v[..., :6], score_proj=W)


# --------------------------------------------------------------------------------------------------
# Shared: packing, padding, errors, the Flax layer.


def _both():
  W = _rand(20, 4, 8, 4) / 4
  return [("efficient_additive_attention", _swift_params()),
          ("linear_additive_attention", dict(score_proj=W))]


@pytest.mark.slow
@pytest.mark.parametrize("name, params", _both())
def test_padding_is_left_out_of_the_pool_and_returns_zeros(name, params):
  q, k, v = _qkv8(T=12)
  garbage = lambda x: x.at[1, 7:].set(1e4)
  out = aj.attention(name, q, garbage(k), garbage(v), kv_lengths=jnp.array([12, 7]), **params)
  alone = aj.attention(name, q[1:, :7], k[1:, :7], v[1:, :7], **params)
  chex.assert_trees_all_close(out[1, :7], alone[0], **F32)
  assert float(jnp.max(jnp.abs(out[1, 7:]))) == 0.0
  empty = lambda q: aj.attention(name, q, k, v, kv_lengths=jnp.array([0, 12]), **params)
  assert float(jnp.max(jnp.abs(empty(q)[0]))) == 0.0
  chex.assert_tree_all_finite(jax.grad(lambda q: jnp.sum(empty(q) ** 2))(q))


@pytest.mark.slow
@pytest.mark.parametrize("name, params", _both())
def test_interleaved_segment_ids_pool_within_each_id(name, params):
  """Equal ids need not be contiguous: a token pools every token with its id, wherever it is."""
  q, k, v = _qkv8(T=10, B=1)
  seg = jnp.array([[0, 1, 0, 0, 1, 1, 0, 1, 1, 0]])
  out = aj.attention(name, q, k, v, segment_ids=seg, **params)
  for s in (0, 1):
    idx = np.nonzero(np.asarray(seg[0]) == s)[0]
    alone = aj.attention(name, q[:, idx], k[:, idx], v[:, idx], **params)
    chex.assert_trees_all_close(out[:, idx], alone, **F32)


@pytest.mark.parametrize("name, params", _both())
def test_causal_and_cross_are_clear_errors(name, params):
  q, k, v = _qkv8(T=8)
  fn = getattr(additive, name)
  with pytest.raises(ValueError, match="causal"):
    fn(q, k, v, causal=True, **params)
  with pytest.raises(ValueError, match="self-attention only"):
    fn(q, k[:, :5], v[:, :5], **params)
  with pytest.raises(ValueError, match="unknown implementation"):
    fn(q, k, v, implementation="pallas_gpu", **params)
