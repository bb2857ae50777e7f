"""Forgetting attention (FoX): causal softmax attention with a data-dependent forget gate.

    f_t  = σ(x_t·w_f + b_f)                           one scalar gate per token and query head
    D_ij = Σ_{l=j+1..i} log f_l = c_i - c_j           c_t = Σ_{l<=t} log f_l   (j <= i)
    o_i  = Σ_{j<=i} softmax_j(scale · q_i·k_j + D_ij) v_j

A key's logit falls by -log f_l for every later token l up to the query, so the decay is learned and
content-dependent; no positional embedding is needed (a constant gate log f = -m gives ALiBi's
linear bias -m(i - j)). D is a `score_mod` reading the cumulative sum c of `log_forget`, so every
`flex_attention` path serves it, the `xla` one with causal block skipping: the paper's point that
forgetting attention is FlashAttention-compatible.

`log_forget` `[B, S, N]` holds log f_t for every key token (the layer projects it from its input and
applies log-sigmoid: `Mechanism.token_inputs`); a query at absolute position `q_offset + t` reads c at
its own position, so decoding over a KV cache (with the gates cached beside the keys) equals the full
forward. c is a float32 cumulative sum over the sequence, as in the authors' kernel; at very long
lengths the difference c_i - c_j loses the low bits of c (about 1e-3 at |c| = 1e4). Packed documents
need nothing more: D only spans tokens between a key and its query, all in the same document.
Not included: FoX "Pro"'s extra layer parts (output gate, QK-norm, key/value shift), which are layer
options rather than the attention computation.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`, `log_forget [B,S,N]` (≤ 0) → `[B,T,N,h]`.
Paper: Lin, Nikishin, He and Courville, "Forgetting Transformer: Softmax Attention with a Forget
Gate", arXiv:2503.02130.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core.contract import flex_with_contract
from attnjax.registry import Mechanism, TokenInput, register
from attnjax.typing import Key, KeyHeadScalars, Lengths, Output, Query, Value

__all__ = ["forgetting_attention"]


def forgetting_attention(q: Query, k: Key, v: Value, *, log_forget: KeyHeadScalars,
                         causal: bool = True, segment_ids=None, q_offset=0,
                         kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
                         implementation: Optional[str] = None) -> Output:
  """Forgetting attention (see the module docstring): causal softmax with logits + c_i - c_j."""
  op = "forgetting_attention"
  B, T, S, N, _, _, _ = checks.check_qkv(op, q, k, v)
  checks.check_shape(op, "log_forget", log_forget, (B, S, N), "[B, S, N]")
  if not causal:
    raise ValueError(f"{op}: forgetting attention is causal (the forget gates of the tokens between "
                     "a key and its query); pass causal=True")
  c = jnp.cumsum(log_forget.astype(jnp.float32), axis=1)                       # [B, S, N]
  off = jnp.asarray(q_offset, jnp.int32)

  def score_mod(s, b, n, qi, ki):
    # Indices broadcast as [B, ., ., T, .]: b batch, n query head, qi query row, ki key slot.
    pos = (off[b] if off.ndim == 1 else off) + qi
    return s + c[b, jnp.clip(pos, 0, S - 1), n] - c[b, ki, n]

  return flex_with_contract(op, q, k, v, causal=True, segment_ids=segment_ids, q_offset=q_offset,
                            kv_lengths=kv_lengths, scale=scale, implementation=implementation,
                            score_mod=score_mod)


register(Mechanism(
    name="forgetting_attention", fn=forgetting_attention, family="softmax-variant", seeds=(77,),
    paper="Forgetting Transformer: Softmax Attention with a Forget Gate", arxiv="2503.02130",
    patterns=frozenset({"causal_self"}),
    # The authors' default gate projection has a zero-initialized bias (f ≈ σ(x·w_f) at the start).
    token_inputs=(TokenInput("log_forget", side="kv", shape=lambda N, K, H: (N,),
                             activation=jax.nn.log_sigmoid),)))
