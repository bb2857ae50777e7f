"""Inside-Outside Attention (#181, Shape-Guided Diffusion): softmax weights between inside (object) and
outside (background) tokens are removed after normalization.

Checked against a float64 numpy rewrite of the authors' `new_attention` (softmax, then the
inside-outside mask multiplied in, padding tokens zeroed, no renormalization; soft strength γ < 1; the
masked-softmax option), gradients against a dense float32 form, and the defining property: no weight
crosses the silhouette, and a row with no key in its region gives zeros (forward and backward).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.ops.softmax import inside_outside_attention
from tests import inputs
from tests import tolerances

F32 = tolerances.output(jnp.float32)
B, T, S, N, K, H, h = 2, 11, 13, 4, 2, 8, 6


def _mask(seed, shape, p=0.4):
  return jax.random.bernoulli(jax.random.PRNGKey(seed), p, shape)


def _inside_outside_float64(q, k, v, q_in, kv_in, *, attended=None, strength=1.0, renormalize=False,
                            causal=False, kv_lengths=None, scale):
  """The authors' post-softmax masking (utils.py, `new_attention`) per head, in float64."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  G = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, G, axis=2), np.repeat(v, G, axis=2)
  s = np.einsum("btnh,bsnh->bnts", q, k) * scale
  Tq, Sk = s.shape[-2:]
  visible = np.ones(s.shape, bool)
  if causal:
    visible &= np.tril(np.ones((Tq, Sk), bool))
  if kv_lengths is not None:
    visible &= (np.arange(Sk)[None, :] < np.asarray(kv_lengths)[:, None])[:, None, None, :]
  same = np.asarray(q_in)[:, None, :, None] == np.asarray(kv_in)[:, None, None, :]
  insideout = np.where(same, 1.0, 1.0 - strength)                   # (mask - 1)·scale + 1
  keep = np.ones(s.shape, bool) if attended is None else np.asarray(attended)[:, None, None, :]
  if renormalize:
    with np.errstate(divide="ignore"):                      # log 0 = -inf: a removed pair
      s = s + np.log(np.where(keep, insideout, 0.0))
  z = np.where(visible, s, -np.inf)
  zmax = np.max(z, -1, keepdims=True)
  e = np.where(visible, np.exp(z - np.where(np.isfinite(zmax), zmax, 0.0)), 0.0)
  den = e.sum(-1, keepdims=True)
  w = np.where(den > 0, e / np.where(den > 0, den, 1.0), 0.0)
  if not renormalize:
    w = w * insideout * keep
  return np.einsum("bnts,bsnh->btnh", w, v)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_self_attention_equals_the_authors_masking(implementation):
  q, k, v = inputs.qkv(B=B, T=T, S=T, N=N, K=K, H=H, h=h, seed=1)
  inside = _mask(2, (B, T))
  lengths = jnp.array([T, 8])
  fn = inputs.jit_with(inside_outside_attention, causal=True, implementation=implementation)
  out = fn(q, k, v, q_inside=inside, kv_inside=inside, kv_lengths=lengths)
  want = _inside_outside_float64(q, k, v, inside, inside, causal=True, kv_lengths=lengths,
                                 scale=H ** -0.5)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("strength", [1.0, 0.6])
def test_cross_attention_with_object_and_padding_tokens(strength, renormalize):
  # Pixels (queries) against prompt tokens: object tokens inside, background outside, the start and
  # padding tokens read by no pixel.
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h, seed=3)
  q_in, kv_in = _mask(4, (B, T)), _mask(5, (B, S))
  attended = jnp.arange(S)[None, :].repeat(B, 0) % 5 != 0
  fn = inputs.jit_with(inside_outside_attention, strength=strength, renormalize=renormalize,
                       scale=0.7)
  out = fn(q, k, v, q_inside=q_in, kv_inside=kv_in, kv_attended=attended)
  want = _inside_outside_float64(q, k, v, q_in, kv_in, attended=attended, strength=strength,
                                 renormalize=renormalize, scale=0.7)
  np.testing.assert_allclose(np.asarray(out), want, **F32)


