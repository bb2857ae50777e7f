"""Float64 numpy rewrites shared by the convolutional attention tests: zero-padded 2-D cross-
correlations written as explicit loops over the kernel taps (what PyTorch's Conv2d computes)."""

import numpy as np


def conv2d(x, kernel, bias=None, *, dilation=1, pad=None):
  """`x [B, H, W, Ci]`, `kernel [kh, kw, Ci, Co]`: `y[b, i, j] = Σ_{a, c} xp[b, i + a·d, j + c·d] ·
  kernel[a, c]` with `xp` zero padded by `pad` ((top, bottom), (left, right); "same" by default)."""
  kh, kw = kernel.shape[:2]
  if pad is None:
    pad = ((dilation * (kh - 1) // 2,) * 2, (dilation * (kw - 1) // 2,) * 2)
  xp = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
  H = xp.shape[1] - dilation * (kh - 1)
  W = xp.shape[2] - dilation * (kw - 1)
  y = np.zeros(x.shape[:1] + (H, W, kernel.shape[3]))
  for a in range(kh):
    for c in range(kw):
      patch = xp[:, a * dilation:a * dilation + H, c * dilation:c * dilation + W, :]
      y += patch @ kernel[a, c]
  return y if bias is None else y + bias


def depthwise(x, kernel, bias=None, *, dilation=1, pad=None):
  """Per-channel `conv2d`: `kernel [kh, kw, C]`."""
  kh, kw, C = kernel.shape
  if pad is None:
    pad = ((dilation * (kh - 1) // 2,) * 2, (dilation * (kw - 1) // 2,) * 2)
  xp = np.pad(x, ((0, 0), pad[0], pad[1], (0, 0)))
  H = xp.shape[1] - dilation * (kh - 1)
  W = xp.shape[2] - dilation * (kw - 1)
  y = np.zeros(x.shape[:1] + (H, W, C))
  for a in range(kh):
    for c in range(kw):
      y += xp[:, a * dilation:a * dilation + H, c * dilation:c * dilation + W, :] * kernel[a, c]
  return y if bias is None else y + bias
