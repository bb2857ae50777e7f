"""RITA group attention: one group per key is softmax; the paper's error bound holds."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.ops import low_rank
from tests import numpy_math
from tests import tolerances
from tests.ops.low_rank.common import has_t_by_s as _has_t_by_s
from tests.ops.low_rank.common import qkv as _qkv
from tests.ops.low_rank.common import rand as _rand
from tests.ops.low_rank.common import shapes as _shapes

F32 = tolerances.output(jnp.float32)


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
  exact = numpy_math.softmax(np.einsum("tnh,sh->tns", qn, kn) * s)
  onehot = np.asarray(_kmeans(k, jnp.ones((1, S), bool), G, 3), np.float64)[0, :, 0]
  assert sorted(onehot.sum(0)) == [3, 5, 7, 9]                   # k-means found the regimes
  centroids = (onehot.T @ kn) / onehot.sum(0)[:, None]                             # [G, H]
  d = np.max(np.linalg.norm(kn - onehot @ centroids, axis=-1))
  slack = 2 * s * np.linalg.norm(qn, axis=-1) * d                                  # [T, N]
  assert np.max(slack) < tolerances.GROUPING_SLACK_MAX             # a bound that means something
  ratio = weights / exact
  rtol = F32["rtol"]
  assert np.all(ratio <= np.exp(slack)[..., None] * (1 + rtol))
  assert np.all(ratio >= np.exp(-slack)[..., None] * (1 - rtol))
  assert np.max(np.abs(ratio - 1)) > tolerances.CHANGED_MAX_REL    # the groups really are coarser
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
  assert err[6] < tolerances.CLUSTER_GROUPS_REL_RMS
  assert err[24] < tolerances.REL_RMS[jnp.float32]                 # one key per group: softmax


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
