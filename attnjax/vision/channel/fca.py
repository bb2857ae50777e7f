"""FcaNet: multi-spectral channel attention, SE with its global average pooling replaced by 2-D DCT
components, one frequency per group of channels.

    B_{u,v}[h, w] = c_u(h, H) c_v(w, W),   c_u(t, L) = cos(π u (t + ½) / L) / √L · (√2 if u > 0),
    z_c = Σ_{h,w} x[h, w, c] B_{u(c), v(c)}[h, w],   s = σ(W₂ ReLU(W₁ z)),   y = x ⊙ s,

channel c in group ⌊c / (C / n)⌋ of n frequencies (u(c), v(c)). The frequencies are the paper's
selection on a 7x7 grid ("top16": the 16 components that classify best alone, the paper's default),
scaled by ⌊H / 7⌋, ⌊W / 7⌋ to the map's size as the reference code does (a map smaller than 7 on a
side is pooled adaptively to 7 first, as the reference pools a map to its DCT size; the basis folds
that pooling in). B_{0,0} = 1 / √(HW), so the (0, 0) component is √(HW) · GAP: SE is FcaNet with
only the lowest frequency. The FC layers have no
bias (the reference code), so FcaNet has SE's parameters. Shapes: `x [B, H, W, C] -> [B, H, W, C]`,
`w1 [C, C/r]`, `w2 [C/r, C]`.
Paper: Qin, Zhang, Wu and Li, "FcaNet: Frequency Channel Attention Networks", arXiv:2012.11879.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from attnjax import modules
from attnjax.core import conv2d
from attnjax.typing import Array, Float
from attnjax.vision.channel import se

__all__ = ["FrequencyChannelAttention", "dct_basis", "fca_channel_attention", "fca_frequencies"]

FeatureMap = Float[Array, "B H W C"]
Reduce = Float[Array, "C R"]
Expand = Float[Array, "R C"]

# The paper's ranking of the 7x7 DCT components by the accuracy of each alone (reference code's order).
_TOP_U = (0, 0, 6, 0, 0, 1, 1, 4, 5, 1, 3, 0, 0, 0, 3, 2, 4, 6, 3, 5, 5, 2, 6, 5, 5, 3, 3, 4, 2, 2, 6, 1)
_TOP_V = (0, 1, 0, 5, 2, 0, 2, 0, 0, 6, 0, 4, 6, 3, 5, 2, 6, 3, 3, 3, 5, 1, 1, 2, 4, 2, 1, 1, 3, 0, 5, 3)


def fca_frequencies(selection: str = "top16") -> tuple[tuple[int, int], ...]:
  """The (u, v) components on the paper's 7x7 grid: "topN", N in 1, 2, 4, 8, 16, 32."""
  n = selection[3:]
  if not (selection.startswith("top") and n.isdigit() and int(n) in (1, 2, 4, 8, 16, 32)):
    raise ValueError(f"fca_channel_attention: `frequencies` must be 'topN' with N in 1, 2, 4, 8, 16, "
                     f"32, got {selection!r}")
  return tuple(zip(_TOP_U[:int(n)], _TOP_V[:int(n)], strict=True))


def _dct_1d(u: int, length: int) -> np.ndarray:
  t = np.arange(length)
  c = np.cos(math.pi * u * (t + 0.5) / length) / math.sqrt(length)
  return c * math.sqrt(2.0) if u > 0 else c


def _adaptive_pool(length: int, out: int) -> np.ndarray:
  """`[out, length]`: adaptive average pooling of `length` positions to `out` (PyTorch's windows
  [⌊i·length/out⌋, ⌈(i+1)·length/out⌉), which repeat positions when out > length)."""
  pool = np.zeros((out, length))
  for i in range(out):
    a, b = (i * length) // out, -(-(i + 1) * length // out)
    pool[i, a:b] = 1.0 / (b - a)
  return pool


