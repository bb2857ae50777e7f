"""Forgetting attention (#77): the paper's logits + Σ_{l=j+1..i} log f_l, checked against a float64
rewrite, with its defining properties: gates of 1 give causal softmax exactly, gates below 1 decay a key
by exactly the sum of the log gates between it and the query, and a constant gate is ALiBi's linear
bias (no positions needed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.softmax import alibi_attention, forgetting_attention, softmax_attention
from tests import inputs
from tests import tolerances

F32 = tolerances.output(jnp.float32)
B, T, N, K, H, h = 2, 13, 4, 2, 8, 6


def _log_forget(seed, shape=(B, T, N)):
  # Gates spread over (0, 1): log σ of a wide normal, some near 0 (forget) and some near 1 (keep).
  return jax.nn.log_sigmoid(2.0 * jax.random.normal(jax.random.PRNGKey(seed), shape) + 1.0)


def _fox_float64(q, k, v, log_forget, scale):
  """The paper's equations per head in float64: D_ij = Σ_{l=j+1..i} log f_l, causal softmax."""
  q, k, v, lf = (np.asarray(x, np.float64) for x in (q, k, v, log_forget))
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) * scale
  L = s.shape[-1]
  D = np.full((q.shape[0], q.shape[2], L, L), -np.inf)
  for i in range(L):
    for j in range(i + 1):
      D[:, :, i, j] = lf[:, j + 1:i + 1, :].sum(axis=1)
  z = s + D
  w = np.exp(z - z.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  return np.einsum("bnts,bsnh->btnh", w, v)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_equals_the_papers_equations(implementation):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=1)
  lf = _log_forget(2)
  out = inputs.jit_with(forgetting_attention, implementation=implementation)(q, k, v, log_forget=lf)
  np.testing.assert_allclose(np.asarray(out), _fox_float64(q, k, v, lf, H ** -0.5), **F32)


def test_gates_of_one_give_causal_softmax():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=3)
  out = forgetting_attention(q, k, v, log_forget=jnp.zeros((B, T, N)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(softmax_attention(q, k, v, causal=True)),
                             **F32)


def test_constant_gate_is_alibi():
  # log f = -m_n for every token: D_ij = -m_n (i - j), ALiBi's causal bias with slopes m.
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=4)
  slopes = jnp.array([0.5, 0.25, 0.125, 1.0])
  out = forgetting_attention(q, k, v, log_forget=jnp.broadcast_to(-slopes, (B, T, N)))
  want = alibi_attention(q, k, v, causal=True, slopes=slopes)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), **F32)


def test_weights_decay_by_the_log_gates_between_key_and_query():
  # Zero queries: every logit is 0, so the weights are softmax_j(D_ij) with D_ij = c_i - c_j, and
  # one-hot values make the output row the weight row: log w_ij - log w_ii = c_i - c_j exactly.
  q = jnp.zeros((1, T, 1, 4))
  k = jax.random.normal(jax.random.PRNGKey(5), (1, T, 1, 4))
  v = jnp.eye(T)[None, :, None, :]
  lf = _log_forget(6, (1, T, 1))
  w = np.asarray(forgetting_attention(q, k, v, log_forget=lf), np.float64)[0, :, 0]
  c = np.cumsum(np.asarray(lf, np.float64)[0, :, 0])
  i = T - 1
  np.testing.assert_allclose(np.log(w[i, :i]) - np.log(w[i, i]), c[i] - c[:i], **F32)
  assert np.all(np.diff(w[i]) > 0)                       # every gate < 1: older keys weigh less
  assert np.all(w[np.triu_indices(T, 1)] == 0.0)         # causal


def test_decode_with_cached_gates_equals_the_full_forward():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=7)
  lf = _log_forget(8)
  full = forgetting_attention(q, k, v, log_forget=lf)
  t = 9  # one query over a cache filled up to it; later slots hold garbage gates
  garbage_lf = lf.at[:, t + 1:].set(-1e4)
  step = forgetting_attention(q[:, t:t + 1], k, v, log_forget=garbage_lf, q_offset=t,
                              kv_lengths=jnp.full((B,), t + 1))
  np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(full[:, t]), **F32)


def test_bad_input_is_a_clear_error():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h)
  with pytest.raises(ValueError, match=r"log_forget.*\[B, S, N\]"):
    forgetting_attention(q, k, v, log_forget=jnp.zeros((B, T, K)))
  with pytest.raises(ValueError, match="causal"):
    forgetting_attention(q, k, v, log_forget=jnp.zeros((B, T, N)), causal=False)