def test_no_weight_crosses_the_silhouette_and_rows_keep_only_their_region_mass():
  # One-hot values make each output row the row's weights.
  q, k, _ = inputs.qkv(B=1, T=T, S=T, N=2, K=2, H=H, h=h, seed=6)
  v = jnp.broadcast_to(jnp.eye(T)[None, :, None, :], (1, T, 2, T))
  inside = _mask(7, (1, T))
  w = np.asarray(inputs.jit_with(inside_outside_attention)(q, k, v, q_inside=inside,
                                                            kv_inside=inside))[0]
  cross = np.asarray(inside)[0, :, None] != np.asarray(inside)[0, None, :]        # [T, S]
  assert np.all(w[np.broadcast_to(cross[:, None, :], w.shape)] == 0.0)
  # Without renormalization a row keeps the softmax mass of its own region, less than 1.
  total = w.sum(-1)
  assert np.all(total <= 1.0 + tolerances.FEATURE_SUM[jnp.float32]["rtol"])
  assert np.all(total[cross.any(-1)] < 1.0)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_a_row_with_no_key_in_its_region_gives_zeros_and_finite_gradients(implementation):
  q, k, v = inputs.qkv(B=1, T=6, S=6, N=2, K=1, H=4, h=3, seed=8)
  q_in = jnp.array([[True, False, True, False, False, True]])
  kv_in = jnp.zeros((1, 6), bool)                       # every key outside: inside rows see nothing
  fn = lambda q, k, v: inside_outside_attention(q, k, v, q_inside=q_in, kv_inside=kv_in,
                                                implementation=implementation)
  out = jax.jit(fn)(q, k, v)
  np.testing.assert_array_equal(np.asarray(out)[0, np.asarray(q_in)[0]], 0.0)
  assert np.all(np.abs(np.asarray(out)[0, ~np.asarray(q_in)[0]]) > 0)
  grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a) ** 2), argnums=(0, 1, 2)))(q, k, v)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


@pytest.mark.parametrize("implementation", ["xla", "reference"])
def test_gradients_match_a_dense_form(implementation):
  q, k, v = inputs.qkv(B=1, T=7, S=7, N=2, K=1, H=4, h=3, seed=9)
  dout = inputs.qkv(B=1, T=7, S=7, N=2, K=1, H=3, h=3, seed=10)[0]
  inside = _mask(11, (1, 7), p=0.5)

  def dense(q, k, v):
    kr, vr = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
    s = jnp.einsum("btnh,bsnh->bnts", q, kr) / 2.0
    visible = jnp.tril(jnp.ones((7, 7), bool))
    w = jax.nn.softmax(jnp.where(visible, s, -jnp.inf), axis=-1)
    same = inside[:, None, :, None] == inside[:, None, None, :]
    return jnp.einsum("bnts,bsnh->btnh", w * jnp.where(same, 1.0, 0.25), vr)

  op = lambda *a: inside_outside_attention(*a, q_inside=inside, kv_inside=inside, strength=0.75,
                                           causal=True, implementation=implementation)
  inputs.assert_same_gradients(op, dense, (q, k, v), dout, ("dq", "dk", "dv"),
                               tol=tolerances.grad(jnp.float32))


def test_bad_input_is_a_clear_error():
  q, k, v = inputs.qkv(B=B, T=T, S=S, N=N, K=K, H=H, h=h)
  q_in, kv_in = _mask(0, (B, T)), _mask(0, (B, S))
  with pytest.raises(ValueError, match=r"inside_outside_attention.*kv_inside.*\[B, S\]"):
    inside_outside_attention(q, k, v, q_inside=q_in, kv_inside=q_in)
  with pytest.raises(ValueError, match="strength"):
    inside_outside_attention(q, k, v, q_inside=q_in, kv_inside=kv_in, strength=1.5)
