"""Depthwise causal convolutions over a `[B, S, K, H]` stream, and a stabilized long kernel.

Used by CHELA (Liu et al., "Short-Long Convolutions Help Hardware-Efficient Linear Attention to
Focus on Long Sequences", arXiv:2406.08128): `causal_conv` computes `y_t = Σ_{l<L} κ_l x_{t-l}`
per channel, directly (any packed documents) or with an FFT; `stabilized_long_kernel` bounds a long
learned kernel's gain.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

_F32 = jnp.float32


def stabilized_long_kernel(long_kernel, long_decay):
  """The long kernel, stabilized: `κ_l = w_l e^{-λ l} / Σ_l |w_l e^{-λ l}|`, λ = softplus(decay).

  The exponential window keeps distant taps small (near emphasized, far neglected, the SSM memory
  pattern) and the L1 normalization bounds the convolution's gain by 1 (|y| <= max |x|) whatever
  the raw weights, the hand-made regularization long convolutions otherwise need.
  `long_kernel: [K, H, L]`, `long_decay: [K, H]` -> `[K, H, L]` float32.
  """
  w = jnp.asarray(long_kernel, _F32)
  lam = jax.nn.softplus(jnp.asarray(long_decay, _F32))[..., None]
  kern = w * jnp.exp(-lam * jnp.arange(w.shape[-1], dtype=_F32))
  return kern / jnp.maximum(jnp.sum(jnp.abs(kern), axis=-1, keepdims=True), 1e-6)


def causal_conv(x, kernel, *, method: str = "direct", segment_ids=None):
  """Depthwise causal convolution `y_t = Σ_{l<L} κ_l x_{t-l}` (within each packed document).

  `x: [B, S, K, H]`, `kernel: [K, H, L]` -> `[B, S, K, H]` float32. "direct" sums the L shifted
  taps (a scan, O(S·L) time, O(S) memory, honours `segment_ids`); "fft" multiplies spectra of
  length S + L (O(S log S); no documents, since the FFT would mix them).
  """
  x = jnp.asarray(x, _F32)
  kernel = jnp.asarray(kernel, _F32)
  B, S = x.shape[:2]
  L = min(kernel.shape[-1], S)          # taps beyond S never reach a position
  kernel = kernel[..., :L]
  if method == "fft":
    if segment_ids is not None:
      raise ValueError("causal_conv: the FFT method cannot honour `segment_ids`; use 'direct'")
    n = S + L
    spec = jnp.fft.rfft(x, n=n, axis=1) * jnp.moveaxis(jnp.fft.rfft(kernel, n=n, axis=-1), -1, 0)
    return jnp.fft.irfft(spec, n=n, axis=1)[:, :S]
  if method != "direct":
    raise ValueError(f"causal_conv: `method` must be 'direct' or 'fft', got {method!r}")
  xp = jnp.pad(x, ((0, 0), (L, 0), (0, 0), (0, 0)))       # zeros before the start
  seg = jnp.zeros((B, S), jnp.int32) if segment_ids is None else jnp.asarray(segment_ids)
  segp = jnp.pad(seg, ((0, 0), (L, 0)), mode="edge")

  def tap(acc, inp):
    lag, kern_l = inp
    shifted = jax.lax.dynamic_slice_in_dim(xp, L - lag, S, axis=1)
    same = jax.lax.dynamic_slice_in_dim(segp, L - lag, S, axis=1) == seg
    return acc + kern_l * jnp.where(same[..., None, None], shifted, 0.0), None

  y, _ = jax.lax.scan(tap, jnp.zeros_like(x), (jnp.arange(L), jnp.moveaxis(kernel, -1, 0)))
  return y


__all__ = ["causal_conv", "stabilized_long_kernel"]
