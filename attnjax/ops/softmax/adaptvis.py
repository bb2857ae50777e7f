"""Temperature on a token subset (AdaptVis / ScalingVis): scale the logits of some keys by α.

    s_ij = scale · q_i·k_j · (α if j ∈ subset else 1)        o_i = Σ_j softmax_j(s_ij) v_j

A vision-language model's attention to its image tokens (the subset) is sharpened with α > 1, which
concentrates it on the image tokens it already prefers, or smoothed with α < 1, which spreads it
over more of the image. AdaptVis chooses α per example at decoding time from the model's confidence
(`adaptvis_alpha`): the largest probability of its first generated token, from a plain (α = 1) run;
below a threshold α_smooth < 1, else α_sharpen > 1 (the authors' README grid: threshold 0.3,
α_smooth ∈ {0.5, 0.8}, α_sharpen ∈ {1.2, 1.5, 2.0}); ScalingVis is one fixed α. The mechanism takes
α, as a float or one per example (`[B]`).

This is the authors' operation (github.com/shiqichen17/AdaptVis, `model_zoo/llama/
modeling_llama_add_attn.py`: `attn_weights[:, :, mask] *= weight` on the scaled logits, before the
attention mask and the softmax). Their code applies it in the prefill pass to the image-token
columns of the last query row (the row that produces the answer); here it applies to every query
row, and a caller who wants only the answer row runs the other rows with α = 1 (the operator is
row-local: rows do not interact). The subset is a per-key boolean given per call (`subset [B, S]`,
cached beside the keys when decoding). A `score_mod` on flex attention: every flex path serves it.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`, `subset [B,S]` (bool), `alpha` float or `[B]`
→ `[B,T,N,h]`.
Paper: Chen, Zhu, Zhou, Zhang, Gao, Niebles, Geva, He, Wu and Li, "Why Is Spatial Reasoning Hard for
VLMs? An Attention Mechanism Perspective on Focus Areas", ICML 2025, arXiv:2503.01773.
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core.contract import flex_with_contract
from attnjax.registry import Mechanism, TokenInput, register
from attnjax.typing import Array, Float, Key, Lengths, Output, PerKeyToken, Query, Value

__all__ = ["temperature_on_token_subset", "adaptvis_alpha", "generation_confidence"]

PerExample = Float[Array, "B"]
Alpha = Union[float, PerExample]
TokenLogits = Float[Array, "B V"]


def generation_confidence(first_token_logits: TokenLogits) -> PerExample:
  """AdaptVis's confidence: the largest softmax probability of the first generated token's logits
  `[B, V]` (the authors' `max(softmax(output['scores'][0]))`), in float32."""
  return jnp.max(jax.nn.softmax(first_token_logits.astype(jnp.float32), axis=-1), axis=-1)


def adaptvis_alpha(confidence, *, threshold: float, alpha_smooth: float, alpha_sharpen: float):
  """AdaptVis's decoding rule: α = `alpha_smooth` (< 1, spread attention over the image) where the
  confidence is below `threshold`, else `alpha_sharpen` (> 1, focus it); elementwise, so a `[B]`
  confidence gives the `[B]` α of `temperature_on_token_subset`."""
  return jnp.where(jnp.asarray(confidence) < threshold, alpha_smooth, alpha_sharpen).astype(
      jnp.float32)


def temperature_on_token_subset(q: Query, k: Key, v: Value, *, subset: PerKeyToken,
                                causal: bool = False, segment_ids=None, q_offset=0,
                                kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                                implementation: Optional[str] = None,
                                alpha: Alpha = 1.0) -> Output:
  """Softmax attention with the logits of the keys in `subset` multiplied by α (see module)."""
  op = "temperature_on_token_subset"
  B, _, S, _, _, _, _ = checks.check_qkv(op, q, k, v)
  checks.check_shape(op, "subset", subset, (B, S), "[B, S]")
  if jnp.ndim(alpha) not in (0, 1) or (jnp.ndim(alpha) == 1 and jnp.shape(alpha) != (B,)):
    raise ValueError(f"{op}: `alpha` must be a float or have shape [B] = [{B}], "
                     f"got shape {jnp.shape(alpha)}")
  subset = jnp.asarray(subset, bool)
  alpha = jnp.asarray(alpha, jnp.float32)

  def score_mod(s, b, n, qi, ki):
    # Indices broadcast as [B, ., ., T, S]-compatible arrays: b batch row, ki key slot.
    a = alpha[b] if alpha.ndim == 1 else alpha
    return jnp.where(subset[b, ki], s * a, s)

  return flex_with_contract(op, q, k, v, causal=causal, segment_ids=segment_ids, q_offset=q_offset,
                            kv_lengths=kv_lengths, scale=scale, implementation=implementation,
                            score_mod=score_mod)


register(Mechanism(
    name="temperature_on_token_subset", fn=temperature_on_token_subset, family="softmax-variant",
    seeds=(23,),
    paper="Why Is Spatial Reasoning Hard for VLMs? An Attention Mechanism Perspective on Focus Areas",
    arxiv="2503.01773",
    token_inputs=(TokenInput("subset", side="kv", kind="given", dtype="bool"),),
    # α = 1.5 (a sharpening step of the README's grid) so the tests see the subset matter.
    example={"alpha": 1.5}))
