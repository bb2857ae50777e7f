"""DaViT's channel group attention: the channels are the tokens and the pixels the feature dimension,
so each group's scores are `C_g x C_g` summed over all P = H·W positions and the cost is linear in P.

With `X ∈ R^{P x C}` (the pixels of one image), `Q, K, V = X W_qkv + b_qkv` split into `N_g` groups of
`C_g = C / N_g` channels (`Q_i, K_i, V_i ∈ R^{P x C_g}`):

    A_i = softmax( Q_iᵀ K_i / sqrt(C_g) ) ∈ (0, 1)^{C_g x C_g}   (softmax along the last axis)
    Z_i = (A_i V_iᵀ)ᵀ ∈ R^{P x C_g},   Y = concat_i(Z_i) W_proj + b_proj

(the paper's Eq. for A(Q_i, K_i, V_i); the scale is the group's channel count, as in the paper).
The official code forms the scores from its "k" and "v" slices and aggregates its "q": the same map
with the three learned projections relabeled (loading its weights means reordering the qkv columns).
Every matrix product is P·C_g² or P·C² multiply-adds: linear in the number of pixels. Shapes: `x [B,
H, W, C] -> [B, H, W, C]`, `w_qkv [C, 3C]`, `b_qkv [3C]`, `w_proj [C, C]`, `b_proj [C]`; the gate is
`A [B, N_g, C_g, C_g]`. The spatial window attention DaViT alternates with is ordinary window
self-attention and not part of this module.
Paper: Ding, Xiao, Codella, Luo, Wang and Yuan, "DaViT: Dual Attention Vision Transformers",
arXiv:2204.03645.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import conv2d
from attnjax.typing import Array, Float

__all__ = ["ChannelGroupAttention", "davit_channel_group_attention"]

FeatureMap = Float[Array, "B H W C"]
Matrix = Float[Array, "C_in C_out"]
Vector = Float[Array, "C_out"]


def davit_channel_group_attention(x: FeatureMap, *, w_qkv: Matrix, b_qkv: Vector, w_proj: Matrix,
                                  b_proj: Vector, num_groups: int = 4,
                                  return_gate: bool = False):
  """Channel group attention: `softmax(Q_iᵀ K_i / sqrt(C_g)) V_iᵀ` per channel group (module
  docstring).

  Args:
    x: `[B, H, W, C]`, C divisible by `num_groups`.
    w_qkv: `[C, 3C]`, b_qkv: `[3C]` (query, key, value projections, in that order).
    w_proj: `[C, C]`, b_proj: `[C]` (output projection).
    num_groups: N_g, the number of channel groups (heads).
    return_gate: also return the attention `[B, N_g, C_g, C_g]` (float32, rows sum to 1).

  Returns:
    `[B, H, W, C]` in x's dtype (and the gate).
  """
  op = "davit_channel_group_attention"
  B, H, W, C = conv2d.check_feature_map(op, x)
  if num_groups < 1 or C % num_groups:
    raise ValueError(f"{op}: `num_groups` must divide the channel count C={C}, got {num_groups}")
  for name, arr, shape in (("w_qkv", w_qkv, (C, 3 * C)), ("b_qkv", b_qkv, (3 * C,)),
                           ("w_proj", w_proj, (C, C)), ("b_proj", b_proj, (C,))):
    if tuple(jnp.shape(arr)) != shape:
      raise ValueError(f"{op}: `{name}` must have shape {list(shape)}, got {list(jnp.shape(arr))}")
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  cg = C // num_groups
  tokens = f32(x).reshape(B, H * W, C)
  qkv = (tokens @ f32(w_qkv) + f32(b_qkv)).reshape(B, H * W, 3, num_groups, cg)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]             # [B, P, G, C_g]
  # Channels are the tokens: contract over the P pixels, leaving C_g x C_g scores per group.
  scores = jnp.einsum("bpgi,bpgj->bgij", q, k) / jnp.sqrt(jnp.float32(cg))
  gate = jax.nn.softmax(scores, axis=-1)
  z = jnp.einsum("bgij,bpgj->bpgi", gate, v).reshape(B, H * W, C)
  y = (z @ f32(w_proj) + f32(b_proj)).reshape(B, H, W, C).astype(x.dtype)
  return (y, gate) if return_gate else y


class ChannelGroupAttention(nn.Module):
  """Creates DaViT's projections (truncated normal std 0.02 weights and zero biases, as the official
  code initializes its linear layers) and calls `davit_channel_group_attention`; sows the attention
  as ("intermediates", "gate")."""
  num_groups: int = 4
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    C = x.shape[-1]
    init = nn.initializers.truncated_normal(0.02)
    y, gate = davit_channel_group_attention(
        x, w_qkv=self.param("w_qkv", init, (C, 3 * C), self.param_dtype),
        b_qkv=self.param("b_qkv", nn.initializers.zeros, (3 * C,), self.param_dtype),
        w_proj=self.param("w_proj", init, (C, C), self.param_dtype),
        b_proj=self.param("b_proj", nn.initializers.zeros, (C,), self.param_dtype),
        num_groups=self.num_groups, return_gate=True)
    self.sow("intermediates", modules.GATE, gate)
    return y


modules.register_module(modules.Module(
    name="davit_channel_group_attention", fn=davit_channel_group_attention,
    linen=ChannelGroupAttention, kind="feature_map", family="channel-spatial", seeds=(208,),
    paper="DaViT: Dual Attention Vision Transformers", arxiv="2204.03645", gate_range=(0.0, 1.0)))
