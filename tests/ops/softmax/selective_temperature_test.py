"""Selective self-attention (#48): softmax(τ_q(i) · logits) with values scaled by τ_v(j), where
τ = 1 + σ(α) log n + tanh(u · token embedding), checked against a float64 rewrite (outputs, and
gradients against a dense form); its defining properties: temperatures of exactly 1 give softmax,
the query temperature grows with the row length as 1 + σ(α) log n (measured from the weights), and
the query's own embedding sets how spiky its row is."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.softmax import selective_temperature_attention, softmax_attention
from tests import inputs
from tests import tolerances

F32 = tolerances.output(jnp.float32)
B, T, N, K, H, h = 2, 13, 4, 2, 8, 6


def _params(seed, *, with_values=True):
  keys = jax.random.split(jax.random.PRNGKey(seed), 4)
  out = {"query_token_weight": 0.5 * jax.random.normal(keys[0], (N, H)),
         "query_position_logit": jax.random.normal(keys[1], (N,))}
  if with_values:
    out.update(value_token_weight=0.5 * jax.random.normal(keys[2], (K, h)),
               value_position_logit=jax.random.normal(keys[3], (K,)))
  return out


def _ssa_float64(q, k, v, params, *, causal, scale):
  """The temperatures and the attention, one query row at a time, in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  p = {key: np.asarray(x, np.float64) for key, x in params.items()}
  sig = lambda x: 1.0 / (1.0 + np.exp(-x))
  # Values: position j has m = j + 1; u_v · v_j per key/value head.
  v_scaled = v.copy()
  if "value_token_weight" in p:
    for j in range(v.shape[1]):
      for kv in range(v.shape[2]):
        tau_v = (1.0 + sig(p["value_position_logit"][kv]) * np.log(j + 1)
                 + np.tanh(v[:, j, kv] @ p["value_token_weight"][kv]))
        v_scaled[:, j, kv] = v[:, j, kv] * tau_v[:, None]
  G = q.shape[2] // k.shape[2]
  out = np.zeros(q.shape[:3] + (v.shape[3],))
  for n in range(q.shape[2]):
    for i in range(q.shape[1]):
      seen = i + 1 if causal else k.shape[1]              # the row's length n_i
      tau = (1.0 + sig(p["query_position_logit"][n]) * np.log(seen)
             + np.tanh(q[:, i, n] @ p["query_token_weight"][n]))
      s = tau[:, None] * scale * np.einsum("bh,bsh->bs", q[:, i, n], k[:, :seen, n // G])
      w = np.exp(s - s.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      out[:, i, n] = np.einsum("bs,bsh->bh", w, v_scaled[:, :seen, n // G])
  return out


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("causal", [False, True])
def test_equals_the_papers_equations(implementation, causal):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=1)
  params = _params(2)
  fn = inputs.jit_with(selective_temperature_attention, causal=causal,
                       implementation=implementation)
  out = fn(q, k, v, **params)
  want = _ssa_float64(q, k, v, params, causal=causal, scale=H ** -0.5)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_gradients_match_a_dense_form(implementation):
  q, k, v = inputs.qkv(B=1, T=9, S=9, N=2, K=1, H=4, h=3, seed=3)
  dout = inputs.qkv(B=1, T=9, S=9, N=2, K=1, H=3, h=3, seed=4)[0]
  keys = jax.random.split(jax.random.PRNGKey(5), 4)
  params = (0.5 * jax.random.normal(keys[0], (2, 4)), jax.random.normal(keys[1], (2,)),
            0.5 * jax.random.normal(keys[2], (1, 3)), jax.random.normal(keys[3], (1,)))

  def dense(q, k, v, uq, aq, uv, av):
    pos = jnp.arange(9.0)
    tau_q = (1.0 + jax.nn.sigmoid(aq)[None, :, None] * jnp.log(pos + 1.0)
             + jnp.tanh(jnp.einsum("btnh,nh->bnt", q, uq)))
    tau_v = (1.0 + jax.nn.sigmoid(av)[None, None] * jnp.log(pos + 1.0)[None, :, None]
             + jnp.tanh(jnp.einsum("bskh,kh->bsk", v, uv)))
    kr, vr = jnp.repeat(k, 2, axis=2), jnp.repeat(v * tau_v[..., None], 2, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, kr) * 0.5 * tau_q[..., None]
    w = jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((9, 9), bool)), s, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", w, vr)

  op = lambda q, k, v, uq, aq, uv, av: selective_temperature_attention(
      q, k, v, query_token_weight=uq, query_position_logit=aq, value_token_weight=uv,
      value_position_logit=av, causal=True, implementation=implementation)
  inputs.assert_same_gradients(op, dense, (q, k, v, *params), dout,
                               ("dq", "dk", "dv", "duq", "daq", "duv", "dav"),
                               tol=tolerances.grad(jnp.float32))


@pytest.mark.parametrize("causal", [False, True])
def test_temperatures_of_one_give_softmax(causal):
  # u = 0: tanh(0) = 0; α = -inf: σ(α) = 0. Then τ_q = τ_v = 1 at every position.
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=6)
  out = inputs.jit_with(selective_temperature_attention, causal=causal)(
      q, k, v, query_token_weight=jnp.zeros((N, H)), query_position_logit=jnp.full((N,), -jnp.inf),
      value_token_weight=jnp.zeros((K, h)), value_position_logit=jnp.full((K,), -jnp.inf))
  want = inputs.jit_with(softmax_attention, causal=causal)(q, k, v)
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), **F32)


