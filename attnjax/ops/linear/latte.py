"""Latte (#96): attention factored through L latent states, linear in T.

Dolga et al., "Latent Attention for Linear Time Transformers", arXiv:2402.17512.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core.linear_contract import (CAUSAL_IMPLEMENTATIONS, feature_linear_attention,
                                          map_output)
from attnjax.registry import Mechanism, ParamSpec, example_arrays, register
from attnjax.typing import Key, Lengths, Output, Query, SegmentIds, Value

__all__ = ["LATTE_LATENTS", "latte_attention"]

_F32 = jnp.float32


LATTE_LATENTS = 16


def latte_attention(q: Query, k: Key, v: Value, *, query_latents, key_latents, causal: bool = True,
                    segment_ids: Optional[SegmentIds] = None, q_offset=0,
                    kv_lengths: Optional[Lengths] = None, scale=None,
                    implementation: Optional[str] = None, initial_state=None,
                    return_final_state: bool = False) -> Output | tuple[Output, Any]:
  """Latte: attention factored through L latent states, linear in T.

  `o_t = Σ_l p(l|t) Σ_{s≤t} p(s|l,t) v_s` with `p(l|t) = softmax_l(q_t W_q)` and
  `p(s|l,t) = exp(k_s·w_l) / Σ_{s'≤t} exp(k_{s'}·w_l)` (`W_q = query_latents [N, H, L]`,
  `W_k = key_latents [K, H, L]`). The inner sums are L normalized linear-attention heads with
  one-dimensional features, so decoding keeps `L · (h + 1)` numbers per head (`initial_state`
  needs `return_final_state=True`). Key logits are clipped at 60 (exp stays finite in float32).
  The paper's logits have no `scale` (the latents learn theirs): a `scale` other than None is an
  error. Dolga et al., "Latent Attention for Linear Time Transformers", arXiv:2402.17512.
  """
  if scale is not None:
    raise ValueError(f"latte_attention: the paper has no `scale` (the latent projections learn "
                     f"the logits' magnitude); got scale={scale}")
  B, T, N, H = q.shape
  S, K, h = k.shape[1], k.shape[2], v.shape[-1]
  L = query_latents.shape[-1]
  p_lt = jax.nn.softmax(jnp.einsum("btnf,nfl->btnl", q.astype(_F32), query_latents), axis=-1)
  k_logit = jnp.minimum(jnp.einsum("bskf,kfl->bskl", k.astype(_F32), key_latents), 60.0)
  kf = jnp.exp(k_logit).reshape(B, S, K * L, 1)
  vl = jnp.broadcast_to(v.astype(_F32)[:, :, :, None], (B, S, K, L, h)).reshape(B, S, K * L, h)
  # Heads ordered (kv head, query group, latent) so GQA groups share their kv head's latents.
  ones = jnp.ones((B, T, N * L, 1), _F32)
  kf = jnp.repeat(kf.reshape(B, S, K, 1, L, 1), N // K, 3).reshape(B, S, N * L, 1)
  vl = jnp.repeat(vl.reshape(B, S, K, 1, L, h), N // K, 3).reshape(B, S, N * L, h)
  result = feature_linear_attention(
      "latte_attention", ones, kf, vl, causal=causal, segment_ids=segment_ids, q_offset=q_offset,
      kv_lengths=kv_lengths, implementation=implementation, normalize=True, scale=1.0,
      initial_state=initial_state, return_final_state=return_final_state)
  mix = lambda per_latent: jnp.einsum(
      "btnl,btnlh->btnh", p_lt, per_latent.astype(_F32).reshape(B, T, N, L, h)).astype(q.dtype)
  return map_output(result, mix)


def _latte_latent_count(kwargs):
  """L, from the latents passed (the layer creates LATTE_LATENTS of them)."""
  latents = kwargs.get("query_latents")
  return LATTE_LATENTS if latents is None else np.shape(latents)[-1]


# Example setting: L = 5 latents (fewer than LATTE_LATENTS, so the state stays small in checks).
_EXAMPLE_LATENTS = 5


def _example(*, N: int, K: int, H: int) -> dict:
  """Latent projections at the asked sizes, large enough (std 0.5) that the latents differ."""
  L = _EXAMPLE_LATENTS
  return {**example_arrays(3, {"query_latents": ((N, H, L), 0.0, 0.5)}),
          **example_arrays(4, {"key_latents": ((K, H, L), 0.0, 0.5)})}


register(Mechanism(
    name="latte_attention", fn=latte_attention, family="linear", seeds=(96,),
    paper="Latent Attention for Linear Time Transformers", arxiv="2402.17512",
    recurrent=True, complexity="O(T·L·h)", implementations=CAUSAL_IMPLEMENTATIONS,
    params=(ParamSpec("query_latents", lambda N, K, H: (N, H, LATTE_LATENTS),
                      jax.nn.initializers.normal(0.02)),
            ParamSpec("key_latents", lambda N, K, H: (K, H, LATTE_LATENTS),
                      jax.nn.initializers.normal(0.02))),
    example=_example,
    state_size=lambda T, N, K, H, h, kwargs: N * _latte_latent_count(kwargs) * (h + 1)))
