"""The attention-free token mixers: each paper's defining property, explicit-loop forms, decode over a
cache for every variant, packed runs, clear errors, and FFN distillation towards softmax attention.

The contract itself (shapes, dtypes, patterns, implementations agreeing, decode, packing) is
checked for every registered mechanism by tests/conformance.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import attnjax as aj
from attnjax.ops import mixers
from tests import tolerances

TOL = tolerances.output(jnp.float32)
GRAD_TOL = tolerances.grad(jnp.float32)


def _normal(seed, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.PRNGKey(seed), shape, jnp.float32)


def _qkv(B, T, N, K, H, h, seed=0):
  return _normal(seed, (B, T, N, H)), _normal(seed + 1, (B, T, K, H)), _normal(seed + 2, (B, T, K, h))


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


def _fft_params(seed, *, N, H, h, L, M=4, context=0.1):
  F = L // 2 + 1
  return dict(fft_filter=1.0 + 0.3 * _normal(seed, (F, N, h)),
              fft_context_in=0.3 * _normal(seed + 1, (N, H, M)),
              fft_context_in_bias=0.1 * _normal(seed + 2, (N, M)),
              fft_context_out=context * _normal(seed + 3, (N, M, F, h)),
              fft_modrelu_bias=-0.1 + 0.05 * _normal(seed + 4, (N, h)))


def test_fftnet_is_fft_based_with_no_quadratic_matrix():
  T = L = 64
  q, k, v = _qkv(1, T, 2, 1, 3, 5)
  params = _fft_params(0, N=2, H=3, h=5, L=L)
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


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_fftnet_linear_filter_is_the_circular_convolution_of_the_values(impl):
  """Without modReLU the mechanism is circular convolution of each head's zero-padded values with
  irfft(W + ΔW), ΔW from the context MLP on the mean key (checked here by recomputing ΔW)."""
  T, L, N, K, H, h = 10, 16, 4, 2, 3, 5
  q, k, v = _qkv(2, T, N, K, H, h)
  params = _fft_params(5, N=N, H=H, h=h, L=L, context=0.2)
  out = aj.attention("fftnet_spectral_filter", q, k, v, activation=False, implementation=impl,
                     **params)
  p = {n: np.asarray(x, np.float64) for n, x in params.items()}
  context = np.asarray(k, np.float64).mean(1).repeat(2, axis=1)                  # [B, N, H]
  pre = np.einsum("bnd,ndm->bnm", context, p["fft_context_in"]) + p["fft_context_in_bias"]
  hidden = np.asarray(jax.nn.gelu(pre), np.float64)
  filt = p["fft_filter"][None] + np.einsum("bnm,nmfc->bfnc", hidden, p["fft_context_out"])
  kernel = np.fft.irfft(filt, n=L, axis=1)
  want = _circular_convolution(np.asarray(v, np.float64).repeat(2, axis=2), kernel)[:, :T]
  np.testing.assert_allclose(out, want, **TOL)


def test_fftnet_all_pass_without_activation_preserves_energy_per_channel():
  T = L = 16
  q, k, v = _qkv(2, T, 4, 2, 3, 5)
  params = _fft_params(0, N=4, H=3, h=5, L=L, context=0.0)
  params["fft_filter"] = jnp.sign(params["fft_filter"] - 1.0)
  out = aj.attention("fftnet_spectral_filter", q, k, v, activation=False, **params)
  v_heads = jnp.repeat(v, 2, axis=2)           # GQA: query head n mixes kv head n // 2
  np.testing.assert_allclose(jnp.sum(out ** 2, axis=1), jnp.sum(v_heads ** 2, axis=1), **TOL)
  assert not np.allclose(out, v_heads, atol=1e-3)  # the filter does mix the sequence


def test_fftnet_short_sequence_is_the_zero_padded_transform():
  """T < L: the output equals the first T rows of the length-L input padded with hidden tokens."""
  L, T = 32, 13
  q, k, v = _qkv(2, L, 2, 2, 3, 4)
  params = _fft_params(3, N=2, H=3, h=4, L=L)
  short = aj.attention("fftnet_spectral_filter", q[:, :T], k[:, :T], v[:, :T], **params)
  padded = aj.attention("fftnet_spectral_filter", q, _rows_with_garbage(k, T),
                        _rows_with_garbage(v, T), kv_lengths=jnp.full((2,), T), **params)
  chex.assert_trees_all_close(padded[:, :T], short, **TOL)


@pytest.mark.slow
def test_fftnet_fully_padded_input_gives_zeros_and_finite_gradients():
  q, k, v = _qkv(2, 8, 2, 2, 3, 4)
  params = _fft_params(0, N=2, H=3, h=4, L=16)
  lengths = jnp.array([0, 8])
  fn = lambda v: aj.attention("fftnet_spectral_filter", q, k, v, kv_lengths=lengths, **params)
  out = fn(v)
  chex.assert_trees_all_close(out[0], jnp.zeros_like(out[0]))
  chex.assert_tree_all_finite(jax.grad(lambda v: jnp.sum(fn(v) ** 2))(v))


def test_fftnet_errors():
  q, k, v = _qkv(1, 20, 2, 2, 3, 4)
  params = _fft_params(0, N=2, H=3, h=4, L=16)
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
  jac = np.asarray(jax.jacobian(fn)(v))[0, :, :, :, 0]         # [t, n, c, j, k, c']
  return np.abs(jac).max(axis=(1, 2, 4, 5))


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
  jac = np.asarray(jax.jacobian(fn)(v))[0, :, :, :, 0]          # [t, n, c, j, k, c']
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
  state, outs = None, []
  for t in range(T):
    out, state = mixers.causal_pairwise_mixer(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1],
                                              initial_state=state, return_final_state=True,
                                              **params)
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


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_ffn_equals_the_flattened_sequence_ffn(causal, impl):
  q, k, v = _qkv(2, 7, 4, 2, 3, 5)
  params = _ffn_params(0, N=4, h=5, L=10)
  out = aj.attention("ffn_attention_replacement", q, k, v, causal=causal, implementation=impl,
                     **params)
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


def test_distill_loss():
  a, b = _normal(0, (2, 3, 4)), _normal(1, (2, 3, 4))
  np.testing.assert_allclose(mixers.distill_loss(a, b), jnp.mean((a - b) ** 2), **TOL)
  assert float(mixers.distill_loss(a, a)) == 0.0
  grad_teacher = jax.grad(mixers.distill_loss, argnums=1)(a, b)
  assert float(jnp.abs(grad_teacher).max()) == 0.0          # the teacher is held fixed
  with pytest.raises(ValueError, match="same shape"):
    mixers.distill_loss(a, b[:, :2])


@pytest.mark.parametrize("causal", [False, True])
def test_ffn_distillation_approaches_softmax_attention(causal):
  """A few optax steps on the distillation loss move the FFN towards softmax attention's outputs."""
  B, T, N, K, H = 2, 8, 2, 2, 4
  q, k, v = _qkv(B, T, N, K, H, H, seed=5)
  teacher = aj.attention("softmax", q, k, v, causal=causal)
  mech = aj.get_mechanism("ffn_attention_replacement")
  keys = jax.random.split(jax.random.PRNGKey(0), len(mech.params))
  params = {s.name: s.init(key, s.shape(N, K, H), jnp.float32)
            for s, key in zip(mech.params, keys, strict=True)}
  loss_fn = lambda p: mixers.distill_loss(mech(q, k, v, causal=causal, **p), teacher)
  opt = optax.adam(1e-2)

  @jax.jit
  def step(p, state):
    loss, grads = jax.value_and_grad(loss_fn)(p)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(p, updates), state, loss

  state = opt.init(params)
  first = float(loss_fn(params))
  for _ in range(30):
    params, state, _ = step(params, state)
  last = float(loss_fn(params))
  assert last < 0.25 * first, (first, last)
