"""Comateformer's compositional quasi-attention (#124): weights tanh(α·scale·q·k) · 2σ(-β·scale·
‖q - k‖₁), unnormalized, checked against a float64 rewrite of the paper's equations on every
implementation (values and finite-difference gradients, causal, padded cross and packed masks), and
the catalog's claim that the weights can be negative: they lie in (-1, 1) with the sign of q·k (add
or subtract a value), a key equal to the query passes the dissimilarity gate whole (2σ(0) = 1), and a
hidden key contributes nothing at all."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.softmax import compositional_quasi_attention
from tests import inputs
from tests import numpy_math
from tests import tolerances

F32 = tolerances.output(jnp.float32)
GRAD = tolerances.grad(jnp.float32)
EXACT = tolerances.ELEMENTWISE[jnp.float32]
B, T, N, K, H, h = 2, 11, 4, 2, 8, 6


def _weights_float64(q, k, visible, *, scale, alpha=1.0, beta=1.0):
  """`[B, N, T, S]`: tanh(E) ⊙ 2 sigmoid(N) with E = α·scale·q·k, N = -β·scale·‖q - k‖₁, hidden
  pairs 0 (GQA by repeating key heads)."""
  q, k = (np.asarray(x, np.float64) for x in (q, k))
  k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
  e = alpha * scale * np.einsum("btnh,bsnh->bnts", q, k)
  l1 = np.abs(q.transpose(0, 2, 1, 3)[:, :, :, None] - k.transpose(0, 2, 1, 3)[:, :, None]).sum(-1)
  return np.where(visible, np.tanh(e) * 2.0 * numpy_math.sigmoid(-beta * scale * l1), 0.0)


def _float64(q, k, v, visible, **kw):
  v = np.repeat(np.asarray(v, np.float64), q.shape[2] // v.shape[2], axis=2)
  return np.einsum("bnts,bsnh->btnh", _weights_float64(q, k, visible, **kw), v)


CASES = {
    "causal": dict(T=T, S=T, causal=True, kw={}),
    "padded_cross": dict(T=T, S=14, causal=False, kw=dict(kv_lengths=np.array([14, 6]))),
    "packed": dict(T=T, S=T, causal=False,
                   kw=dict(segment_ids=np.array([[0] * 4 + [1] * 7, [0] * 11]))),
}


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_equals_the_papers_equations(case, implementation):
  c = CASES[case]
  # scale 0.6 and α = 1.5, β = 0.4 keep both factors away from saturation.
  q, k, v = inputs.qkv(B=B, T=c["T"], S=c["S"], N=N, K=K, H=H, h=h, seed=2)
  out = inputs.jit_with(compositional_quasi_attention, causal=c["causal"],
                        implementation=implementation, scale=0.6, alpha=1.5, beta=0.4)(
                            q, k, v, **c["kw"])
  vis = numpy_math.visible(B, c["T"], c["S"], causal=c["causal"],
                           kv_lengths=c["kw"].get("kv_lengths"), segments=c["kw"].get("segment_ids"))
  want = _float64(q, k, v, vis, scale=0.6, alpha=1.5, beta=0.4)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def test_default_scale_is_inverse_sqrt_head_dim_on_both_affinities():
  q, k, v = inputs.qkv(B=1, T=7, N=2, K=1, H=H, h=3, seed=9)
  out = inputs.jit_with(compositional_quasi_attention)(q, k, v)
  want = _float64(q, k, v, numpy_math.visible(1, 7, 7), scale=H ** -0.5)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def test_gradients_match_float64_finite_differences():
  q, k, v = inputs.qkv(B=1, T=7, S=9, N=4, K=2, H=4, h=3, seed=6)
  rng = np.random.default_rng(0)
  c = rng.standard_normal((1, 7, 4, 3))
  vis = numpy_math.visible(1, 7, 9)

  def loss(q, k, v):
    out = compositional_quasi_attention(q, k, v, scale=0.6, implementation="xla")
    return jnp.sum(out * jnp.asarray(c, jnp.float32))

  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  args = [np.asarray(x, np.float64) for x in (q, k, v)]
  loss64 = lambda *a: float(np.sum(_float64(*a, vis, scale=0.6) * c))
  numpy_math.check_directional_derivatives(grads, args, loss64, "qkv", rng=rng,
                                           tol=GRAD)


def _weights(q, k, **kw):
  """The weights `[B, T, S]` of head 0, read through one-hot values."""
  S = k.shape[1]
  v = jnp.eye(S)[None, :, None, :].repeat(q.shape[0], axis=0)
  return np.asarray(inputs.jit_with(compositional_quasi_attention, **kw)(q, k, v))[:, :, 0]


def test_weights_are_signed_in_minus_one_one_with_the_sign_of_the_similarity():
  q, k, _ = inputs.qkv(B=2, T=9, S=12, N=1, K=1, H=H, seed=4)
  w = _weights(q, k, scale=0.7)
  s = np.einsum("bth,bsh->bts", np.asarray(q)[:, :, 0], np.asarray(k)[:, :, 0])
  assert (w < 0).any() and (w > 0).any()              # values can be subtracted as well as added
  assert np.all(np.abs(w) < 1.0)
  np.testing.assert_array_equal(np.sign(w), np.sign(s))
  # A key equal to the query: L1 distance 0, the gate 2σ(0) = 1 leaves tanh(α·scale·‖q‖²).
  k_eq = k.at[:, 3].set(q[:, 5])
  w_eq = _weights(q, k_eq, scale=0.7, alpha=0.3)
  qq = np.sum(np.asarray(q)[:, 5, 0] ** 2, axis=-1)
  np.testing.assert_allclose(w_eq[:, 5, 3], np.tanh(0.3 * 0.7 * qq), **EXACT)


def test_a_hidden_key_contributes_nothing():
  q, k, v = inputs.qkv(B=2, T=6, S=9, N=N, K=K, H=H, h=h, seed=3)
  f = inputs.jit_with(compositional_quasi_attention)
  lengths = jnp.array([9, 5])
  base = np.asarray(f(q, k, v, kv_lengths=lengths))
  # Garbage in the hidden slots of example 1 (the unfilled part of a cache) changes nothing ...
  k2, v2 = k.at[1, 5:].set(1e4), v.at[1, 5:].set(-1e4)
  np.testing.assert_array_equal(np.asarray(f(q, k2, v2, kv_lengths=lengths)), base)
  # ... while the same change to visible slots (example 0) does.
  k3 = k.at[0, 5:].set(k[0, 5:] * -2.0)
  assert tolerances.rel_rms(f(q, k3, v, kv_lengths=lengths)[0], base[0]) > tolerances.CHANGED_REL_RMS
  # A row with no visible key gives zeros, with finite gradients.
  g = lambda q, k, v: compositional_quasi_attention(q, k, v, kv_lengths=jnp.array([0, 9]))
  out, grads = jax.jit(lambda *a: (g(*a), jax.grad(lambda *b: jnp.sum(g(*b) ** 2),
                                                    argnums=(0, 1, 2))(*a)))(q, k, v)
  np.testing.assert_array_equal(np.asarray(out[0]), 0.0)
  assert all(np.isfinite(np.asarray(x)).all() for x in grads)
