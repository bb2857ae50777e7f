"""The multi-dimensional damped exponential moving average (EMA) of Mega, in its two forms.

Paper: Ma et al., "Mega: Moving Average Equipped Gated Attention", arXiv:2209.10655, section 3.1,
eqs. (2)-(3). Per channel, with an expansion to `ndim` EMA components:

    h_t = α ⊙ β x_t + (1 - α ⊙ δ) ⊙ h_{t-1}  ∈ R^ndim,     y_t = η · h_t

`ema_recurrence` runs it as a scan (O(T), any document boundaries); `ema_convolution` as the
equivalent causal convolution with the closed-form kernel `ema_kernel` (an FFT, O(T log T));
`multidim_ema` is Mega's (bi)directional EMA over `[B, T, K, H]`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import contract
from attnjax.core import implementations


def ema_coefficients(alpha, delta, beta, eta):
  """(input weight `α·β`, decay `φ = 1 - α·δ`, readout `η`) from the raw EMA parameters.

  `alpha`, `delta` are logits (α = σ(alpha), δ = σ(delta) keep 0 < φ < 1, a damped, stable EMA);
  every array is `[..., ndim]` (e.g. `[K, H, ndim]`), float32.
  """
  a = jax.nn.sigmoid(jnp.asarray(alpha, jnp.float32))
  d = jax.nn.sigmoid(jnp.asarray(delta, jnp.float32))
  return a * jnp.asarray(beta, jnp.float32), 1.0 - a * d, jnp.asarray(eta, jnp.float32)


def ema_recurrence(x, alpha, delta, beta, eta, *, reverse: bool = False, starts=None):
  """Multi-dimensional damped EMA as a recurrence (`lax.scan`), Mega eq. (2)-(3):

      h_t = α ⊙ β x_t + (1 - α ⊙ δ) ⊙ h_{t-1}  ∈ R^ndim (per channel),   y_t = η · h_t

  Args:
    x: `[B, T, K, H]`; alpha, delta, beta, eta: `[K, H, ndim]`.
    reverse: run from the end (the backward half of the bidirectional EMA).
    starts: `[B, T]` bool, True where the state restarts from zero (a new packed document; for
      `reverse`, the last position of a document).

  Returns:
    `[B, T, K, H]` float32.
  """
  ab, phi, eta = ema_coefficients(alpha, delta, beta, eta)
  xs = jnp.moveaxis(jnp.asarray(x, jnp.float32), 1, 0)
  st = (jnp.zeros(xs.shape[:2], bool) if starts is None else jnp.moveaxis(starts, 1, 0))

  def step(state, inp):
    x_t, start_t = inp
    state = jnp.where(start_t[:, None, None, None], 0.0, state)
    state = phi * state + ab * x_t[..., None]
    return state, jnp.sum(eta * state, axis=-1)

  init = jnp.zeros(xs.shape[1:] + (phi.shape[-1],), jnp.float32)
  _, ys = jax.lax.scan(step, init, (xs, st), reverse=reverse)
  return jnp.moveaxis(ys, 0, 1)


def ema_kernel(alpha, delta, beta, eta, length: int):
  """The EMA's convolution kernel `K_l = Σ_j η_j α_j β_j φ_j^l`, `l = 0..length-1`:
  `[length, K, H]`."""
  ab, phi, eta = ema_coefficients(alpha, delta, beta, eta)
  lags = jnp.arange(length, dtype=jnp.float32).reshape((length,) + (1,) * phi.ndim)
  return jnp.sum(eta * ab * jnp.exp(lags * jnp.log(phi)), axis=-1)


def ema_convolution(x, alpha, delta, beta, eta, *, reverse: bool = False):
  """The same EMA as a causal convolution `y_t = Σ_{l<=t} K_l x_{t-l}`, evaluated with an FFT of
  length 2T (O(T log T)); `reverse` convolves from the end. Shapes as `ema_recurrence`."""
  x = jnp.asarray(x, jnp.float32)
  T = x.shape[1]
  if reverse:
    x = jnp.flip(x, axis=1)
  kern = ema_kernel(alpha, delta, beta, eta, T)
  y = jnp.fft.irfft(jnp.fft.rfft(x, n=2 * T, axis=1) * jnp.fft.rfft(kern, n=2 * T, axis=0)[None],
                    n=2 * T, axis=1)[:, :T]
  return jnp.flip(y, axis=1) if reverse else y


def _multidim_ema_reference(x, params, causal, segment_ids):
  """Scans (`ema_recurrence`), restarting at document boundaries."""
  B, T = x.shape[:2]
  first = last = None
  if segment_ids is not None:
    start, end = contract.document_bounds(segment_ids, B, T)
    idx = jnp.arange(T, dtype=jnp.int32)[None]
    first, last = start == idx, end == idx + 1
  out = 0.0
  for d in (0,) if causal else (0, 1):
    out = out + ema_recurrence(x, *(p[d] for p in params), reverse=d == 1,
                               starts=first if d == 0 else last)
  return out


def _multidim_ema_xla(x, params, causal, segment_ids):
  """FFT convolutions (`ema_convolution`); the scan with documents, where a convolution would leak
  across them."""
  if segment_ids is not None:
    return _multidim_ema_reference(x, params, causal, segment_ids)
  out = 0.0
  for d in (0,) if causal else (0, 1):
    out = out + ema_convolution(x, *(p[d] for p in params), reverse=d == 1)
  return out


_MULTIDIM_EMA_IMPLEMENTATIONS = (("xla", _multidim_ema_xla, ()),
                                 ("reference", _multidim_ema_reference, ()))


def multidim_ema(x, alpha, delta, beta, eta, *, causal: bool, segment_ids=None,
                 implementation: Optional[str] = None):
  """Mega's EMA over `x: [B, T, K, H]` with parameters `[2, K, H, ndim]` (index 0: forward, 1:
  backward). Causal: the forward EMA only; otherwise the paper's bidirectional EMA, the sum of a
  forward and a backward EMA with their own parameters. `segment_ids` `[B, T]` restart it at
  document boundaries. `implementation`: "xla" (FFT convolution; the scan with documents), or
  "reference" (scan); None: the first that serves."""
  return implementations.dispatch("multidim_ema", _MULTIDIM_EMA_IMPLEMENTATIONS, implementation,
                                  x, (alpha, delta, beta, eta), causal, segment_ids)


__all__ = ["ema_coefficients", "ema_recurrence", "ema_kernel", "ema_convolution", "multidim_ema"]
