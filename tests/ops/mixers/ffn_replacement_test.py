"""Shallow FFN replacing attention (#80, arXiv:2311.10642): a float64 rewrite of the flattened-
sequence FFN, that it represents position-only attention exactly and learns attention's token
mixing when trained on its outputs, clear errors, and that it reads only the values v.

The contract itself (shapes, dtypes, patterns, implementations agreeing, decode, packing, batch
independence, the inputs each reads) is checked for every registered mechanism by tests/conformance.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import attnjax as aj
from attnjax.ops.mixers.ffn_replacement import ffn_attention_replacement
from tests import inputs
from tests import tolerances
from tests.ops.mixers import mixer_checks

TOL = tolerances.output(jnp.float32)


def _ffn_params(seed, *, N, h, L, M=6):
  return dict(ffn_in=0.3 * mixer_checks.normal(seed, (L, N, h, M)),
              ffn_in_bias=0.1 + 0.1 * mixer_checks.normal(seed + 1, (N, M)),
              ffn_out=0.3 * mixer_checks.normal(seed + 2, (L, N, M, h)),
              ffn_out_bias=0.1 * mixer_checks.normal(seed + 3, (L, N, h)))


def _ffn_direct(v, params, *, causal):
  """The paper's FFN on the flattened, zero-padded sequence, in float64 numpy, one pass per row."""
  v = np.asarray(v, np.float64)
  w1, b1, w2, b2 = (np.asarray(params[n], np.float64)
                    for n in ("ffn_in", "ffn_in_bias", "ffn_out", "ffn_out_bias"))
  L, N, h, M = w1.shape
  B, T, K, _ = v.shape
  out = np.zeros((B, T, N, h))
  for b in range(B):
    for n in range(N):
      for t in range(T):
        x = np.zeros((L, h))
        visible = t + 1 if causal else T
        x[:visible] = v[b, :visible, n // (N // K)]
        z = np.maximum(x.reshape(-1) @ w1[:, n].reshape(L * h, M) + b1[n], 0)
        y = z @ np.moveaxis(w2[:, n], 0, 1).reshape(M, L * h) + b2[:, n].reshape(-1)
        out[b, t, n] = y.reshape(L, h)[t]
  return out


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_ffn_equals_the_flattened_sequence_ffn(causal, impl):
  q, k, v = inputs.qkv(B=2, T=7, N=4, K=2, H=3, h=5, key_per_array=True)
  params = _ffn_params(0, N=4, h=5, L=10)
  out = jax.jit(lambda v: aj.attention("ffn_attention_replacement", q, k, v, causal=causal,
                                       implementation=impl, **params))(v)
  np.testing.assert_allclose(out, _ffn_direct(v, params, causal=causal), **TOL)


def test_ffn_errors_and_empty_rows():
  q, k, v = inputs.qkv(B=1, T=12, N=2, K=2, H=3, h=4, key_per_array=True)
  params = _ffn_params(0, N=2, h=4, L=10)
  with pytest.raises(ValueError, match="exceeds the maximum length 10"):
    ffn_attention_replacement(q, k, v, **params)
  with pytest.raises(ValueError, match="self-attention only"):
    ffn_attention_replacement(q[:, :5], k[:, :7], v[:, :7], **params)
  with pytest.raises(ValueError, match="ffn_out_bias"):
    ffn_attention_replacement(q[:, :5], k[:, :5], v[:, :5],
                              **{**params, "ffn_out_bias": jnp.zeros((10, 2, 3))})
  out = ffn_attention_replacement(q[:, :5], k[:, :5], v[:, :5], kv_lengths=jnp.array([0]),
                                  **params)
  chex.assert_trees_all_close(out, jnp.zeros_like(out))


def _position_only_attention(v, slopes, *, L, causal):
  """softmax(-slope_n |t - j|) over the visible j, applied to v, in float64 numpy: an attention
  layer whose weights depend on positions only (ALiBi with q = k = 0). Returns (P, y)."""
  t, j = np.arange(L)[:, None], np.arange(L)[None, :]
  logits = -np.asarray(slopes, np.float64)[:, None, None] * np.abs(t - j)      # [N, L, L]
  T = v.shape[1]
  logits = logits[:, :T, :T]
  if causal:
    logits = np.where(j[:, :T] <= t[:T], logits, -np.inf)
  P = np.exp(logits - logits.max(-1, keepdims=True))
  P /= P.sum(-1, keepdims=True)
  x = np.asarray(v, np.float64).repeat(len(slopes) // v.shape[2], axis=2)   # [B, T, N, h]
  return P, np.einsum("ntj,bjnc->btnc", P, x)


@pytest.mark.parametrize("causal", [False, True])
def test_ffn_exactly_represents_a_position_only_attention_layer(causal):
  """The paper's claim at its root: an FFN over the flattened fixed-length sequence can stand in
  for an attention layer. Exactly, for attention whose weights depend on positions only: hidden
  units ReLU(±v_jc) give v_jc = ReLU(v_jc) - ReLU(-v_jc), and W_2 row t weighs them by P_tj (the
  causal form masks j > t, matching a causal P). GQA: two query heads, one value head."""
  L, T, N, K, h = 8, 6, 4, 2, 3
  q, k, v = inputs.qkv(B=2, T=T, N=N, K=K, H=5, h=h, key_per_array=True)
  slopes = np.array([0.25, 0.5, 1.0, 2.0])
  P_full, _ = _position_only_attention(np.zeros((1, L, K, h)), slopes, L=L, causal=causal)
  eye = np.eye(L * h).reshape(L, h, L * h)
  w1 = np.concatenate([eye, -eye], axis=-1)                                   # [L, h, 2 L h]
  ffn_in = np.broadcast_to(w1[:, None], (L, N, h, 2 * L * h))
  # W_2[t, n, (s, j, c), c'] = s · P_n[t, j] · δ(c, c').
  w2 = np.einsum("ntj,cd->tnjcd", P_full, np.eye(h)).reshape(L, N, L * h, h)
  ffn_out = np.concatenate([w2, -w2], axis=2)
  params = dict(ffn_in=jnp.asarray(ffn_in, jnp.float32), ffn_in_bias=jnp.zeros((N, 2 * L * h)),
                ffn_out=jnp.asarray(ffn_out, jnp.float32), ffn_out_bias=jnp.zeros((L, N, h)))
  out = jax.jit(lambda v: aj.attention("ffn_attention_replacement", q, k, v, causal=causal,
                                       **params))(v)
  # Non-causal: the FFN reads the T tokens zero-padded to L (as the paper pads), so the teacher
  # attends over that same padded length-L sequence. Causal rows t < T never see the padding.
  _, want = _position_only_attention(v, slopes, L=L, causal=causal)
  if not causal:
    _, want = _position_only_attention(np.concatenate([v, np.zeros((2, L - T, K, h))], 1),
                                       slopes, L=L, causal=False)
    want = want[:, :T]
  np.testing.assert_allclose(out, want, **TOL)


def _fit_ffn_to_attention(causal, *, T=6, h=4, M=64, steps=300, seed=0):
  """Trains the FFN replacement (one head, L = T) to mimic a fixed softmax self-attention layer
  over the same stream, softmax((v A)(v B)ᵀ / √h) v C, on fresh random sequences each step
  (end-to-end regression on the teacher's outputs); returns held-out outputs and teacher's."""
  keys = jax.random.split(jax.random.PRNGKey(seed), 6)
  A, Bm, C = (w * jax.random.normal(key, (h, h))
               for w, key in zip((0.55, 0.55, 1.0), keys[:3], strict=True))

  def teacher(v):
    x = v[:, :, 0]
    scores = jnp.einsum("btc,bsc->bts", x @ A, x @ Bm) / np.sqrt(h)
    if causal:
      scores = jnp.where(jnp.tril(jnp.ones((T, T), bool)), scores, -jnp.inf)
    return jnp.einsum("bts,bsc->btc", jax.nn.softmax(scores, -1), x @ C)[:, :, None]

  def student(p, v):
    zeros = jnp.zeros(v.shape[:2] + (1, 1))               # q and k are not read
    return ffn_attention_replacement(zeros, zeros, v, causal=causal, **p)

  params = dict(ffn_in=mixer_checks.normal(7, (T, 1, h, M), (T * h) ** -0.5),
                ffn_in_bias=jnp.zeros((1, M)),
                ffn_out=mixer_checks.normal(8, (T, 1, M, h), M ** -0.5),
                ffn_out_bias=jnp.zeros((T, 1, h)))
  opt = optax.adam(5e-3)

  @jax.jit
  def step(p, state, key):
    v = jax.random.normal(key, (128, T, 1, h))
    grads = jax.grad(lambda p: jnp.mean((student(p, v) - teacher(v)) ** 2))(p)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(p, updates), state

  state = opt.init(params)
  for key in jax.random.split(keys[3], steps):
    params, state = step(params, state, key)
  v_test = jax.random.normal(keys[4], (1024, T, 1, h))
  return np.asarray(v_test[:, :, 0]), np.asarray(student(params, v_test)[:, :, 0]), np.asarray(
      teacher(v_test)[:, :, 0])


@pytest.mark.parametrize("causal", [False, True])
def test_ffn_trained_on_attention_outputs_learns_its_token_mixing(causal):
  """A small fit that can fail: on held-out sequences the trained FFN's error is well below that
  of the best token-wise map (per position, affine in v_t: least squares on the test set itself),
  so it has learned attention's mixing across tokens, not just a per-token transform."""
  x, y_ffn, y = _fit_ffn_to_attention(causal)
  ffn_err = np.sum((y_ffn - y) ** 2) / np.sum(y ** 2)
  tokenwise_err = 0.0
  for t in range(x.shape[1]):
    features = np.concatenate([x[:, t], np.ones((len(x), 1))], axis=1)
    coef, *_ = np.linalg.lstsq(features, y[:, t], rcond=None)
    tokenwise_err += np.sum((features @ coef - y[:, t]) ** 2)
  tokenwise_err /= np.sum(y ** 2)
  # Measured: 0.53 (non-causal) and 0.38 (causal) of the token-wise error; an FFN that did not mix
  # tokens could not go below 1.
  assert ffn_err < tolerances.LEARNED_MIXING_ERROR_RATIO_MAX * tokenwise_err, (ffn_err, tokenwise_err)


def test_reads_only_the_values_and_rejects_a_scale():
  mixer_checks.check_reads_only_values_and_rejects_scale("ffn_attention_replacement")


def test_signature_shapes_hold_under_jaxtyped():
  mixer_checks.check_signature_shapes("ffn_attention_replacement")