def dct_basis(H: int, W: int, freqs, channels: int) -> np.ndarray:
  """`[H, W, C]` float64: channel c's DCT basis B_{u,v} (module docstring), frequencies on the 7x7 grid
  scaled by ⌊H / 7⌋, ⌊W / 7⌋ (at least 1). A side under 7 is first pooled adaptively to 7, as the
  reference code pools a map to its DCT size: the basis on the map is then Pᵀ B_{7x7} P."""
  n = len(freqs)
  if channels % n:
    raise ValueError(f"fca_channel_attention: the channels C = {channels} of `x` must be a multiple of "
                     f"the number of frequencies {n}")
  Hd, Wd = max(H, 7), max(W, 7)
  sh, sw = Hd // 7, Wd // 7
  ph, pw = _adaptive_pool(H, Hd), _adaptive_pool(W, Wd)
  basis = np.zeros((H, W, channels))
  part = channels // n
  for i, (u, v) in enumerate(freqs):
    grid = np.outer(_dct_1d(u * sh, Hd), _dct_1d(v * sw, Wd))
    basis[:, :, i * part:(i + 1) * part] = (ph.T @ grid @ pw)[:, :, None]
  return basis


def fca_channel_attention(x: FeatureMap, *, w1: Reduce, w2: Expand,
                          frequencies: str = "top16", return_gate: bool = False):
  """FcaNet: `x ⊙ σ(W₂ ReLU(W₁ z))`, z each channel's 2-D DCT component (module docstring).

  Args:
    x: `[B, H, W, C]`, C a multiple of the number of frequencies.
    w1: `[C, C/r]`, w2: `[C/r, C]` (no biases, as SE in the paper).
    frequencies: the paper's selection, "top1" ... "top32" (default "top16").
    return_gate: also return the gate `[B, C]` (float32, in (0, 1)).

  Returns:
    `[B, H, W, C]` in x's dtype (and the gate).
  """
  op = "fca_channel_attention"
  _, H, W, C = conv2d.check_feature_map(op, x)
  if jnp.shape(w1)[:1] != (C,) or jnp.ndim(w1) != 2 or jnp.shape(w2) != (jnp.shape(w1)[1], C):
    raise ValueError(f"{op}: `w1` must have shape [C, R] = [{C}, R] and `w2` [R, {C}], got "
                     f"{jnp.shape(w1)} and {jnp.shape(w2)}")
  # The bases are fixed by H, W and the selection (numpy at trace time: constants, not weights).
  basis = jnp.asarray(dct_basis(H, W, fca_frequencies(frequencies), C), jnp.float32)
  z = jnp.einsum("bhwc,hwc->bc", x.astype(jnp.float32), basis)
  R = jnp.shape(w1)[1]
  gate = se.excitation(z, w1, jnp.zeros((R,)), w2, jnp.zeros((C,)))
  y = (x.astype(jnp.float32) * gate[:, None, None, :]).astype(x.dtype)
  return (y, gate) if return_gate else y


class FrequencyChannelAttention(nn.Module):
  """Creates FcaNet's two bias-free FC layers (reduction `reduction`, the paper's 16; hidden width at
  least 1) and calls `fca_channel_attention`; sows the gate as ("intermediates", "gate")."""
  reduction: int = 16
  frequencies: str = "top16"
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    hidden = max(1, C // self.reduction)
    # PyTorch's nn.Linear default (uniform in ±1/sqrt(fan_in)), as the reference code gets.
    init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
    y, gate = fca_channel_attention(
        x, w1=self.param("w1", init, (C, hidden), self.param_dtype),
        w2=self.param("w2", init, (hidden, C), self.param_dtype), frequencies=self.frequencies,
        return_gate=True)
    self.sow("intermediates", modules.GATE, gate)
    return y


modules.register_module(modules.Module(
    name="fca_channel_attention", fn=fca_channel_attention, linen=FrequencyChannelAttention,
    kind="feature_map", family="channel-spatial", seeds=(32,),
    paper="FcaNet: Frequency Channel Attention Networks", arxiv="2012.11879",
    gate_range=(0.0, 1.0), example={"reduction": 4}))
