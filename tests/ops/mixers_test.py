"""The attention-free token mixers: each paper's defining property, float64 rewrites of the papers'
equations, decode over a cache, packed runs, clear errors; that each reads only the values v (its
one stream); and that the shallow FFN represents attention maps on a fixed length.

The contract itself (shapes, dtypes, patterns, implementations agreeing, decode, packing, batch
independence, the inputs each reads) is checked for every registered mechanism by tests/conformance.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.special

import attnjax as aj
from attnjax.ops import mixers
from tests import tolerances

TOL = tolerances.output(jnp.float32)
GRAD_TOL = tolerances.grad(jnp.float32)


def _normal(seed, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _qkv(B, T, N, K, H, h, seed=0):
  return (_normal(seed, (B, T, N, H)), _normal(seed + 1, (B, T, K, H)),
          _normal(seed + 2, (B, T, K, h)))


def _eqns(jaxpr):
  """Every equation of a jaxpr, sub-jaxprs (jit, loops) included."""
  for eqn in jaxpr.eqns:
    yield eqn
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          yield from _eqns(inner)


def _max_dims_of_size(fn, size, *args):
  """The largest number of axes of length `size` in any intermediate array of `fn(*args)`."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return max(sum(d == size for d in getattr(v.aval, "shape", ()))
             for e in _eqns(jaxpr) for v in e.outvars), {e.primitive.name for e in _eqns(jaxpr)}


def _rows_with_garbage(x, n):
  return x.at[:, n:].set(1e4)


# --------------------------------------------------------------------------------------------------
# #122 FFTNet spectral filter.


def _fft_params(seed, *, N, h, L, M=4, context=0.1):
  F = L // 2 + 1
  return dict(fft_filter=1.0 + 0.3 * _normal(seed, (F, N, h)),
              fft_context_in=0.3 * _normal(seed + 1, (N, h, M)),
              fft_context_in_bias=0.1 * _normal(seed + 2, (N, M)),
              fft_context_out=context * _normal(seed + 3, (N, M, F, h)),
              fft_modrelu_bias=-0.1 + 0.05 * _normal(seed + 4, (N, h)))


