"""Multi-scale self-guided attention: the guided attention block's position attention (pixels as
tokens, P x P) and channel attention (channels as tokens, C x C) on the concatenation of a scale's
features and the fused multi-scale features, and the guiding loss between refinement stages.

With `F = concat(x, fused) ∈ R^{P x 2C}` (P = H·W pixels), `φ(·) = PReLU(conv3x3(·))`:

  position attention (DANet's PAM), on `A = φ_pin(F) ∈ R^{P x C}`:
    Q = A W_q + b_q,  K = A W_k,  V = A W_v + b_v  (1x1 convolutions; W_q, W_k `[C, C/8]`)
    S = softmax_j(Q_i · K_j) ∈ (0, 1)^{P x P},   A' = γ_p (S V) + A
  channel attention (DANet's CAM), on `B = φ_cin(F) ∈ R^{P x C}`:
    E = Bᵀ B ∈ R^{C x C},  Z = softmax_j(max_j E_ij - E_ij),   B' = γ_c (B Zᵀ) + B
  y = φ_pout(A') + φ_cout(B')

The key's bias is left out: it adds `Q_i · b_k` to a whole row of scores and cancels in the softmax.
γ_p and γ_c start at zero, as in the reference code (the block starts as its residual paths).
BatchNorm after each 3x3 convolution is left out (its running
statistics are training state; in inference it is a per-channel affine map the convolution bias
absorbs), and so are the refinement steps' encoder-decoders, which are model-level: their encodings
and reconstructions enter `guided_attention_loss`,

    L_G = Σ_s mean((E_s¹ - E_s²)²) + Σ_s mean((F_s - F̂_s)²)

(semantic guidance between the two steps' encodings plus the encoder-decoders' reconstruction loss).
Shapes: `x, fused [B, H, W, C] -> [B, H, W, C]`; gates `(S [B, P, P], Z [B, C, C])`.
Paper: Sinha and Dolz, "Multi-scale self-guided attention for medical image segmentation",
arXiv:1906.02849.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import conv2d
from attnjax.core.initializers import torch_uniform
from attnjax.typing import Array, Float

__all__ = ["GuidedPositionChannelAttention", "channel_attention_module", "guided_attention_loss",
           "guided_position_channel_attention", "position_attention_module"]

FeatureMap = Float[Array, "B H W C"]
Kernel = Float[Array, "kh kw C_in C_out"]
Matrix = Float[Array, "C_in C_out"]
Vector = Float[Array, "C_out"]
Scalar = Float[Array, ""]
Loss = Float[Array, ""]


def position_attention_module(a, wq, bq, wk, wv, bv, gamma):
  """PAM on `a [B, P, C]` (float32): `γ softmax_j(Q_i · K_j) V + a`; returns `(out, S [B, P, P])`."""
  q, k, v = a @ wq + bq, a @ wk, a @ wv + bv
  attn = jax.nn.softmax(jnp.einsum("bic,bjc->bij", q, k), axis=-1)
  return gamma * jnp.einsum("bij,bjc->bic", attn, v) + a, attn


def channel_attention_module(b, gamma):
  """CAM on `b [B, P, C]` (float32): `γ b Zᵀ + b`, Z = softmax(rowmax(bᵀb) - bᵀb); returns
  `(out, Z [B, C, C])`."""
  energy = jnp.einsum("bpi,bpj->bij", b, b)
  # The reference code's "max - energy": softmax of the negated affinity, shifted by the row max.
  attn = jax.nn.softmax(energy.max(axis=-1, keepdims=True) - energy, axis=-1)
  return gamma * jnp.einsum("bij,bpj->bpi", attn, b) + b, attn


def _conv_prelu(x, kernel, bias, alpha):
  y = conv2d.conv2d(x, kernel, bias)
  return jnp.where(y >= 0, y, alpha * y)


def guided_position_channel_attention(
    x: FeatureMap, fused: FeatureMap, *, pin_kernel: Kernel, pin_bias: Vector, pin_alpha: Scalar,
    pam_wq: Matrix, pam_bq: Vector, pam_wk: Matrix, pam_wv: Matrix, pam_bv: Vector,
    pam_gamma: Scalar, pout_kernel: Kernel, pout_bias: Vector, pout_alpha: Scalar,
    cin_kernel: Kernel, cin_bias: Vector, cin_alpha: Scalar, cam_gamma: Scalar, cout_kernel: Kernel,
    cout_bias: Vector, cout_alpha: Scalar, return_gate: bool = False):
  """Guided position + channel attention on `concat(x, fused)` (module docstring).

  Args:
    x: `[B, H, W, C]`, one scale's features; fused: `[B, H, W, C]`, the fused multi-scale features.
    pin_kernel, cin_kernel: `[3, 3, 2C, C]`; pout_kernel, cout_kernel: `[3, 3, C, C]`; their biases
      `[C]`; the PReLU slopes `*_alpha` and the residual scales `pam_gamma`, `cam_gamma`: scalars.
    pam_wq, pam_wk: `[C, C']`; pam_bq: `[C']`; pam_wv: `[C, C]`; pam_bv: `[C]`.
    return_gate: also return `(S [B, P, P], Z [B, C, C])` (float32 softmax outputs).

  Returns:
    `[B, H, W, C]` in x's dtype (and the gates).
  """
  op = "guided_position_channel_attention"
  B, H, W, C = conv2d.check_feature_map(op, x)
  if conv2d.check_feature_map(op, fused, name="fused") != (B, H, W, C):
    raise ValueError(f"{op}: `fused` must have x's shape {[B, H, W, C]}, got {list(fused.shape)}")
  cq = int(jnp.shape(pam_wq)[-1])
  shapes = dict(pin_kernel=(3, 3, 2 * C, C), cin_kernel=(3, 3, 2 * C, C), pout_kernel=(3, 3, C, C),
                cout_kernel=(3, 3, C, C), pin_bias=(C,), cin_bias=(C,), pout_bias=(C,),
                cout_bias=(C,), pam_wq=(C, cq), pam_bq=(cq,), pam_wk=(C, cq), pam_wv=(C, C),
                pam_bv=(C,))
  given = dict(pin_kernel=pin_kernel, cin_kernel=cin_kernel, pout_kernel=pout_kernel,
               cout_kernel=cout_kernel, pin_bias=pin_bias, cin_bias=cin_bias, pout_bias=pout_bias,
               cout_bias=cout_bias, pam_wq=pam_wq, pam_bq=pam_bq, pam_wk=pam_wk, pam_wv=pam_wv,
               pam_bv=pam_bv)
  for name, shape in shapes.items():
    if tuple(jnp.shape(given[name])) != shape:
      raise ValueError(f"{op}: `{name}` must have shape {list(shape)}, got "
                       f"{list(jnp.shape(given[name]))}")
  for name, s in (("pin_alpha", pin_alpha), ("pout_alpha", pout_alpha), ("cin_alpha", cin_alpha),
                  ("cout_alpha", cout_alpha), ("pam_gamma", pam_gamma), ("cam_gamma", cam_gamma)):
    if jnp.size(s) != 1:
      raise ValueError(f"{op}: `{name}` must be a scalar, got shape {list(jnp.shape(s))}")
  w = {name: jnp.asarray(a, jnp.float32) for name, a in given.items()}
  f32s = lambda s: jnp.asarray(s, jnp.float32).reshape(())
  z = jnp.concatenate([x, fused], axis=-1).astype(jnp.float32)
  a = _conv_prelu(z, w["pin_kernel"], w["pin_bias"], f32s(pin_alpha)).reshape(B, H * W, C)
  a, pos = position_attention_module(a, w["pam_wq"], w["pam_bq"], w["pam_wk"], w["pam_wv"],
                                     w["pam_bv"], f32s(pam_gamma))
  b = _conv_prelu(z, w["cin_kernel"], w["cin_bias"], f32s(cin_alpha)).reshape(B, H * W, C)
  b, chan = channel_attention_module(b, f32s(cam_gamma))
  y = (_conv_prelu(a.reshape(B, H, W, C), w["pout_kernel"], w["pout_bias"], f32s(pout_alpha))
       + _conv_prelu(b.reshape(B, H, W, C), w["cout_kernel"], w["cout_bias"], f32s(cout_alpha)))
  y = y.astype(x.dtype)
  return (y, (pos, chan)) if return_gate else y


def guided_attention_loss(encodings_1: Sequence[Array], encodings_2: Sequence[Array],
                          inputs: Optional[Sequence[Array]] = None,
                          reconstructions: Optional[Sequence[Array]] = None) -> Loss:
  """The guiding loss between two refinement steps (module docstring): the mean squared difference of
  each scale's encoder embeddings `E_s¹, E_s²`, plus, when given, each encoder-decoder's
  reconstruction error `mean((F_s - F̂_s)²)`. Zero when the steps agree and reconstruct exactly."""
  op = "guided_attention_loss"
  if len(encodings_1) != len(encodings_2) or not encodings_1:
    raise ValueError(f"{op}: `encodings_1` and `encodings_2` must be equally long non-empty "
                     f"sequences, got {len(encodings_1)} and {len(encodings_2)}")
  if (inputs is None) != (reconstructions is None) or (
      inputs is not None and len(inputs) != len(reconstructions)):
    raise ValueError(f"{op}: `inputs` and `reconstructions` must both be given, equally long")
  pairs = (list(zip(encodings_1, encodings_2, strict=True))
           + list(zip(inputs or (), reconstructions or (), strict=True)))
  total = jnp.float32(0.0)
  for u, v in pairs:
    if jnp.shape(u) != jnp.shape(v):
      raise ValueError(f"{op}: paired arrays must have equal shapes, got {jnp.shape(u)} and "
                       f"{jnp.shape(v)}")
    total = total + jnp.mean((jnp.asarray(u, jnp.float32) - jnp.asarray(v, jnp.float32)) ** 2)
  return total


class GuidedPositionChannelAttention(nn.Module):
  """Creates the block's weights (PyTorch's convolution defaults, PReLU slopes 0.25, query / key width
  C / `reduction` as the reference PAM; γ at zero as the reference) and calls
  `guided_position_channel_attention`; sows both attentions as ("intermediates", "gate")."""
  reduction: int = 8
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, fused):
    C = x.shape[-1]
    cq = max(1, C // self.reduction)
    p = lambda name, init, shape: self.param(name, init, shape, self.param_dtype)
    from_z, from_c3, from_c = (torch_uniform(9 * 2 * C), torch_uniform(9 * C),
                               torch_uniform(C))
    slope = nn.initializers.constant(0.25)
    y, gates = guided_position_channel_attention(
        x, fused, pin_kernel=p("pin_kernel", from_z, (3, 3, 2 * C, C)),
        pin_bias=p("pin_bias", from_z, (C,)), pin_alpha=p("pin_alpha", slope, ()),
        pam_wq=p("pam_wq", from_c, (C, cq)), pam_bq=p("pam_bq", from_c, (cq,)),
        pam_wk=p("pam_wk", from_c, (C, cq)), pam_wv=p("pam_wv", from_c, (C, C)),
        pam_bv=p("pam_bv", from_c, (C,)), pam_gamma=p("pam_gamma", nn.initializers.zeros, ()),
        pout_kernel=p("pout_kernel", from_c3, (3, 3, C, C)), pout_bias=p("pout_bias", from_c3, (C,)),
        pout_alpha=p("pout_alpha", slope, ()),
        cin_kernel=p("cin_kernel", from_z, (3, 3, 2 * C, C)), cin_bias=p("cin_bias", from_z, (C,)),
        cin_alpha=p("cin_alpha", slope, ()), cam_gamma=p("cam_gamma", nn.initializers.zeros, ()),
        cout_kernel=p("cout_kernel", from_c3, (3, 3, C, C)), cout_bias=p("cout_bias", from_c3, (C,)),
        cout_alpha=p("cout_alpha", slope, ()), return_gate=True)
    for gate in gates:
      self.sow("intermediates", modules.GATE, gate)
    return y


modules.register_module(modules.Module(
    name="guided_position_channel_attention", fn=guided_position_channel_attention,
    linen=GuidedPositionChannelAttention, kind="feature_map", family="channel-spatial", seeds=(212,),
    paper="Multi-scale self-guided attention for medical image segmentation", arxiv="1906.02849",
    extra_inputs=(modules.ExtraInput("fused", lambda shape: tuple(shape)),), gate_range=(0.0, 1.0)))