def test_query_temperature_grows_as_log_of_the_row_length():
  # One-hot values make the output row the weight row; log w_ij - log w_i0 = τ_i (s_ij - s_i0), so
  # the ratio to the raw logit gaps recovers τ_i, which must be 1 + σ(α) log(i + 1), increasing.
  S = 12
  q, k, _ = inputs.qkv(B=1, T=S, S=S, N=1, K=1, H=4, seed=7)
  v = jnp.eye(S)[None, :, None, :]
  alpha = 0.7
  w = np.asarray(inputs.jit_with(selective_temperature_attention, causal=True, scale=1.0)(
      q, k, v, query_token_weight=jnp.zeros((1, 4)), query_position_logit=jnp.array([alpha])),
      np.float64)[0, :, 0]
  s = np.einsum("th,sh->ts", np.asarray(q, np.float64)[0, :, 0], np.asarray(k, np.float64)[0, :, 0])
  i = np.arange(1, S)
  j = np.argmax(np.abs(s[i] - s[i, :1]) * np.tril(np.ones((S, S)), 0)[i], axis=1)  # a clear gap
  tau = (np.log(w[i, j]) - np.log(w[i, 0])) / (s[i, j] - s[i, 0])
  want = 1.0 + np.log(i + 1.0) / (1.0 + np.exp(-alpha))
  np.testing.assert_allclose(tau, want, **tolerances.ELEMENTWISE[jnp.float32])
  assert np.all(np.diff(tau) > 0)


def test_the_query_embedding_sets_its_rows_spikiness():
  # τ_tok = tanh(u · q_i): a query along u gets τ > 1 (sharper row than softmax), one against u
  # τ < 1 (flatter): the entropy of the row orders accordingly.
  q, k, v = inputs.qkv(B=1, T=1, S=10, N=1, K=1, H=4, h=10, seed=8)
  v = jnp.eye(10)[None, :, None, :]
  u = 2.0 * q[0, 0] / jnp.linalg.norm(q[0, 0])
  ssa = inputs.jit_with(selective_temperature_attention, scale=1.0)
  row = lambda u: np.asarray(ssa(q, k, v, query_token_weight=u,
                                 query_position_logit=jnp.array([-jnp.inf])))[0, 0, 0]
  entropy = lambda w: float(-np.sum(w * np.log(w)))
  sharp, flat = row(u), row(-u)
  plain = np.asarray(inputs.jit_with(softmax_attention, scale=1.0)(q, k, v))[0, 0, 0]
  assert entropy(sharp) < entropy(plain) < entropy(flat)


def test_decode_over_a_cache_equals_the_full_forward():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h, seed=9)
  params = _params(10)
  fn = inputs.jit_with(selective_temperature_attention, causal=True)
  full = fn(q, k, v, **params)
  t = 8   # one query over a cache filled up to it; later slots hold garbage
  garbage = lambda x: x.at[:, t + 1:].set(1e4)
  step = fn(q[:, t:t + 1], garbage(k), garbage(v), q_offset=jnp.int32(t),
            kv_lengths=jnp.full((B,), t + 1), **params)
  np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(full[:, t]), **F32)


def test_bad_input_is_a_clear_error():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=h)
  params = _params(0)
  with pytest.raises(ValueError, match=r"selective_temperature_attention.*query_token_weight.*\[N, H\]"):
    selective_temperature_attention(q, k, v, **{**params, "query_token_weight": jnp.zeros((K, H))})
  with pytest.raises(ValueError, match="value_position_logit"):
    selective_temperature_attention(q, k, v, **{**params, "value_position_logit": None})
