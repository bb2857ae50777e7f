"""FFTNet (#122, arXiv:2502.18394): the spectral filter's defining properties (Parseval, the
convolution theorem), a float64 rewrite of the paper's equations, padding, clear errors, and that
it reads only the values v.

The contract itself (shapes, dtypes, patterns, implementations agreeing, batch independence, the
inputs each reads) is checked for every registered mechanism by tests/conformance.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

import attnjax as aj
from attnjax.ops.mixers.fftnet import fftnet_spectral_filter, spectral_filter
from tests import inputs
from tests import tolerances
from tests.ops.mixers import mixer_checks

TOL = tolerances.output(jnp.float32)


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


def _fft_params(seed, *, N, h, L, M=4, context=0.1):
  F = L // 2 + 1
  return dict(fft_filter=1.0 + 0.3 * mixer_checks.normal(seed, (F, N, h)),
              fft_context_in=0.3 * mixer_checks.normal(seed + 1, (N, h, M)),
              fft_context_in_bias=0.1 * mixer_checks.normal(seed + 2, (N, M)),
              fft_context_out=context * mixer_checks.normal(seed + 3, (N, M, F, h)),
              fft_modrelu_bias=-0.1 + 0.05 * mixer_checks.normal(seed + 4, (N, h)))


def test_fftnet_is_fft_based_with_no_quadratic_matrix():
  T = L = 64
  q, k, v = inputs.qkv(B=1, T=T, N=2, K=1, H=3, h=5, key_per_array=True)
  params = _fft_params(0, N=2, h=5, L=L)
  fn = lambda q, k, v: fftnet_spectral_filter(q, k, v, implementation="xla", **params)
  most, prims = _max_dims_of_size(fn, T, q, k, v)
  assert "fft" in prims
  assert most == 1, "an intermediate array has two sequence-length axes (a [T, T] matrix)"


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_spectral_filter_all_pass_preserves_energy(impl):
  """Parseval: a real unit-magnitude (all-pass) filter with no activation keeps ‖y‖ = ‖x‖."""
  L = 16
  x = mixer_checks.normal(0, (2, L, 3, 4))
  signs = jnp.sign(mixer_checks.normal(1, (1, L // 2 + 1, 3, 4)))
  y = spectral_filter(x, signs, length=L, implementation=impl)
  np.testing.assert_allclose(jnp.sum(y ** 2, axis=1), jnp.sum(x ** 2, axis=1), **TOL)
  # The spectrum side of Parseval for the rfft: Σ|x|² = (|X_0|² + 2 Σ|X_f|² + |X_{L/2}|²) / L.
  spec = jnp.abs(jnp.fft.rfft(x, axis=1)) ** 2
  weights = jnp.array([1.0] + [2.0] * (L // 2 - 1) + [1.0])[None, :, None, None]
  np.testing.assert_allclose(jnp.sum(weights * spec, axis=1) / L, jnp.sum(x ** 2, axis=1), **TOL)
  # A non-unit filter does change the energy (the check above is not vacuous).
  y2 = spectral_filter(x, 2.0 * signs, length=L, implementation=impl)
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
  x = mixer_checks.normal(0, (2, S, 3, 4))
  filt = mixer_checks.normal(1, (2, L // 2 + 1, 3, 4))
  y = spectral_filter(x, filt, length=L, implementation=impl)
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
  q, k, v = inputs.qkv(B=2, T=T, N=N, K=K, H=H, h=h, key_per_array=True)
  params = _fft_params(5, N=N, h=h, L=L, context=0.2)
  out = jax.jit(lambda v: aj.attention("fftnet_spectral_filter", q, k, v, activation=activation,
                                       implementation=impl, **params))(v)
  np.testing.assert_allclose(out, _fftnet_direct(v, params, L=L, activation=activation), **TOL)


def test_fftnet_linear_filter_is_the_circular_convolution_of_the_values():
  """Without modReLU: circular convolution of the zero-padded values with irfft(W + ΔW)."""
  T, L, N, h = 10, 16, 2, 3
  q, k, v = inputs.qkv(B=1, T=T, N=N, K=N, H=4, h=h, key_per_array=True)
  params = _fft_params(2, N=N, h=h, L=L, context=0.0)        # ΔW = 0: the filter is W
  out = jax.jit(lambda v: aj.attention("fftnet_spectral_filter", q, k, v, activation=False,
                                       **params))(v)
  kernel = np.fft.irfft(np.asarray(params["fft_filter"], np.float64)[None], n=L, axis=1)
  want = _circular_convolution(np.asarray(v, np.float64), kernel)[:, :T]
  np.testing.assert_allclose(out, want, **TOL)


def test_fftnet_all_pass_without_activation_preserves_energy_per_channel():
  T = L = 16
  q, k, v = inputs.qkv(B=2, T=T, N=4, K=2, H=3, h=5, key_per_array=True)
  params = _fft_params(0, N=4, h=5, L=L, context=0.0)
  params["fft_filter"] = jnp.sign(params["fft_filter"] - 1.0)
  out = aj.attention("fftnet_spectral_filter", q, k, v, activation=False, **params)
  v_heads = jnp.repeat(v, 2, axis=2)           # GQA: query head n mixes kv head n // 2
  np.testing.assert_allclose(jnp.sum(out ** 2, axis=1), jnp.sum(v_heads ** 2, axis=1), **TOL)
  assert not np.allclose(out, v_heads, atol=tolerances.CHANGED_MAX_ABS)  # the filter mixes the sequence


def test_fftnet_short_sequence_is_the_zero_padded_transform():
  """T < L: the output equals the first T rows of the length-L input padded with hidden tokens."""
  L, T = 32, 13
  q, k, v = inputs.qkv(B=2, T=L, N=2, K=2, H=3, h=4, key_per_array=True)
  params = _fft_params(3, N=2, h=4, L=L)
  short = aj.attention("fftnet_spectral_filter", q[:, :T], k[:, :T], v[:, :T], **params)
  padded = aj.attention("fftnet_spectral_filter", q, _rows_with_garbage(k, T),
                        _rows_with_garbage(v, T), kv_lengths=jnp.full((2,), T), **params)
  chex.assert_trees_all_close(padded[:, :T], short, **TOL)


@pytest.mark.slow
def test_fftnet_fully_padded_input_gives_zeros_and_finite_gradients():
  q, k, v = inputs.qkv(B=2, T=8, N=2, K=2, H=3, h=4, key_per_array=True)
  params = _fft_params(0, N=2, h=4, L=16)
  lengths = jnp.array([0, 8])
  fn = lambda v: aj.attention("fftnet_spectral_filter", q, k, v, kv_lengths=lengths, **params)
  out = fn(v)
  chex.assert_trees_all_close(out[0], jnp.zeros_like(out[0]))
  chex.assert_tree_all_finite(jax.grad(lambda v: jnp.sum(fn(v) ** 2))(v))


def test_fftnet_errors():
  q, k, v = inputs.qkv(B=1, T=20, N=2, K=2, H=3, h=4, key_per_array=True)
  params = _fft_params(0, N=2, h=4, L=16)
  with pytest.raises(ValueError, match="exceeds the maximum length L = 2 \\(F - 1\\) = 16"):
    fftnet_spectral_filter(q, k, v, **params)
  with pytest.raises(ValueError, match="segment_ids"):
    fftnet_spectral_filter(q[:, :8], k[:, :8], v[:, :8], segment_ids=jnp.zeros((1, 8), int),
                           **params)
  with pytest.raises(ValueError, match="does not support causal"):
    fftnet_spectral_filter(q[:, :8], k[:, :8], v[:, :8], causal=True, **params)
  with pytest.raises(ValueError, match="fft_modrelu_bias"):
    fftnet_spectral_filter(q[:, :8], k[:, :8], v[:, :8],
                           **{**params, "fft_modrelu_bias": jnp.zeros((2, 3))})


def test_reads_only_the_values_and_rejects_a_scale():
  mixer_checks.check_reads_only_values_and_rejects_scale("fftnet_spectral_filter")


def test_signature_shapes_hold_under_jaxtyped():
  mixer_checks.check_signature_shapes("fftnet_spectral_filter")
