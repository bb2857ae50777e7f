"""Triple attention (#178): the paper's pair-softmax checked against a float64 loop rewrite (with
distinct second keys / values and with the k' = k, v' = v default), its weights form one
distribution over the visible key pairs of each query, and one trained triple layer fits a target
built from pairs of tokens (y = mean_{j,l} x_j ⊙ x_l at every query) that one softmax layer of the
same size provably cannot (its output is odd in x, the target even)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import attnjax.ops.theory  # noqa: F401  (registers the mechanism until attnjax.ops imports it)
from attnjax.ops.softmax import softmax_attention
from attnjax.ops.theory import triple_attention
from tests import inputs
from tests import tolerances

F32 = tolerances.output(jnp.float32)


def _triple_loop(q, k, v, k2, v2, *, causal, scale):
  """Explicit loops over queries and key pairs in float64."""
  q, k, v, k2, v2 = (np.asarray(x, np.float64) for x in (q, k, v, k2, v2))
  B, T, N, _ = q.shape
  S, K = k.shape[1], k.shape[2]
  out = np.zeros((B, T, N, v.shape[-1]))
  for b, n, t in itertools.product(range(B), range(N), range(T)):
    kh = n // (N // K)
    keys = range(t + 1) if causal else range(S)
    pairs = [(j, l) for j in keys for l in keys]
    s = np.array([scale * np.sum(q[b, t, n] * k[b, j, kh] * k2[b, l, kh]) for j, l in pairs])
    w = np.exp(s - s.max())
    w /= w.sum()
    out[b, t, n] = sum(wi * v[b, j, kh] * v2[b, l, kh] for wi, (j, l) in zip(w, pairs, strict=True))
  return out


@pytest.mark.parametrize("causal", [False, True])
def test_equals_the_loop_rewrite(causal):
  q, k, v = inputs.qkv(B=1, T=5, N=2, K=1, H=3, h=2, seed=4)
  _, k2, v2 = inputs.qkv(B=1, T=5, N=2, K=1, H=3, h=2, seed=9)
  out = inputs.jit_with(triple_attention, causal=causal, scale=0.7)(q, k, v, k2=k2, v2=v2)
  want = _triple_loop(q, k, v, k2, v2, causal=causal, scale=0.7)
  np.testing.assert_allclose(np.asarray(out), want, **F32)
  # Default second keys / values: k' = k, v' = v.
  out = triple_attention(q, k, v, causal=causal, scale=0.7)
  np.testing.assert_allclose(np.asarray(out), _triple_loop(q, k, v, k, v, causal=causal, scale=0.7),
                             **F32)


def test_weights_sum_to_one_over_visible_pairs():
  # With all-ones second values, the output is Σ_{j,l} w_jl v_j; with one-hot v_j it is the pair
  # weights summed over l, and summing it over j gives the row total Σ_{j,l} w_jl.
  q, k, _ = inputs.qkv(B=2, T=6, N=2, K=2, H=4, seed=2)
  S = 6
  v = jnp.broadcast_to(jnp.eye(S)[None, :, None, :], (2, S, 2, S))
  ones = jnp.ones_like(v)
  lengths = jnp.array([6, 4])
  marg = np.asarray(triple_attention(q, k, v, v2=ones, causal=True, kv_lengths=lengths))
  t = np.arange(6)
  rows = marg.sum(-1)  # [B, T, N]
  np.testing.assert_allclose(rows[0], 1.0, **F32)
  np.testing.assert_allclose(rows[1, :4], 1.0, **F32)
  # Keys beyond the causal position or the length get no mass.
  for b, L in enumerate((6, 4)):
    for i in range(6):
      np.testing.assert_array_equal(marg[b, i, :, t[(t > i) | (t >= L)]], 0.0)


def _fit(attention, steps=300, seed=0):
  """Trains one attention layer (q, k, v projections d×d, no bias) on y = mean_{j,l} x_j ⊙ x_l,
  a function of pairs of tokens read at every query: it returns the final test MSE and E[y²]."""
  B, T, d = 64, 5, 4
  kx, kt, kp = jax.random.split(jax.random.PRNGKey(seed), 3)

  def batch(key):
    x = jax.random.normal(key, (B, T, d))
    y = jnp.broadcast_to(jnp.mean(x, 1, keepdims=True) ** 2, x.shape)
    return x, y

  params = {n: 0.3 * jax.random.normal(k_, (d, d)) for n, k_ in
            zip("qkv", jax.random.split(kp, 3), strict=True)}

  def loss(p, x, y):
    proj = lambda w: (x @ w)[:, :, None]  # noqa: E731  [B, T, 1, d]
    out = attention(proj(p["q"]), proj(p["k"]), proj(p["v"]))[:, :, 0]
    return jnp.mean((out - y) ** 2)

  opt = optax.adam(3e-2)

  @jax.jit
  def step(p, s, key):
    x, y = batch(key)
    g = jax.grad(loss)(p, x, y)
    u, s = opt.update(g, s)
    return optax.apply_updates(p, u), s

  state = opt.init(params)
  for key in jax.random.split(kx, steps):
    params, state = step(params, state, key)
  x, y = batch(kt)
  return float(loss(params, x, y)), float(jnp.mean(y ** 2))


def test_triple_attention_learns_a_pair_product_that_softmax_cannot():
  # Under x -> -x the softmax layer's scores are unchanged and its values flip, so its output is odd in
  # x while the target is even: its best error is E[y²]. Triple attention's values v_j ⊙ v_l are even.
  triple_mse, baseline = _fit(triple_attention)
  softmax_mse, _ = _fit(softmax_attention)
  assert softmax_mse > 0.8 * baseline
  assert triple_mse < 0.1 * baseline
