"""Agent attention: equals its generalized linear attention form at a cost linear in T."""

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
# Agent attention


def test_adaptive_pool_bins_match_adaptive_avg_pool():
  w = np.asarray(low_rank.adaptive_pool_weights(jnp.array([10]), 4, 12))[0]
  # AdaptiveAvgPool1d(4) on 10 positions: [0, 3), [2, 5), [5, 8), [7, 10); 2 padded positions
  # unused.
  for row, (a, b) in zip(w, [(0, 3), (2, 5), (5, 8), (7, 10)], strict=True):
    expected = np.zeros(12)
    expected[a:b] = 1 / (b - a)
    np.testing.assert_allclose(row, expected, **tolerances.ELEMENTWISE[jnp.float32])


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
  phi_k = numpy_math.softmax(np.einsum("binh,bsnh->bnis", agents, kn) * s + bias_k)          # [B,N,n,S]
  phi_q = numpy_math.softmax(np.einsum("btnh,binh->bnti", qn, agents) * s + np.swapaxes(bias_q, 1, 2))
  weights = np.einsum("bnti,bnis->bnts", phi_q, phi_k)                              # [B,N,T,S]
  np.testing.assert_allclose(weights.sum(-1), 1.0, **tolerances.FLOAT64_WEIGHT_SUM)
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
