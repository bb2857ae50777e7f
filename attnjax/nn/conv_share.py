"""ConvShareViT's shared depthwise convolutions in place of the Q/K/V projections (Flax Linen).

Each token's D features are a stack of C feature maps of h × w (D = C·h·w; by default one square
map, h = w = √D). A linear projection `x W` is replaced by convolving every map of every token with
the same bank of M kernels `K_m` [k_h, k_w] (depthwise: no sum over the maps; shared: the same
kernels for every input map and every token, so, like a linear layer, it acts on each token alone):

    y[t, c, m] = K_m ⋆ x[t, c] + b_m                    ⋆: 2-D cross-correlation, "valid" padding
    x [B, T, C·h·w]  →  y [B, T, C·M·h'·w']              h' = h - k_h + 1, w' = w - k_w + 1

so the width changes by the valid padding and the number of kernels (D_out = C·M·h'·w'), and the
layer has M·k_h·k_w (+ M biases) weights, against D_in·D_out for the linear layer it replaces. A
kernel as large as the map (k_h = h, k_w = w, one map) leaves one output per kernel: the layer is then
exactly a linear layer D → M whose weight rows are the kernels, the limit in which the shared
convolution keeps a Transformer's token-wise projections. "same" padding keeps h' = h, w' = w (the
configuration the paper finds behaves like a CNN rather than learning attention). In a 4f optical
system all maps of all tokens are tiled into one input plane and the whole layer is one optical
convolution per kernel: valid padding keeps the tiles from bleeding into each other.

`ConvShareAttention` projects queries, keys and values this way with one kernel per head (M = N;
head n of a token is its C maps convolved with K_n, `H = C·h'·w'`), runs any registered mechanism
(default softmax) and maps the heads back with an output projection.

Interpretation (only the abstract, not the body, of the paper was available when this was written):
tokens as the channels of a depthwise convolution over each token's own feature map follows the
first author's earlier fully convolutional attention code (github.com/riadibadulla/FCSA:
`nn.Conv2d(n_patches, n_patches, groups=n_patches)` over tokens of embed_dim × embed_dim), with the
kernels now shared across the channels as the title says; the output projection stays a dense
layer, and the MLP is not replaced here. Cross-correlation (deep-learning "convolution") and true
convolution differ by a flip of a learned kernel.

Paper: Ibadulla, Chen and Reyes-Aldasoro, "ConvShareViT: Enhancing Vision Transformers with
Convolutional Attention Mechanisms for Free-Space Optical Accelerators", arXiv:2504.11517.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import catalog
from attnjax import registry
from attnjax.nn import layer_parts

__all__ = ["ConvSharedProjection", "ConvShareAttention", "PADDINGS", "token_map_shape"]

Initializer = Callable[..., Any]
PADDINGS = ("VALID", "SAME")


def token_map_shape(width: int, token_shape: Optional[Sequence[int]], owner: str) -> tuple:
  """(C, h, w) with C·h·w = `width`: `token_shape` checked, or one square map."""
  if token_shape is None:
    side = math.isqrt(width)
    if side * side != width:
      raise ValueError(f"{owner}: a token of {width} features is not a square map; give "
                       "`token_shape` = (C, h, w) with C·h·w = the width")
    return (1, side, side)
  shape = tuple(int(a) for a in token_shape)
  if len(shape) != 3 or math.prod(shape) != width or min(shape) <= 0:
    raise ValueError(f"{owner}: `token_shape` must be (C, h, w) with C·h·w = {width}, got "
                     f"{token_shape}")
  return shape


def _pair(k) -> tuple[int, int]:
  return (int(k), int(k)) if isinstance(k, int) else tuple(int(a) for a in k)


@catalog.serves(16, kind="layer")
class ConvSharedProjection(nn.Module):
  """The shared depthwise convolution that replaces a linear projection (module docstring).

  Attributes:
    features: M, kernels (output maps per input map).
    kernel_size: (k_h, k_w), or one int for a square kernel.
    token_shape: (C, h, w) of a token's features (None: one square map).
    padding: "VALID" (the paper's working configuration) or "SAME".
    use_bias: one bias per kernel.
    dtype, param_dtype, precision: compute dtype, parameter dtype, convolution precision.
    kernel_init, bias_init: initializers (the kernel's fan-in is k_h·k_w).
  """
  features: int
  kernel_size: Union[int, Sequence[int]]
  token_shape: Optional[Sequence[int]] = None
  padding: str = "VALID"
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros_init()

  def output_maps(self, width: int) -> tuple[int, int, int, int]:
    """(C, M, h', w') of the output for inputs of `width` features."""
    C, h, w = token_map_shape(width, self.token_shape, "ConvSharedProjection")
    kh, kw = _pair(self.kernel_size)
    if self.padding == "SAME":
      return C, self.features, h, w
    return C, self.features, h - kh + 1, w - kw + 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """`x [..., T, C·h·w]` → `[..., T, C·M·h'·w']`, ordered (map c, kernel m, row, column)."""
    owner = "ConvSharedProjection"
    if self.padding not in PADDINGS:
      raise ValueError(f"{owner}: `padding` must be one of {PADDINGS}, got {self.padding!r}")
    C, h, w = token_map_shape(x.shape[-1], self.token_shape, owner)
    kh, kw = _pair(self.kernel_size)
    if self.features <= 0 or min(kh, kw) <= 0 or (self.padding == "VALID" and (kh > h or kw > w)):
      raise ValueError(f"{owner}: need features >= 1 and a kernel no larger than the token map "
                       f"({h} x {w}) for valid padding; got features={self.features}, "
                       f"kernel_size={(kh, kw)}")
    kernel = self.param("kernel", self.kernel_init, (kh, kw, 1, self.features), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, self.param_dtype)
    maps = x.astype(dtype).reshape((-1, h, w, 1))                  # every map of every token
    y = jax.lax.conv_general_dilated(maps, kernel.astype(dtype), (1, 1), self.padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=self.precision)     # [tokens·C, h', w', M]
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,), self.param_dtype).astype(dtype)
    y = jnp.moveaxis(y, -1, 1)                                      # [tokens·C, M, h', w']
    return y.reshape(x.shape[:-1] + (C * y.shape[1] * y.shape[2] * y.shape[3],))


@catalog.serves(16, kind="layer")
class ConvShareAttention(nn.Module):
  """Multi-head attention whose q, k, v projections are shared depthwise convolutions.

  Attributes:
    num_heads: N, one kernel per head for each of q, k, v.
    kernel_size: (k_h, k_w) of the q/k/v kernels.
    token_shape: (C, h, w) of a token's features (None: one square map).
    padding: "VALID" or "SAME" (see `ConvSharedProjection`).
    mechanism: registry name (or record) of the attention weights, without learned arrays.
    mechanism_kwargs: the mechanism's keyword arguments.
    out_features: F (None: the input width).
    causal: causal attention.
    use_bias: biases of the convolutions and of the output projection.
    dtype, param_dtype, precision: as in `MultiHeadAttention`.
    scale: the mechanism's logit scale (None: its default, H^-1/2 with H = C·h'·w').
    implementation: the mechanism's `implementation=`.
  """
  num_heads: int
  kernel_size: Union[int, Sequence[int]]
  token_shape: Optional[Sequence[int]] = None
  padding: str = "VALID"
  mechanism: Union[str, registry.Mechanism] = "softmax"
  mechanism_kwargs: Optional[Mapping[str, Any]] = None
  out_features: Optional[int] = None
  causal: bool = False
  use_bias: bool = True
  dtype: Optional[Any] = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  scale: Optional[float] = None
  implementation: Optional[str] = None

  @nn.compact
  def __call__(self, inputs_q: jax.Array, inputs_kv: Optional[jax.Array] = None, *,
               segment_ids=None, kv_lengths=None) -> jax.Array:
    """`inputs_q [B, T, D]`, `inputs_kv [B, S, D]` (None: self-attention) → `[B, T, F]`."""
    cross = inputs_kv is not None
    mech = layer_parts.plain_mechanism("ConvShareAttention", self.mechanism, causal=self.causal,
                                       cross=cross)
    kv = inputs_kv if cross else inputs_q
    if jnp.ndim(inputs_q) != 3 or jnp.ndim(kv) != 3 or kv.shape[::2] != inputs_q.shape[::2]:
      raise ValueError(f"ConvShareAttention: inputs must have shapes [B, T, D] and [B, S, D], got "
                       f"{jnp.shape(inputs_q)} and {jnp.shape(kv)}")

    def project(name, x):
      conv = ConvSharedProjection(self.num_heads, self.kernel_size, token_shape=self.token_shape,
                                  padding=self.padding, use_bias=self.use_bias, dtype=self.dtype,
                                  param_dtype=self.param_dtype, precision=self.precision,
                                  name=name)
      C, M, h, w = conv.output_maps(x.shape[-1])
      y = conv(x).reshape(x.shape[:2] + (C, M, h * w))
      return jnp.moveaxis(y, 3, 2).reshape(x.shape[:2] + (M, C * h * w))   # head m: its C maps

    kwargs = layer_parts.mechanism_kwargs(self, segment_ids=segment_ids, kv_lengths=kv_lengths)
    out = mech(project("query", inputs_q), project("key", kv), project("value", kv),
               causal=self.causal, cross=cross, **kwargs)
    return nn.DenseGeneral(features=self.out_features or inputs_q.shape[-1], axis=(-2, -1),
                           use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype,
                           precision=self.precision, name="out")(out)
