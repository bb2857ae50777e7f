"""Local additive (Bahdanau) attention over frames, and which temporal offsets it attends.

Paper: "Revisiting the Onsets and Frames Model with Additive Attention", arXiv:2104.06607. Each frame
t attends to the frames s of a bounded context |t - s| <= r with additive scores

  e[t, s] = v · tanh(W x_t + U x_s),   a[t, s] = softmax_s(e[t, s] masked to |t - s| <= r),
  out[t] = Σ_s a[t, s] x_s.

Shapes: x [B, T, D]; params {"W": [D, A], "U": [D, A], "v": [A]}; weights [B, T, T].
`offset_profile` averages a[t, t + o] over batch and frames for o in [-r, r] (sums to 1): which
context the model uses, the paper's probe as the range r varies. The paper's text was not reachable
here; the score is Bahdanau's additive one with the window mask, and the values are the frames
themselves (no value projection): those choices are ours.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from attnjax import catalog
from attnjax.analysis import statistics

__all__ = ["local_additive_attention", "offset_profile"]


@catalog.serves(186, kind="analysis", name="attnjax.analysis.additive_probe.local_additive_attention")
def local_additive_attention(x: jnp.ndarray, params: dict,
                             radius: int) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Returns (out [B, T, D], weights [B, T, T]); keys outside |t - s| <= radius get weight exactly 0."""
  if x.ndim != 3:
    raise ValueError(f"local_additive_attention: x must be [B, T, D], got {x.shape}")
  if radius < 0:
    raise ValueError(f"local_additive_attention: radius must be >= 0, got {radius}")
  t = x.shape[1]
  q = x @ params["W"]                                      # [B, T, A]
  k = x @ params["U"]                                      # [B, S, A]
  e = jnp.tanh(q[:, :, None, :] + k[:, None, :, :]) @ params["v"]   # [B, T, S]
  idx = jnp.arange(t)
  mask = jnp.abs(idx[:, None] - idx[None, :]) <= radius
  e = jnp.where(mask, e, -jnp.inf)                         # the diagonal is always visible
  w = jnp.exp(e - e.max(-1, keepdims=True))
  w = jnp.where(mask, w, 0.0)
  w = w / w.sum(-1, keepdims=True)
  return w @ x, w


def offset_profile(weights: np.ndarray, radius: int) -> np.ndarray:
  """`[2 radius + 1]`: the mean weight a frame puts on the frame o = s - t away, o = -radius..radius,
  over batch and frames (`attnjax.analysis.statistics.offset_profile` of the one head); rows sum to 1
  inside the window, so the profile does too."""
  w = np.asarray(weights, np.float64)
  if w.ndim != 3 or w.shape[1] != w.shape[2]:
    raise ValueError(f"offset_profile: weights must be [B, T, T], got {w.shape}")
  return statistics.offset_profile(w[:, None], radius)[0]
