"""Luong attention (arXiv:1508.04025) and additive attention (Bahdanau arXiv:1409.0473, Anderson et al.
arXiv:1707.07998): the dot score is unscaled softmax attention, the general score with W_a = I is the
dot score, local-m and local-p against numpy loops of the paper's equations (the window softmax times
the unrenormalized Gaussian), local-p's weight mass inside [p_t − D, p_t + D] around a centre set by
constructed W_p, v_p, and additive attention against v_aᵀ tanh(W_1 h_t + W_2 h̄_s) in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import attnjax as aj
from attnjax.ops.cross import luong
from tests import tolerances

B, T, S, N, K, H, h = 2, 5, 13, 4, 2, 8, 6
G = N // K


def _qkv(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  q, k, v = (rng.standard_normal(s).astype(np.float32) * 0.5
             for s in ((B, T, N, H), (B, S, K, H), (B, S, K, h)))
  return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def _np_luong(q, k, v, *, score, centres=None, window=None, gaussian=False, lengths=None):
  """The paper's equations, one (b, n, t) at a time. `score(b, n, t, k_row)`; centres `[B, T, N]`."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  out = np.zeros((B, q.shape[1], N, h))
  for b in range(B):
    src = S if lengths is None else lengths[b]
    for n in range(N):
      for t in range(q.shape[1]):
        s = np.array([score(b, n, t, k[b, j, n // G]) for j in range(src)])
        pos = np.arange(src, dtype=np.float64)
        keep = np.ones(src, bool) if centres is None else np.abs(pos - centres[b, t, n]) <= window
        if not keep.any():
          continue
        a = np.where(keep, np.exp(s - s[keep].max()), 0.0)
        a /= a.sum()
        if gaussian:
          a *= np.exp(-(pos - centres[b, t, n]) ** 2 / (2 * (window / 2) ** 2))
        out[b, t, n] = a @ v[b, :src, n // G]
  return out


def test_dot_score_is_unscaled_softmax_attention():
  q, k, v = _qkv()
  got = aj.attention("luong_attention", q, k, v)
  qn = np.asarray(q, np.float64)
  want = _np_luong(q, k, v, score=lambda b, n, t, kj: qn[b, t, n] @ kj)
  np.testing.assert_allclose(np.asarray(got), want, **tolerances.output(jnp.float32))
  plain = aj.attention("softmax", q, k, v, scale=1.0)
  np.testing.assert_allclose(np.asarray(got), np.asarray(plain), **tolerances.output(jnp.float32))


def test_general_score_with_identity_is_the_dot_score_and_matches_numpy():
  q, k, v = _qkv(1)
  eye = jnp.broadcast_to(jnp.eye(H), (N, H, H))
  np.testing.assert_allclose(np.asarray(luong.luong_attention(q, k, v, w_a=eye)),
                             np.asarray(luong.luong_attention(q, k, v)),
                             **tolerances.output(jnp.float32))
  w_a = np.random.default_rng(2).standard_normal((N, H, H)).astype(np.float32) * 0.3
  got = luong.luong_attention(q, k, v, w_a=jnp.asarray(w_a))
  qn = np.asarray(q, np.float64)
  want = _np_luong(q, k, v, score=lambda b, n, t, kj: qn[b, t, n] @ w_a[n] @ kj)
  np.testing.assert_allclose(np.asarray(got), want, **tolerances.output(jnp.float32))


def test_local_m_is_the_softmax_over_the_monotonic_window():
  q, k, v = _qkv(3)
  offset, window = 4, 3
  got = luong.luong_attention(q, k, v, align="local-m", window=window, q_offset=offset)
  qn = np.asarray(q, np.float64)
  centres = np.broadcast_to((offset + np.arange(T))[None, :, None], (B, T, N)).astype(np.float64)
  want = _np_luong(q, k, v, score=lambda b, n, t, kj: qn[b, t, n] @ kj, centres=centres,
                   window=window)
  np.testing.assert_allclose(np.asarray(got), want, **tolerances.output(jnp.float32))


def _local_p_weights():
  rng = np.random.default_rng(4)
  return (jnp.asarray(rng.standard_normal((N, H, H)).astype(np.float32) * 0.5),
          jnp.asarray(rng.standard_normal((N, H)).astype(np.float32)))


def test_local_p_matches_the_papers_equations_with_lengths():
  q, k, v = _qkv(5)
  w_p, v_p = _local_p_weights()
  lengths = np.array([S, 9])
  got = luong.luong_local_p_attention(q, k, v, w_p=w_p, v_p=v_p, window=2.5,
                                      kv_lengths=jnp.asarray(lengths))
  # p_t = S_b · sigmoid(v_pᵀ tanh(W_p h_t)), written out in numpy.
  qn = np.asarray(q, np.float64)
  z = np.tanh(np.einsum("btnh,nhd->btnd", qn, np.asarray(w_p, np.float64)))
  centres = lengths[:, None, None] / (1 + np.exp(-np.einsum("btnd,nd->btn", z, np.asarray(v_p))))
  np.testing.assert_allclose(np.asarray(luong.predicted_positions(q, w_p, v_p, lengths)), centres,
                             **tolerances.output(jnp.float32))
  want = _np_luong(q, k, v, score=lambda b, n, t, kj: qn[b, t, n] @ kj, centres=centres,
                   window=2.5, gaussian=True, lengths=lengths)
  np.testing.assert_allclose(np.asarray(got), want, **tolerances.output(jnp.float32))


def test_local_p_puts_its_mass_in_the_window_around_the_predicted_centre():
  """v_p = 0 gives p_t = S · sigmoid(0) = S / 2 for every query; with one-hot values (v = I over the
  source positions) the output rows are the weights a_t(s) themselves."""
  q, k, _ = _qkv(6)
  window = 3
  eye = jnp.broadcast_to(jnp.eye(S)[None, :, None, :], (B, S, K, S))
  w_p = jnp.ones((N, H, H))
  weights = np.asarray(luong.luong_local_p_attention(q, k, eye, w_p=w_p, v_p=jnp.zeros((N, H)),
                                                      window=window))
  pos = np.arange(S)
  centre = S / 2
  outside = np.abs(pos - centre) > window
  assert np.all(weights[..., outside] == 0)
  assert np.all(weights[..., ~outside] > 0)
  # The window's softmax sums to one; the Gaussian (1 at p_t, exp(-2) at p_t ± D with σ = D / 2)
  # takes some of it off.
  total = weights.sum(-1)
  assert np.all(total < 1) and np.all(total > np.exp(-2.0))


def test_local_p_trains_its_centre_predictor():
  q, k, v = _qkv(7)
  w_p, v_p = _local_p_weights()
  grads = jax.grad(lambda w, u: jnp.sum(jnp.sin(luong.luong_local_p_attention(
      q, k, v, w_p=w, v_p=u, window=3))), argnums=(0, 1))(w_p, v_p)
  for g in grads:
    assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) > 0


def test_additive_attention_is_bahdanaus_score():
  """e_ij = v_aᵀ tanh(W_a s_i + U_a h_j): with q = s W_a and k = h U_a per head, in numpy."""
  rng = np.random.default_rng(8)
  s_dec, h_enc = rng.standard_normal((B, T, 10)), rng.standard_normal((B, S, 12))
  w_a, u_a = rng.standard_normal((10, N, H)) * 0.3, rng.standard_normal((12, K, H)) * 0.3
  v_a = rng.standard_normal((N, H))
  values = rng.standard_normal((B, S, K, h))
  q, k = np.einsum("btd,dnh->btnh", s_dec, w_a), np.einsum("bsd,dkh->bskh", h_enc, u_a)
  f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
  got = aj.attention("additive_attention", f32(q), f32(k), f32(values), v_a=f32(v_a))
  want = _np_luong(q, k, values, score=lambda b, n, t, kj: v_a[n] @ np.tanh(q[b, t, n] + kj))
  np.testing.assert_allclose(np.asarray(got), want, **tolerances.output(jnp.float32))


def test_top_down_attention_pools_regions_with_convex_weights():
  """Anderson et al.: the attended feature Σ_i α_i v_i is a convex combination of the regions."""
  q, k, _ = _qkv(9)
  v_a = jnp.asarray(np.random.default_rng(9).standard_normal((N, H)), jnp.float32)
  ones = jnp.ones((B, S, K, 1))
  total = aj.attention("additive_attention", q, k, ones, v_a=v_a, cross=True)
  np.testing.assert_allclose(np.asarray(total), 1.0, **tolerances.output(jnp.float32))


def test_bf16_is_close_to_fp32():
  q, k, v = _qkv(10)
  w_p, v_p = _local_p_weights()
  f32 = luong.luong_local_p_attention(q, k, v, w_p=w_p, v_p=v_p, window=3)
  b16 = luong.luong_local_p_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), w_p=w_p,
                                      v_p=v_p, window=3)
  assert b16.dtype == jnp.bfloat16
  assert tolerances.rel_rms(b16, f32) < tolerances.BF16_VS_FP32_REL_RMS


def test_bad_inputs_are_clear_errors():
  q, k, v = _qkv()
  with pytest.raises(ValueError, match=r"w_a.*\[N, H, H\]"):
    luong.luong_attention(q, k, v, w_a=jnp.eye(H))
  with pytest.raises(ValueError, match="v_p"):
    luong.luong_local_p_attention(q, k, v, w_p=jnp.zeros((N, H, H)), v_p=jnp.zeros((H,)))
  with pytest.raises(ValueError, match="align"):
    luong.luong_attention(q, k, v, align="local")
  with pytest.raises(ValueError, match="window"):
    luong.luong_attention(q, k, v, align="local-m", window=0)
  with pytest.raises(ValueError, match="causal"):
    luong.luong_attention(q, k, v, causal=True)
  with pytest.raises(ValueError, match="v_a"):
    luong.additive_attention(q, k, v, v_a=jnp.zeros((N, H + 1)))
