"""Convolutions and checks on feature maps `[B, H, W, C]` (NHWC) with explicit weight arrays, for the
vision attention modules (`attnjax.vision`): each module is a pure function of its input and its
weights, so the convolutions take their kernels as arguments instead of owning them.

Kernels are HWIO: `[kh, kw, C_in / groups, C_out]`; padding "SAME" keeps H and W (any dilation).
"""

from __future__ import annotations

from typing import Sequence, Union

import jax
import jax.numpy as jnp

__all__ = ["check_feature_map", "conv2d", "depthwise_conv2d", "channel_conv1d", "global_avg_pool"]

_DIMS = ("NHWC", "HWIO", "NHWC")


def check_feature_map(op: str, x, *, name: str = "x") -> tuple[int, int, int, int]:
  """`(B, H, W, C)` of a floating feature map; a ValueError naming `op` and the argument otherwise."""
  if jnp.ndim(x) != 4 or 0 in jnp.shape(x):
    raise ValueError(f"{op}: `{name}` must be a feature map [B, H, W, C] (no empty axis), got shape "
                     f"{jnp.shape(x)}")
  if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
    raise ValueError(f"{op}: `{name}` must be floating point, got {jnp.result_type(x)}")
  return tuple(int(d) for d in jnp.shape(x))


def conv2d(x, kernel, bias=None, *, stride: Union[int, Sequence[int]] = 1,
           dilation: Union[int, Sequence[int]] = 1, groups: int = 1,
           padding: Union[str, Sequence[tuple[int, int]]] = "SAME"):
  """`x [B, H, W, C_in] ⊛ kernel [kh, kw, C_in / groups, C_out] (+ bias [C_out])`, NHWC, in x's dtype
  promoted with the kernel's."""
  pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)
  y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), window_strides=pair(stride),
                                   padding=padding, rhs_dilation=pair(dilation),
                                   dimension_numbers=_DIMS, feature_group_count=groups)
  return y if bias is None else y + bias.astype(y.dtype)


def depthwise_conv2d(x, kernel, bias=None, *, dilation: Union[int, Sequence[int]] = 1,
                     padding: Union[str, Sequence[tuple[int, int]]] = "SAME"):
  """Per-channel 2-D convolution: `kernel [kh, kw, 1, C]` (one filter per channel of x)."""
  return conv2d(x, kernel, bias, dilation=dilation, groups=x.shape[-1], padding=padding)


def channel_conv1d(v, kernel):
  """1-D convolution along the last axis of `v [..., C]` with one odd-length `kernel [k]`, zero
  padded to keep C (ECA's cross-channel convolution): `y_c = Σ_j kernel_j v_{c + j - (k-1)/2}`."""
  k = kernel.shape[0]
  pad = [(0, 0)] * (v.ndim - 1) + [((k - 1) // 2, k // 2)]
  vp = jnp.pad(v, pad)
  C = v.shape[-1]
  return sum(kernel[j].astype(v.dtype) * vp[..., j:j + C] for j in range(k))


def global_avg_pool(x):
  """`[B, H, W, C] -> [B, C]`, the mean over positions (in float32, cast back to x's dtype)."""
  return jnp.mean(x.astype(jnp.float32), axis=(1, 2)).astype(x.dtype)
