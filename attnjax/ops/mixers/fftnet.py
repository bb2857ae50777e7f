"""FFTNet: adaptive spectral filtering of the sequence, in place of self-attention.

Paper: Fein-Ashley, "The FFT Strikes Back: An Efficient Alternative to Self-Attention",
arXiv:2502.18394 (catalog #122).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from attnjax.core import implementations
from attnjax.core import mixing
from attnjax.core.mixing import DEFAULT_MAX_LENGTH, precise_einsum
from attnjax.registry import Mechanism, ParamSpec, example_arrays, register
from attnjax.typing import Array, Float, Lengths, Output, Query, Key, Value

__all__ = ["FFT_CONTEXT_HIDDEN", "fftnet_spectral_filter", "modrelu", "spectral_filter"]

_F32 = jnp.float32
FFT_CONTEXT_HIDDEN = 32      # width of FFTNet's context MLP
# Maximum length L of the example's filter (an example setting: the conformance sequences fit it).
EXAMPLE_MAX_LENGTH = 32

# Shapes in the signatures (jaxtyping; letters of `attnjax.typing`, plus F = L/2 + 1 rfft bins of
# the maximum length L and M the context MLP's width).
Channels = Float[Array, "*shape"]
SequenceBlock = Float[Array, "B S N h"]
PaddedBlock = Float[Array, "B L N h"]
Spectrum = Float[Array, "#B F N h"]
BaseFilter = Float[Array, "F N h"]
ContextIn = Float[Array, "N h M"]
ContextInBias = Float[Array, "N M"]
ContextOut = Float[Array, "N M F h"]
HeadBias = Float[Array, "N h"]


def modrelu(re: Channels, im: Channels, bias: jax.Array) -> tuple[Channels, Channels]:
  """modReLU on complex numbers given as (real, imag): `ReLU(|z| + b) · z / |z|`, 0 at z = 0.

  Arjovsky et al., "Unitary Evolution Recurrent Neural Networks", arXiv:1511.06464; FFTNet applies
  it to the filtered frequency coefficients. The division is guarded so that z = 0 (e.g. a fully
  padded input) gives 0 and a finite gradient.
  """
  r2 = re * re + im * im
  nonzero = r2 > 0
  mag = jnp.sqrt(jnp.where(nonzero, r2, 1.0))
  gain = jnp.where(nonzero, jax.nn.relu(mag + bias) / mag, 0.0)
  return re * gain, im * gain


def _spectral_filter_xla(x, filt, length, modrelu_bias):
  """jnp.fft: O(L log L)."""
  spec = jnp.fft.rfft(x, n=length, axis=1)
  re, im = jnp.real(spec) * filt, jnp.imag(spec) * filt
  if modrelu_bias is not None:
    re, im = modrelu(re, im, modrelu_bias)
  return jnp.fft.irfft(lax.complex(re, im), n=length, axis=1)


def _spectral_filter_reference(x, filt, length, modrelu_bias):
  """Explicit DFT sums: O(S·F + F·L)."""
  F = length // 2 + 1
  s = np.arange(x.shape[1])[:, None] * np.arange(F)[None, :] * (2 * np.pi / length)
  re = precise_einsum("bsnc,sf->bfnc", x, jnp.asarray(np.cos(s), _F32)) * filt
  im = -precise_einsum("bsnc,sf->bfnc", x, jnp.asarray(np.sin(s), _F32)) * filt
  if modrelu_bias is not None:
    re, im = modrelu(re, im, modrelu_bias)
  # irfft: y_n = (1/L) Σ_f c_f (Re Z_f cos(2π f n / L) - Im Z_f sin(2π f n / L)), with c_f = 2
  # except at f = 0 and f = L/2 (whose imaginary parts irfft ignores; sin vanishes there too).
  c = np.full(F, 2.0)
  c[0] = c[-1] = 1.0
  a = np.arange(F)[:, None] * np.arange(length)[None, :] * (2 * np.pi / length)
  cos = jnp.asarray(c[:, None] * np.cos(a) / length, _F32)
  sin = jnp.asarray(c[:, None] * np.sin(a) / length, _F32)
  return precise_einsum("bfnc,fl->blnc", re, cos) - precise_einsum("bfnc,fl->blnc", im, sin)


_SPECTRAL_FILTER_IMPLEMENTATIONS = (("xla", _spectral_filter_xla, ()),
                                    ("reference", _spectral_filter_reference, ()))


def spectral_filter(x: SequenceBlock, filt: Spectrum, *, length: int,
                    modrelu_bias: Optional[HeadBias] = None,
                    implementation: Optional[str] = None) -> PaddedBlock:
  """`irfft(σ(rfft(x, n=L) ⊙ W), n=L)`: global mixing along axis 1 by an L-point spectral filter.

  Args:
    x: `[B, S, N, h]` real, S <= L (zero-padded to L).
    filt: real filter `[B or 1, F, N, h]`, F = L/2 + 1 rfft bins of the even length L.
    length: L.
    modrelu_bias: `[N, h]` modReLU bias, or None for no activation (a linear filter).
    implementation: "xla" (jnp.fft, O(L log L)), "reference" (explicit DFT sums, O(S·F + F·L)),
      or None (the first that serves the input).

  Returns:
    `[B, L, N, h]` float32. With |W| = 1 and no activation the map is orthogonal up to the padding:
    ‖y‖² = ‖x‖² (Parseval), since a real unit-magnitude filter keeps the spectrum Hermitian.
  """
  return implementations.dispatch("spectral_filter", _SPECTRAL_FILTER_IMPLEMENTATIONS,
                                  implementation, x.astype(_F32), filt, length, modrelu_bias)


def fftnet_spectral_filter(q: Query, k: Key, v: Value, *,
                           fft_filter: BaseFilter, fft_context_in: ContextIn,
                           fft_context_in_bias: ContextInBias, fft_context_out: ContextOut,
                           fft_modrelu_bias: HeadBias, activation: bool = True,
                           causal: bool = False, segment_ids=None, q_offset=0,
                           kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                           implementation: Optional[str] = None) -> Output:
  """FFTNet: FFT the values along the sequence, multiply by a context-adapted filter, modReLU, iFFT.

      c = (1/T) Σ_j v_j                                   global context           [B, N, h]
      ΔW = GELU(c W_1 + b_1) W_2                          context MLP (erf GELU)   [B, F, N, h]
      y = irfft(modReLU(rfft(v, n=L) ⊙ (W + ΔW), b), n=L)[:T]

  per head, over the F = L/2 + 1 rfft bins of the filter's maximum length L (a shorter sequence is
  zero-padded to L, so the same learned filter serves every length); O(L log L), no [T, T] matrix.

  Paper: Fein-Ashley, "The FFT Strikes Back: An Efficient Alternative to Self-Attention",
  arXiv:2502.18394. The paper filters the layer input x and takes its context as the mean of that
  same x: one stream. Here that stream is each head's values v (`reads={"v"}`: q and k are not
  read, and the layer creates no projection for them); the context is the per-head mean of v (the
  authors' code feeds the mean of all of x to one MLP). rfft/irfft of the real signal with a real
  filter is the paper's FFT → filter → modReLU → iFFT → real part, with the spectrum Hermitian.

  Args:
    q: `[B, T, N, H]`, k: `[B, S, K, H]`: not read (shapes only). v: `[B, S, K, h]`; T == S
      (non-causal self-attention).
    fft_filter: base filter W, `[F, N, h]` (L = 2 (F - 1) is the maximum length).
    fft_context_in: `[N, h, M]`, fft_context_in_bias: `[N, M]`: first MLP layer on the context.
    fft_context_out: `[N, M, F, h]`: second MLP layer, giving ΔW.
    fft_modrelu_bias: `[N, h]` modReLU bias b.
    activation: apply modReLU (False: a linear, context-adapted filter).
    causal, segment_ids, q_offset: must be the defaults (non-causal, unpacked, no cache).
    kv_lengths: `[B]`: tokens at or past the length are padding (zeroed; left out of the context).
    scale: must be None (no scores). implementation: "xla" (jnp.fft) or "reference" (explicit
      DFT sums); see `spectral_filter`.

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "fftnet_spectral_filter"
  mixing.check_self_pattern(op, causal, allowed=(False,))
  if segment_ids is not None:
    raise ValueError(f"{op}: packed sequences (`segment_ids`) are not supported: the spectral "
                     "filter mixes the whole padded sequence")
  p = mixing.prepare_mixer_inputs(op, q, k, v, segment_ids=None, q_offset=q_offset,
                                  kv_lengths=kv_lengths, scale=scale, decode=False)
  _, T, S, N, _, _, h = p.dims
  if jnp.ndim(fft_filter) != 3 or fft_filter.shape[0] < 2:
    raise ValueError(f"{op}: `fft_filter` must have shape [F, N, h] with F >= 2 rfft bins, got "
                     f"{jnp.shape(fft_filter)}")
  F = fft_filter.shape[0]
  L = 2 * (F - 1)
  M = jnp.shape(fft_context_in)[-1]
  base = mixing.check_param(op, "fft_filter", fft_filter, (F, N, h), "[F, N, h]")
  w1 = mixing.check_param(op, "fft_context_in", fft_context_in, (N, h, M), "[N, h, M]")
  b1 = mixing.check_param(op, "fft_context_in_bias", fft_context_in_bias, (N, M), "[N, M]")
  w2 = mixing.check_param(op, "fft_context_out", fft_context_out, (N, M, F, h), "[N, M, F, h]")
  bias = mixing.check_param(op, "fft_modrelu_bias", fft_modrelu_bias, (N, h), "[N, h]")
  if S > L:
    raise ValueError(f"{op}: sequence length {S} exceeds the maximum length L = 2 (F - 1) = {L} "
                     f"of `fft_filter` [F, N, h]; create it with more bins (default "
                     f"{DEFAULT_MAX_LENGTH} in attnjax.nn)")

  # Per example: the mean over that example's own valid tokens (padding is zero in p.v).
  count = jnp.sum(p.valid, axis=1).astype(_F32)[:, None, None]
  context = jnp.sum(p.v, axis=1) / jnp.maximum(count, 1.0)
  hidden = jax.nn.gelu(precise_einsum("bnc,ncm->bnm", context, w1) + b1, approximate=False)
  filt = base[None] + precise_einsum("bnm,nmfc->bfnc", hidden, w2)
  out = spectral_filter(p.v, filt, length=L, modrelu_bias=bias if activation else None,
                        implementation=implementation)
  return out[:, :T].astype(q.dtype)


def _example(*, N: int = 4, h: int = 6):
  """Arrays at N heads and value width h, with the filter's maximum length EXAMPLE_MAX_LENGTH."""
  F = EXAMPLE_MAX_LENGTH // 2 + 1
  return example_arrays(122, {
      "fft_filter": ((F, N, h), 1.0, 0.3),
      "fft_context_in": ((N, h, 8), 0.0, 0.3),
      "fft_context_in_bias": ((N, 8), 0.0, 0.1),
      "fft_context_out": ((N, 8, F, h), 0.0, 0.1),
      "fft_modrelu_bias": ((N, h), -0.2, 0.1),
  })


register(Mechanism(
    name="fftnet_spectral_filter", fn=fftnet_spectral_filter, family="alternative-mixer",
    seeds=(122,), paper="The FFT Strikes Back: An Efficient Alternative to Self-Attention",
    arxiv="2502.18394", patterns=frozenset({"self"}), gqa=True, decode=False, packed=False,
    reads=frozenset({"v"}),  # the paper mixes one stream: filter and context both come from x
    complexity="O(L log L), L = maximum length >= T", implementations=("xla", "reference"),
    # The layer creates the value width h equal to the head dim H.
    params=(
        ParamSpec("fft_filter", lambda N, K, H: (DEFAULT_MAX_LENGTH // 2 + 1, N, H),
                  jax.nn.initializers.ones),
        ParamSpec("fft_context_in", lambda N, K, H: (N, H, FFT_CONTEXT_HIDDEN),
                  jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=1,
                                                       out_axis=2, batch_axis=0)),
        ParamSpec("fft_context_in_bias", lambda N, K, H: (N, FFT_CONTEXT_HIDDEN),
                  jax.nn.initializers.zeros),
        # Zero: the filter starts as the base filter, and the MLP learns how context adapts it.
        ParamSpec("fft_context_out",
                  lambda N, K, H: (N, FFT_CONTEXT_HIDDEN, DEFAULT_MAX_LENGTH // 2 + 1, H),
                  jax.nn.initializers.zeros),
        ParamSpec("fft_modrelu_bias", lambda N, K, H: (N, H), jax.nn.initializers.zeros),
    ),
    example=_example))
