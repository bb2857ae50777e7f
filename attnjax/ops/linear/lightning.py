"""Lightning Attention-2 (#79): decayed causal linear attention, tiled intra/inter block.

Qin et al., "Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large
Language Models", arXiv:2401.04658.
"""

from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp

from attnjax.core import masks
from attnjax.core.linear_contract import (CAUSAL_IMPLEMENTATIONS, feature_linear_attention,
                                          recurrent_state_floats)
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, SegmentIds, Value

__all__ = ["lightning_attention_2", "lightning_decay_rates"]

_F32 = jnp.float32


def lightning_decay_rates(num_heads: int) -> jax.Array:
  """Per-head decay rates `λ_n = exp(-2^{-8(n+1)/N})` (TransNormerLLM / RetNet geometric rates)."""
  return -masks.alibi_slopes(num_heads)


def lightning_attention_2(q: Query, k: Key, v: Value, *, causal: bool = True,
                          segment_ids: Optional[SegmentIds] = None, q_offset=0,
                          kv_lengths: Optional[Lengths] = None, scale=None,
                          implementation: Optional[str] = None, log_decay_rates=None,
                          chunk_size: int = 64, initial_state=None,
                          return_final_state: bool = False) -> Output | tuple[Output, Any]:
  """Lightning Attention-2: causal linear attention `o_t = (scale · q_t) Σ_{s≤t} λ^{t-s} k_s v_sᵀ`.

  `scale` defaults to `H ** -0.5`. Tiled: intra-block `((scale · Q_i K_iᵀ) ⊙ M) V_i` plus
  inter-block `scale · Q_i KV` with `KV ← λ^C KV + K_iᵀ V_i` (the primitive's "xla" form).
  `log_decay_rates [N]` (≤ 0; default `lightning_decay_rates`; 0 means no decay). Non-causal:
  `scale · Q (Kᵀ V)` without decay. Recurrent decoding carries KV (`[B,N,H,h]`);
  `initial_state` needs `return_final_state=True`. Qin et al., "Lightning Attention-2: A Free
  Lunch for Handling Unlimited Sequence Lengths in Large Language Models", arXiv:2401.04658.
  """
  B, T, N, H = q.shape
  S = k.shape[1]
  rates = (lightning_decay_rates(N) if log_decay_rates is None else
           jnp.asarray(log_decay_rates, _F32))
  log_decay = jnp.broadcast_to(rates, (B, S, N)) if causal else None
  return feature_linear_attention(
      "lightning_attention_2", q, k, v, causal=causal, segment_ids=segment_ids,
      q_offset=q_offset, kv_lengths=kv_lengths, implementation=implementation,
      log_decay=log_decay, scale=H ** -0.5 if scale is None else scale, chunk_size=chunk_size,
      initial_state=initial_state, return_final_state=return_final_state)


register(Mechanism(
    name="lightning_attention_2", fn=lightning_attention_2, family="linear", seeds=(79,),
    paper="Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large "
          "Language Models", arxiv="2401.04658",
    recurrent=True, complexity="O(T·C·H + T·H·h)", implementations=CAUSAL_IMPLEMENTATIONS,
    example=dict(chunk_size=8), state_size=recurrent_state_floats(extra=0)))