def test_fftnet_is_fft_based_with_no_quadratic_matrix():
  T = L = 64
  q, k, v = _qkv(1, T, 2, 1, 3, 5)
  params = _fft_params(0, N=2, h=5, L=L)
  fn = lambda q, k, v: mixers.fftnet_spectral_filter(q, k, v, implementation="xla", **params)
  most, prims = _max_dims_of_size(fn, T, q, k, v)
  assert "fft" in prims
  assert most == 1, "an intermediate array has two sequence-length axes (a [T, T] matrix)"


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_spectral_filter_all_pass_preserves_energy(impl):
  """Parseval: a real unit-magnitude (all-pass) filter with no activation keeps ‖y‖ = ‖x‖."""
  L = 16
  x = _normal(0, (2, L, 3, 4))
  signs = jnp.sign(_normal(1, (1, L // 2 + 1, 3, 4)))
  y = mixers.spectral_filter(x, signs, length=L, implementation=impl)
  np.testing.assert_allclose(jnp.sum(y ** 2, axis=1), jnp.sum(x ** 2, axis=1), **TOL)
  # The spectrum side of Parseval for the rfft: Σ|x|² = (|X_0|² + 2 Σ|X_f|² + |X_{L/2}|²) / L.
  spec = jnp.abs(jnp.fft.rfft(x, axis=1)) ** 2
  weights = jnp.array([1.0] + [2.0] * (L // 2 - 1) + [1.0])[None, :, None, None]
  np.testing.assert_allclose(jnp.sum(weights * spec, axis=1) / L, jnp.sum(x ** 2, axis=1), **TOL)
  # A non-unit filter does change the energy (the check above is not vacuous).
  y2 = mixers.spectral_filter(x, 2.0 * signs, length=L, implementation=impl)
  np.testing.assert_allclose(jnp.sum(y2 ** 2, axis=1), 4 * jnp.sum(x ** 2, axis=1), **TOL)


def _circular_convolution(x, kernel):
  """y_n = Σ_m x_m h_{(n - m) mod L} along axis 1, written as explicit sums in float64 numpy."""
  L = kernel.shape[1]
  y = np.zeros(x.shape[:1] + (L,) + x.shape[2:])
  for n in range(L):
    for m in range(x.shape[1]):
      y[:, n] += x[:, m] * kernel[:, (n - m) % L]
  return y


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_spectral_filter_equals_circular_convolution_with_its_impulse_response(impl):
  """Convolution theorem: multiplying the L-point spectrum by W is circular convolution with
  h = irfft(W) (the zero-padded input of length S <= L), which is what makes the mixing global."""
  L, S = 16, 11
  x = _normal(0, (2, S, 3, 4))
  filt = _normal(1, (2, L // 2 + 1, 3, 4))
  y = mixers.spectral_filter(x, filt, length=L, implementation=impl)
  kernel = np.fft.irfft(np.asarray(filt, np.float64), n=L, axis=1)
  np.testing.assert_allclose(y, _circular_convolution(np.asarray(x, np.float64), kernel), **TOL)


def _fftnet_direct(v, params, *, L, activation):
  """The paper's FFTNet per head in float64 numpy: context = mean of the (GQA-shared) values,
  ΔW = GELU(c W_1 + b_1) W_2, full complex FFT of the zero-padded sequence, filter, modReLU
  ReLU(|z| + b) z / |z|, inverse FFT, real part, first T rows."""
  p = {n: np.asarray(x, np.float64) for n, x in params.items()}
  B, T, K, h = v.shape
  N = p["fft_filter"].shape[1]
  x = np.asarray(v, np.float64).repeat(N // K, axis=2)                      # [B, T, N, h]
  context = x.mean(axis=1)
  pre = np.einsum("bnc,ncm->bnm", context, p["fft_context_in"]) + p["fft_context_in_bias"]
  hidden = 0.5 * pre * (1 + scipy.special.erf(pre / np.sqrt(2)))                # exact GELU
  half = p["fft_filter"][None] + np.einsum("bnm,nmfc->bfnc", hidden, p["fft_context_out"])
  # The real filter on all L bins: bin f and bin L - f carry the same weight (Hermitian spectrum).
  full = np.concatenate([half, half[:, 1:L // 2][:, ::-1]], axis=1)          # [B, L, N, h]
  z = np.fft.fft(np.concatenate([x, np.zeros((B, L - T, N, h))], axis=1), axis=1) * full
  if activation:
    mag = np.abs(z)
    z = np.where(mag > 0, np.maximum(mag + p["fft_modrelu_bias"], 0) / np.where(mag > 0, mag, 1),
                 0) * z
  return np.fft.ifft(z, axis=1).real[:, :T]


@pytest.mark.parametrize("activation", [True, False])
@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_fftnet_equals_a_float64_rewrite_of_the_paper(impl, activation):
  """FFT → context-adapted filter → modReLU → iFFT of each head's values (GQA: two query heads
  share a value head, each with its own filter), against complex numpy FFTs in float64."""
  T, L, N, K, H, h = 10, 16, 4, 2, 3, 5
  q, k, v = _qkv(2, T, N, K, H, h)
  params = _fft_params(5, N=N, h=h, L=L, context=0.2)
  out = jax.jit(lambda v: aj.attention("fftnet_spectral_filter", q, k, v, activation=activation,
                                       implementation=impl, **params))(v)
  np.testing.assert_allclose(out, _fftnet_direct(v, params, L=L, activation=activation), **TOL)


def test_fftnet_linear_filter_is_the_circular_convolution_of_the_values():
  """Without modReLU: circular convolution of the zero-padded values with irfft(W + ΔW)."""
  T, L, N, h = 10, 16, 2, 3
  q, k, v = _qkv(1, T, N, N, 4, h)
  params = _fft_params(2, N=N, h=h, L=L, context=0.0)        # ΔW = 0: the filter is W
  out = jax.jit(lambda v: aj.attention("fftnet_spectral_filter", q, k, v, activation=False,
                                       **params))(v)
  kernel = np.fft.irfft(np.asarray(params["fft_filter"], np.float64)[None], n=L, axis=1)
  want = _circular_convolution(np.asarray(v, np.float64), kernel)[:, :T]
  np.testing.assert_allclose(out, want, **TOL)


def test_fftnet_all_pass_without_activation_preserves_energy_per_channel():
  T = L = 16
  q, k, v = _qkv(2, T, 4, 2, 3, 5)
  params = _fft_params(0, N=4, h=5, L=L, context=0.0)
  params["fft_filter"] = jnp.sign(params["fft_filter"] - 1.0)
  out = aj.attention("fftnet_spectral_filter", q, k, v, activation=False, **params)
  v_heads = jnp.repeat(v, 2, axis=2)           # GQA: query head n mixes kv head n // 2
  np.testing.assert_allclose(jnp.sum(out ** 2, axis=1), jnp.sum(v_heads ** 2, axis=1), **TOL)
  assert not np.allclose(out, v_heads, atol=1e-3)  # the filter does mix the sequence


def test_fftnet_short_sequence_is_the_zero_padded_transform():
  """T < L: the output equals the first T rows of the length-L input padded with hidden tokens."""
  L, T = 32, 13
  q, k, v = _qkv(2, L, 2, 2, 3, 4)
  params = _fft_params(3, N=2, h=4, L=L)
  short = aj.attention("fftnet_spectral_filter", q[:, :T], k[:, :T], v[:, :T], **params)
  padded = aj.attention("fftnet_spectral_filter", q, _rows_with_garbage(k, T),
                        _rows_with_garbage(v, T), kv_lengths=jnp.full((2,), T), **params)
  chex.assert_trees_all_close(padded[:, :T], short, **TOL)


@pytest.mark.slow
def test_fftnet_fully_padded_input_gives_zeros_and_finite_gradients():
  q, k, v = _qkv(2, 8, 2, 2, 3, 4)
  params = _fft_params(0, N=2, h=4, L=16)
  lengths = jnp.array([0, 8])
  fn = lambda v: aj.attention("fftnet_spectral_filter", q, k, v, kv_lengths=lengths, **params)
  out = fn(v)
  chex.assert_trees_all_close(out[0], jnp.zeros_like(out[0]))
  chex.assert_tree_all_finite(jax.grad(lambda v: jnp.sum(fn(v) ** 2))(v))


def test_fftnet_errors():
  q, k, v = _qkv(1, 20, 2, 2, 3, 4)
  params = _fft_params(0, N=2, h=4, L=16)
  with pytest.raises(ValueError, match="exceeds the maximum length L = 2 \\(F - 1\\) = 16"):
    mixers.fftnet_spectral_filter(q, k, v, **params)
  with pytest.raises(ValueError, match="segment_ids"):
    mixers.fftnet_spectral_filter(q[:, :8], k[:, :8], v[:, :8], segment_ids=jnp.zeros((1, 8), int),
                                  **params)
  with pytest.raises(ValueError, match="does not support causal"):
    mixers.fftnet_spectral_filter(q[:, :8], k[:, :8], v[:, :8], causal=True, **params)
  with pytest.raises(ValueError, match="fft_modrelu_bias"):
    mixers.fftnet_spectral_filter(q[:, :8], k[:, :8], v[:, :8],
                                  **{**params, "fft_modrelu_bias": jnp.zeros((2, 3))})


# --------------------------------------------------------------------------------------------------
# #134 Causal pairwise mixer.


def _pairwise_params(seed, *, N, h):
  return dict(pairwise_current=0.5 * _normal(seed, (N, h, h)),
              pairwise_previous=0.5 * _normal(seed + 1, (N, h, h)),
              pairwise_context=0.5 * _normal(seed + 2, (N, h, h)),
              pairwise_bias=0.1 * _normal(seed + 3, (N, h)))


def _jacobian_tj(fn, v):
  """max |∂y_t / ∂v_j| over heads and channels: `[t, j]` (batch row 0)."""
  jac = np.asarray(jax.jit(jax.jacobian(fn))(v))[0, :, :, :, 0]  # [t, n, c, j, k, c']
  return np.abs(jac).max(axis=(1, 2, 4, 5))


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_pairwise_equals_a_float64_rewrite_of_the_paper(impl):
  """y_t = GELU(v_t A + v_{t-1} B + m_t C + b), m_t the mean of v_1..v_t, per query head (GQA:
  two query heads share a value head, each with its own A, B, C, b), in a float64 loop."""
  T, N, K, h = 7, 4, 2, 3
  q, k, v = _qkv(2, T, N, K, 5, h, seed=4)
  params = _pairwise_params(2, N=N, h=h)
  out = jax.jit(lambda v: mixers.causal_pairwise_mixer(q, k, v, implementation=impl,
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
  q, k, v = _qkv(1, T, N, N, 2, h)
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
  q, k, v = _qkv(1, T, N, N, 2, h, seed=3)
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
  q, k, v = _qkv(1, T, N, N, 2, h)
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
  q, k, v = _qkv(2, T, N, K, 5, h)
  params = _pairwise_params(3, N=N, h=h)
  full = mixers.causal_pairwise_mixer(q, k, v, **params)
  step = jax.jit(lambda q, k, v, state: mixers.causal_pairwise_mixer(
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
    mixers.causal_pairwise_mixer(q, k, v, kv_lengths=jnp.array([3, 4]), return_final_state=True,
                                 **params)
  with pytest.raises(ValueError, match=r"initial_state\['sum'\]"):
    mixers.causal_pairwise_mixer(q, k, v, return_final_state=True, **params,
                                 initial_state={**state, "sum": jnp.zeros((2, N, h))})


# --------------------------------------------------------------------------------------------------
# #80 Shallow FFN replacing attention.


def _ffn_params(seed, *, N, h, L, M=6):
  return dict(ffn_in=0.3 * _normal(seed, (L, N, h, M)),
              ffn_in_bias=0.1 + 0.1 * _normal(seed + 1, (N, M)),
              ffn_out=0.3 * _normal(seed + 2, (L, N, M, h)),
              ffn_out_bias=0.1 * _normal(seed + 3, (L, N, h)))


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
  q, k, v = _qkv(2, 7, 4, 2, 3, 5)
  params = _ffn_params(0, N=4, h=5, L=10)
  out = jax.jit(lambda v: aj.attention("ffn_attention_replacement", q, k, v, causal=causal,
                                       implementation=impl, **params))(v)
  np.testing.assert_allclose(out, _ffn_direct(v, params, causal=causal), **TOL)


def test_ffn_errors_and_empty_rows():
  q, k, v = _qkv(1, 12, 2, 2, 3, 4)
  params = _ffn_params(0, N=2, h=4, L=10)
  with pytest.raises(ValueError, match="exceeds the maximum length 10"):
    mixers.ffn_attention_replacement(q, k, v, **params)
  with pytest.raises(ValueError, match="self-attention only"):
    mixers.ffn_attention_replacement(q[:, :5], k[:, :7], v[:, :7], **params)
  with pytest.raises(ValueError, match="ffn_out_bias"):
    mixers.ffn_attention_replacement(q[:, :5], k[:, :5], v[:, :5],
                                     **{**params, "ffn_out_bias": jnp.zeros((10, 2, 3))})
  out = mixers.ffn_attention_replacement(q[:, :5], k[:, :5], v[:, :5], kv_lengths=jnp.array([0]),
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
  q, k, v = _qkv(2, T, N, K, 5, h)
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
    return mixers.ffn_attention_replacement(zeros, zeros, v, causal=causal, **p)

  params = dict(ffn_in=_normal(7, (T, 1, h, M), (T * h) ** -0.5), ffn_in_bias=jnp.zeros((1, M)),
                ffn_out=_normal(8, (T, 1, M, h), M ** -0.5), ffn_out_bias=jnp.zeros((T, 1, h)))
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
  assert ffn_err < 0.7 * tokenwise_err, (ffn_err, tokenwise_err)


@pytest.mark.parametrize("name", ["fftnet_spectral_filter", "causal_pairwise_mixer",
                                  "ffn_attention_replacement"])
def test_mixers_read_only_the_values_and_reject_a_scale(name):
  """The paper's mixer reads one stream (v here): q and k leave the output bit-identical, the layer
  makes no projection for them; no scores, so a logit scale is an error, not silently ignored."""
  mech = aj.get_mechanism(name)
  assert mech.reads == frozenset({"v"})
  causal = "causal_self" in mech.patterns
  q, k, v = _qkv(2, 12, 4, 2, 8, 6)
  fn = jax.jit(lambda q, k, v: mech(q, k, v, causal=causal, **mech.example_kwargs))
  q2, k2, _ = _qkv(2, 12, 4, 2, 8, 6, seed=9)
  chex.assert_trees_all_equal(fn(q2, k2, v), fn(q, k, v))
  with pytest.raises(ValueError, match=f"{name}: `scale` must be None"):
    mech(q, k, v, causal=causal, scale=0.5, **mech.example_kwargs)
