"""Attention in attention block (A²N's AAB): a dynamic attention-dropout gate, a small MLP on the
pooled features with a temperature softmax over two branches, mixes per input an attention branch
(pixel attention: a sigmoid map over every position and channel) and a non-attention branch (a plain
3×3 convolution), so the network can switch attention off where it does not help:

    u = LReLU(W_first x)                                         (1×1, no bias)
    π = softmax((W_b ReLU(W_a GAP(u))) / t) ∈ (0, 1)², π₀ + π₁ = 1    (t = 30, no biases)
    P = σ(W_2 LReLU(K_1 ⊛ u) + b_2) ∈ (0, 1)^{H×W×C}             (K_1 3×3, W_2 1×1)
    A = K_4 ⊛ ((K_3 ⊛ u) ⊙ P),   N = K_n ⊛ u                     (3×3 convolutions, no bias)
    y = W_last LReLU(π₀ A + π₁ N) + x                             (1×1, no bias)

LReLU has slope 0.2. Shapes: `x [B, H, W, C] -> [B, H, W, C]`; `w_first, w_last, w_2 [C, C]`, `b_2
[C]`, `w_a [C, C/r]`, `w_b [C/r, 2]`, `k_1, k_3, k_4, k_n [3, 3, C, C]`.
Paper: Chen, Gu, Zhang, Dong, Qiao and Tao, "Attention in Attention Network for Image
Super-Resolution", arXiv:2104.09497.
"""

from __future__ import annotations


import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import conv2d
from attnjax.core.initializers import torch_uniform
from attnjax.typing import Array, Float

__all__ = ["AttentionInAttentionBlock", "attention_in_attention_block"]

FeatureMap = Float[Array, "B H W C"]
_SLOPE = 0.2        # the reference code's LeakyReLU slope


def _lrelu(v):
  return jnp.where(v >= 0, v, _SLOPE * v)


def attention_in_attention_block(x: FeatureMap, *, w_first, w_a, w_b, k_1, w_2, b_2, k_3, k_4, k_n,
                                 w_last, temperature: float = 30.0, return_gate: bool = False):
  """A²N's attention in attention block: `W_last LReLU(π₀ A(u) + π₁ N(u)) + x` (module docstring).

  Args:
    x: `[B, H, W, C]`.
    w_first, w_last, w_2: `[C, C]`; b_2: `[C]`; w_a: `[C, C/r]`; w_b: `[C/r, 2]`;
    k_1, k_3, k_4, k_n: `[kh, kw, C, C]` (3×3 in the paper).
    temperature: t of the branch softmax.
    return_gate: also return `(π [B, 2], P [B, H, W, C])` (float32, in (0, 1); π sums to 1).

  Returns:
    `[B, H, W, C]` in x's dtype (and the two gates).
  """
  op = "attention_in_attention_block"
  B, H, W, C = conv2d.check_feature_map(op, x)
  for name, m in (("w_first", w_first), ("w_2", w_2), ("w_last", w_last)):
    if jnp.shape(m) != (C, C):
      raise ValueError(f"{op}: `{name}` must have shape [{C}, {C}], got {jnp.shape(m)}")
  if jnp.ndim(w_a) != 2 or w_a.shape[0] != C or jnp.shape(w_b) != (w_a.shape[1], 2):
    raise ValueError(f"{op}: `w_a` must have shape [{C}, h] and `w_b` [h, 2], got {jnp.shape(w_a)} "
                     f"and {jnp.shape(w_b)}")
  for name, k in (("k_1", k_1), ("k_3", k_3), ("k_4", k_4), ("k_n", k_n)):
    if jnp.ndim(k) != 4 or k.shape[2:] != (C, C) or k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
      raise ValueError(f"{op}: `{name}` must have shape [k, k, {C}, {C}] with k odd, got "
                       f"{jnp.shape(k)}")
  if temperature <= 0:
    raise ValueError(f"{op}: `temperature` must be > 0, got {temperature}")
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  conv = lambda v, k: conv2d.conv2d(v, f32(k))
  u = _lrelu(x.astype(jnp.float32) @ f32(w_first))
  pi = jax.nn.softmax(jax.nn.relu(conv2d.global_avg_pool(u) @ f32(w_a)) @ f32(w_b) / temperature,
                      axis=-1)                                                  # [B, 2]
  pixel = jax.nn.sigmoid(_lrelu(conv(u, k_1)) @ f32(w_2) + f32(b_2))           # [B, H, W, C]
  attention = conv(conv(u, k_3) * pixel, k_4)
  plain = conv(u, k_n)
  mixed = pi[:, 0, None, None, None] * attention + pi[:, 1, None, None, None] * plain
  y = (_lrelu(mixed) @ f32(w_last) + x.astype(jnp.float32)).astype(x.dtype)
  return (y, (pi, pixel)) if return_gate else y


class AttentionInAttentionBlock(nn.Module):
  """Creates the AAB's weights (gate MLP reduction `reduction`, hidden width at least `min_hidden`,
  3×3 kernels) and calls `attention_in_attention_block` with `temperature`; sows the branch weights
  and the pixel attention as ("intermediates", "gate")."""
  reduction: int = 4
  min_hidden: int = 2
  temperature: float = 30.0
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    h = max(self.min_hidden, C // self.reduction)

    # PyTorch's Conv2d / Linear default: uniform in ±1/sqrt(fan_in), weights and biases.
    def p(name, fan_in, shape):
      return self.param(name, torch_uniform(fan_in), shape, self.param_dtype)

    y, (pi, pixel) = attention_in_attention_block(
        x, w_first=p("w_first", C, (C, C)), w_a=p("w_a", C, (C, h)), w_b=p("w_b", h, (h, 2)),
        k_1=p("k_1", 9 * C, (3, 3, C, C)), w_2=p("w_2", C, (C, C)), b_2=p("b_2", C, (C,)),
        k_3=p("k_3", 9 * C, (3, 3, C, C)), k_4=p("k_4", 9 * C, (3, 3, C, C)),
        k_n=p("k_n", 9 * C, (3, 3, C, C)), w_last=p("w_last", C, (C, C)),
        temperature=self.temperature, return_gate=True)
    self.sow("intermediates", modules.GATE, pi)
    self.sow("intermediates", modules.GATE, pixel)
    return y


modules.register_module(modules.Module(
    name="attention_in_attention_block", fn=attention_in_attention_block,
    linen=AttentionInAttentionBlock, kind="feature_map", family="channel-spatial", seeds=(55,),
    paper="Attention in Attention Network for Image Super-Resolution", arxiv="2104.09497",
    # At the paper's t = 30 a freshly initialized gate MLP moves π by ~1e-5 (the softmax of logits
    # / 30 stays near (1/2, 1/2)), below what the suite can see; t = 1 lets each weight show.
    gate_range=(0.0, 1.0), example={"temperature": 1.0}))
