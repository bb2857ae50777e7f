"""Softpick: a rectified softmax with no attention sink.

    w_ij = relu(e^{s_ij} - 1) / (Σ_j |e^{s_ij} - 1| + ε)          s_ij = scale · q_i·k_j

A key with a negative score gets exactly zero weight, and the weights of a row need not sum to 1
(a row whose scores are all ≤ 0 gives zeros), so a head can attend to nothing instead of parking its
mass on a sink token. Computed stably as `(e^{s-m} - e^{-m}) / (Σ |e^{s-m} - e^{-m}| + ε e^{-m})` with
`m = max(0, max_j s_ij)` (the paper's max subtraction, floored at 0 so that e^{-m} ≤ 1); ε = 1e-6.
The weights are a streamable normalizer (`normalizers.SOFTPICK`), so every `flex_attention` path,
block skipping included, serves it.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`.
Paper: Zuhri et al., "Softpick: No Attention Sink, No Massive Activations with Rectified Softmax",
arXiv:2504.20966.
"""

from __future__ import annotations

from typing import Optional

from attnjax.core.contract import flex_with_contract
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["softpick_attention"]


def softpick_attention(q: Query, k: Key, v: Value, *, causal: bool = False, segment_ids=None,
                       q_offset=0, kv_lengths: Optional[Lengths] = None,
                       scale: Optional[float] = None,
                       implementation: Optional[str] = None) -> Output:
  """Softpick attention (see the module docstring) under the common contract's masks."""
  return flex_with_contract("softpick_attention", q, k, v, causal=causal, segment_ids=segment_ids,
                            q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                            implementation=implementation, normalizer="softpick")


register(Mechanism(name="softpick_attention", fn=softpick_attention, family="softmax-variant",
                   seeds=(190,), paper="Softpick: No Attention Sink, No Massive Activations with "
                                       "Rectified Softmax", arxiv="2504.20966"))
