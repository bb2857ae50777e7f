"""CrossLMM's dual cross-attention layer (DCAL): a few pooled visual tokens and the text tokens, after
a self-attention over both, each cross-attend to the full set of original visual tokens, gated, so
only the pooled tokens occupy the language model's sequence.

Yan, Han, Tsai, Xue, Fang, Hong, Guo, Zhang, "CrossLMM: Decoupling Long Video Sequences from LMMs via
Dual Cross-Attention Mechanisms", arXiv:2505.17020 (section 3.2-3.3, eqs. 4-10; the authors' PDF in
shilinyan99/CrossLMM, which has no code). With the sequence I = [V; T] (L_v pooled visual tokens,
then L_t text tokens, width D) and the original visual tokens O `[S, D]` (every frame's patches):

    I' = LayerNorm(SelfAttn(I) + I)                                                      (4)
    I'[:L_v] ← I'[:L_v] + tanh(α_v) · Attn(I'[:L_v] W_q^v, O W_k^v, O W_v^v)    V2V        (5-7)
    I'[L_v:] ← I'[L_v:] + tanh(α_t) · Attn(I'[L_v:] W_q^t, O W_k^t, O W_v^t)    T2V        (8-10)

Attn is multi-head softmax(QKᵀ/√d) V with no output projection (as the equations); γ = tanh(α) ∈
[−1, 1] is the paper's learnable gate (Figure 3's "tanh gating"), α starting at 0 so that a layer
inserted into a pretrained model begins as the identity on the cross paths. SelfAttn is multi-head
attention with an output projection; the paper does not say whether it is causal: it is causal by
default here (`causal=True`), which keeps the language model's next-token training valid (text tokens
see the visual tokens before them, not later text), and `causal=False` gives the bidirectional form.
The paper's parameter-free merge of the visual encoder's tokens into the pooled ones happens before
the projector and is not part of this layer (pass the pooled tokens in I).

Shapes: `x [B, L_v + L_t, D]` (I), `visual_tokens [B, S, D]` (O) → `[B, L_v + L_t, D]`; projection
kernels `[D, D]`, `norm_scale`, `norm_bias` `[D]`, gates `alpha_v`, `alpha_t` scalars.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from attnjax import modules
from attnjax.core import flex, masks
from attnjax.typing import Array, Float

__all__ = ["DualCrossAttentionLayer", "dual_cross_attention_layer"]

Sequence_ = Float[Array, "B L D"]
VisualTokens = Float[Array, "B S D"]
_LN_EPS = 1e-5
_KERNELS = ("self_q", "self_k", "self_v", "self_o", "v2v_q", "v2v_k", "v2v_v", "t2v_q", "t2v_k",
            "t2v_v")


def _heads(x, num_heads):
  return x.reshape(x.shape[:2] + (num_heads, x.shape[-1] // num_heads))


def _attend(q, k, v, num_heads, causal=False):
  out = flex.flex_attention(_heads(q, num_heads), _heads(k, num_heads), _heads(v, num_heads),
                            mask_mod=masks.causal(0) if causal else None, implementation="xla")
  return out.reshape(q.shape[:2] + (-1,))


def dual_cross_attention_layer(x: Sequence_, visual_tokens: VisualTokens, *, self_q, self_k, self_v,
                               self_o, v2v_q, v2v_k, v2v_v, t2v_q, t2v_k, t2v_v, norm_scale,
                               norm_bias, alpha_v, alpha_t, num_visual: int, num_heads: int = 4,
                               causal: bool = True) -> Sequence_:
  """CrossLMM's DCAL (module docstring): the first `num_visual` tokens of `x` are the pooled visual
  tokens, the rest text; both cross-attend to `visual_tokens`."""
  op = "dual_cross_attention_layer"
  if jnp.ndim(x) != 3:
    raise ValueError(f"{op}: `x` must be [B, L_v + L_t, D], got shape {jnp.shape(x)}")
  B, L, D = x.shape
  if jnp.ndim(visual_tokens) != 3 or visual_tokens.shape[0] != B or visual_tokens.shape[2] != D:
    raise ValueError(f"{op}: `visual_tokens` must be [B, S, D] = [{B}, S, {D}], got shape "
                     f"{jnp.shape(visual_tokens)}")
  if not isinstance(num_visual, int) or not 0 < num_visual < L:
    raise ValueError(f"{op}: `num_visual` (L_v) must be an int in (0, L) = (0, {L}): the sequence is "
                     f"L_v pooled visual tokens then at least one text token; got {num_visual!r}")
  if D % num_heads:
    raise ValueError(f"{op}: D = {D} must split into num_heads = {num_heads} heads")
  kernels = dict(self_q=self_q, self_k=self_k, self_v=self_v, self_o=self_o, v2v_q=v2v_q,
                 v2v_k=v2v_k, v2v_v=v2v_v, t2v_q=t2v_q, t2v_k=t2v_k, t2v_v=t2v_v)
  for name, kern in kernels.items():
    if jnp.shape(kern) != (D, D):
      raise ValueError(f"{op}: `{name}` must be [D, D] = [{D}, {D}], got {list(jnp.shape(kern))}")
  f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
  w = {name: f32(kern) for name, kern in kernels.items()}
  i, o = f32(x), f32(visual_tokens)

  attended = _attend(i @ w["self_q"], i @ w["self_k"], i @ w["self_v"], num_heads, causal)
  z = attended @ w["self_o"] + i
  mu = jnp.mean(z, axis=-1, keepdims=True)
  var = jnp.var(z, axis=-1, keepdims=True)
  z = (z - mu) / jnp.sqrt(var + _LN_EPS) * f32(norm_scale) + f32(norm_bias)      # I'

  def cross(part, prefix, alpha):
    ctx = _attend(part @ w[f"{prefix}_q"], o @ w[f"{prefix}_k"], o @ w[f"{prefix}_v"], num_heads)
    return part + jnp.tanh(f32(alpha)) * ctx

  visual = cross(z[:, :num_visual], "v2v", alpha_v)
  text = cross(z[:, num_visual:], "t2v", alpha_t)
  return jnp.concatenate([visual, text], axis=1).astype(x.dtype)


class DualCrossAttentionLayer(nn.Module):
  """Creates the DCAL's projections (Xavier-uniform), its layer norm and its two tanh gates (α = 0:
  the cross paths start closed) and calls `dual_cross_attention_layer(x, visual_tokens)`."""
  num_visual: int = 4
  num_heads: int = 4
  causal: bool = True

  @nn.compact
  def __call__(self, x: Sequence_, visual_tokens: VisualTokens) -> Sequence_:
    D = x.shape[-1]
    kernels = {name: self.param(name, nn.initializers.xavier_uniform(), (D, D)) for name in _KERNELS}
    return dual_cross_attention_layer(
        x, visual_tokens, **kernels,
        norm_scale=self.param("norm_scale", nn.initializers.ones, (D,)),
        norm_bias=self.param("norm_bias", nn.initializers.zeros, (D,)),
        alpha_v=self.param("alpha_v", nn.initializers.zeros, ()),
        alpha_t=self.param("alpha_t", nn.initializers.zeros, ()),
        num_visual=self.num_visual, num_heads=self.num_heads, causal=self.causal)


modules.register_module(modules.Module(
    name="dual_cross_attention_layer", fn=dual_cross_attention_layer, linen=DualCrossAttentionLayer,
    kind="signal", family="cross-attention", seeds=(21,),
    paper="CrossLMM: Decoupling Long Video Sequences from LMMs via Dual Cross-Attention Mechanisms",
    arxiv="2505.17020",
    # The original visual tokens: three frames' worth of patches, more than the pooled ones.
    extra_inputs=(modules.ExtraInput("visual_tokens", lambda s: (s[0], 3 * s[1], s[2])),),
    gate_range=None, example={"num_visual": 5, "num_heads": 4}))
