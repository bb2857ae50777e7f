"""Decode-phase mechanisms: split-K attention over the key axis with an exact log-sum-exp merge.

Paper: Sanovar et al., "Lean Attention: Hardware-Aware Scalable Attention Mechanism for the
Decode-Phase of Transformers", arXiv:2405.10480.
"""

from __future__ import annotations

from typing import Optional

from attnjax.core import checks
from attnjax.core.contract import contract_mask
from attnjax.core.kvcache import split_k_attention
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["split_k_decode"]


def split_k_decode(q: Query, k: Key, v: Value, *, causal: bool = False, segment_ids=None,
                   q_offset=0, kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                   implementation: Optional[str] = None, num_splits: int = 4) -> Output:
  """Lean-Attention split-K softmax attention: key chunks give partial (o, lse) states, merged exactly.

  The S keys are cut into chunks c of ceil(S / num_splits) keys (at most `num_splits` chunks; the
  last may be shorter); each gives `(o_c, lse_c)` from `flex_attention(return_residuals=True)`, and

      lse = log Σ_c exp(lse_c),      o = Σ_c exp(lse_c - lse) · o_c

  equals softmax(scale · q kᵀ) v over the visible keys for any number of splits. The chunks are
  independent work items, which is what lets decoding (T = 1) use every compute unit.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`, K dividing N.
    causal, segment_ids, q_offset, kv_lengths, scale, implementation: the common contract
      (`attnjax.registry`).
    num_splits: number of key chunks (>= 1); more splits than keys gives one key per chunk.

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  B, T, S, _, _, _, _ = checks.check_qkv("split_k_decode", q, k, v)
  if num_splits < 1:
    raise ValueError(f"split_k_decode: `num_splits` must be >= 1, got {num_splits}")
  if kv_lengths is not None:
    checks.check_shape("split_k_decode", "kv_lengths", kv_lengths, (B,), "[B]")
  # Causal and lengths go to split_k_attention; here: the document mask and the q_offset check.
  extra = contract_mask(B=B, T=T, S=S, q_offset=q_offset, segment_ids=segment_ids,
                        op="split_k_decode")
  return split_k_attention(q, k, v, split_size=-(-S // num_splits), q_offset=q_offset,
                           kv_lengths=kv_lengths, causal=causal, extra_mask=extra, scale=scale,
                           implementation=implementation)


register(Mechanism(
    name="split_k_decode", fn=split_k_decode, family="decode-kvcache", seeds=(5,),
    paper="Lean Attention: Hardware-Aware Scalable Attention Mechanism for the Decode-Phase of "
          "Transformers", arxiv="2405.10480", example=dict(num_splits=3)))
