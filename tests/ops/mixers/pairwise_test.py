"""Causal pairwise mixer (#134, arXiv:2406.10906): a float64 rewrite of the paper's equation,
its defining dependence (token and predecessor, older tokens only through the running mean),
packed runs, the recurrent decoding state, and that it reads only the values v.

The contract itself (shapes, dtypes, patterns, implementations agreeing, decode, packing, batch
independence, the inputs each reads) is checked for every registered mechanism by tests/conformance.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.ops.mixers.pairwise import causal_pairwise_mixer
from tests import inputs
from tests import tolerances
from tests.ops.mixers import mixer_checks

TOL = tolerances.output(jnp.float32)


def _pairwise_params(seed, *, N, h):
  return dict(pairwise_current=0.5 * mixer_checks.normal(seed, (N, h, h)),
              pairwise_previous=0.5 * mixer_checks.normal(seed + 1, (N, h, h)),
              pairwise_context=0.5 * mixer_checks.normal(seed + 2, (N, h, h)),
              pairwise_bias=0.1 * mixer_checks.normal(seed + 3, (N, h)))


def _jacobian_tj(fn, v):
  """max |∂y_t / ∂v_j| over heads and channels: `[t, j]` (batch row 0)."""
  jac = np.asarray(jax.jit(jax.jacobian(fn))(v))[0, :, :, :, 0]  # [t, n, c, j, k, c']
  return np.abs(jac).max(axis=(1, 2, 4, 5))


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_pairwise_equals_a_float64_rewrite_of_the_paper(impl):
  """y_t = GELU(v_t A + v_{t-1} B + m_t C + b), m_t the mean of v_1..v_t, per query head (GQA:
  two query heads share a value head, each with its own A, B, C, b), in a float64 loop."""
  T, N, K, h = 7, 4, 2, 3
  q, k, v = inputs.qkv(B=2, T=T, N=N, K=K, H=5, h=h, seed=4, key_per_array=True)
  params = _pairwise_params(2, N=N, h=h)
  out = jax.jit(lambda v: causal_pairwise_mixer(q, k, v, implementation=impl,
                                              **params))(v)
  A, Bp, C, b = (np.asarray(params[n], np.float64) for n in (
      "pairwise_current", "pairwise_previous", "pairwise_context", "pairwise_bias"))
  x = np.asarray(v, np.float64)
  want = np.zeros((2, T, N, h))
  for n in range(N):
    for t in range(T):
      cur, mean = x[:, t, n // 2], x[:, :t + 1, n // 2].mean(axis=1)
      prev = x[:, t - 1, n // 2] if t else np.zeros_like(cur)
      pre = cur @ A[n] + prev @ Bp[n] + mean @ C[n] + b[n]
      want[:, t, n] = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre ** 3)))
  np.testing.assert_allclose(out, want, **TOL)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_pairwise_output_depends_only_on_token_and_predecessor(impl):
  T, N, h = 8, 2, 3
  q, k, v = inputs.qkv(B=1, T=T, N=N, K=N, H=2, h=h, key_per_array=True)
  params = _pairwise_params(0, N=N, h=h)
  fn = lambda v: aj.attention("causal_pairwise_mixer", q, k, v, causal=True, use_context=False,
                              implementation=impl, **params)
  dep = _jacobian_tj(fn, v)
  t, j = np.meshgrid(np.arange(T), np.arange(T), indexing="ij")
  pair = (j == t) | (j == t - 1)
  assert np.all(dep[~pair] == 0)
  assert np.all(dep[pair] > 0)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_pairwise_context_enters_only_through_the_running_mean(impl):
  T, N, h = 8, 2, 3
  q, k, v = inputs.qkv(B=1, T=T, N=N, K=N, H=2, h=h, seed=3, key_per_array=True)
  params = _pairwise_params(1, N=N, h=h)
  fn = lambda v: aj.attention("causal_pairwise_mixer", q, k, v, causal=True, implementation=impl,
                              **params)
  jac = np.asarray(jax.jit(jax.jacobian(fn))(v))[0, :, :, :, 0]  # [t, n, c, j, k, c']
  dep = np.abs(jac).max(axis=(1, 2, 4, 5))
  assert np.all(dep[np.triu_indices(T, 1)] == 0)                # never the future
  for t in range(3, T):
    # Tokens before the predecessor are seen only through m_t, which weighs them all equally.
    older = jac[t, :, :, :t - 1]
    assert np.abs(older).max() > 0
    np.testing.assert_allclose(older, np.broadcast_to(older[:, :, :1], older.shape), **TOL)


def test_pairwise_packed_run_start_has_no_predecessor():
  T, N, h = 8, 2, 3
  q, k, v = inputs.qkv(B=1, T=T, N=N, K=N, H=2, h=h, key_per_array=True)
  seg = jnp.array([[0, 0, 0, 1, 1, 1, 1, 1]])
  fn = lambda v: aj.attention("causal_pairwise_mixer", q, k, v, causal=True, segment_ids=seg,
                              **_pairwise_params(0, N=N, h=h))
  dep = _jacobian_tj(fn, v)
  assert np.all(dep[3:, :3] == 0)      # the second run never sees the first
  assert np.all(dep[:3, 3:] == 0)


def test_pairwise_recurrent_state_is_the_last_value_and_running_sum():
  """Decoding carries (v_{t-1}, Σ v, count): 2·K·h + 1 numbers whatever the length, and each
  step gives the full forward's row."""
  T, N, K, h = 9, 4, 2, 3
  q, k, v = inputs.qkv(B=2, T=T, N=N, K=K, H=5, h=h, key_per_array=True)
  params = _pairwise_params(3, N=N, h=h)
  full = causal_pairwise_mixer(q, k, v, **params)
  step = jax.jit(lambda q, k, v, state: causal_pairwise_mixer(
      q, k, v, initial_state=state, return_final_state=True, **params))
  state, outs = None, []
  for t in range(T):
    out, state = step(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], state)
    outs.append(out)
    chex.assert_trees_all_close(state["previous"], v[:, t], **TOL)
    chex.assert_trees_all_close(state["sum"], jnp.sum(v[:, :t + 1], axis=1), **TOL)
    assert sum(x.size for x in jax.tree.leaves(state)) == 2 * (2 * K * h + 1)
  chex.assert_trees_all_close(jnp.concatenate(outs, axis=1), full, **TOL)
  with pytest.raises(ValueError, match="new tokens only"):
    causal_pairwise_mixer(q, k, v, kv_lengths=jnp.array([3, 4]), return_final_state=True,
                        **params)
  with pytest.raises(ValueError, match=r"initial_state\['sum'\]"):
    causal_pairwise_mixer(q, k, v, return_final_state=True, **params,
                        initial_state={**state, "sum": jnp.zeros((2, N, h))})


def test_reads_only_the_values_and_rejects_a_scale():
  mixer_checks.check_reads_only_values_and_rejects_scale("causal_pairwise_mixer")


def test_signature_shapes_hold_under_jaxtyped():
  mixer_checks.check_signature_shapes("causal_pairwise_mixer")
