"""Selective attention: earlier tokens mask later tokens' attention to what they found unneeded.

    s^0_kj = scale · q_k^(0)·k_j^(0)                       head 0's causal logits (the selection head)
    S_kj   = relu(s^0_kj)  for j < k, j not the BOS;  0 otherwise (the diagonal, future, BOS)
    F_ij   = Σ_{k < i} S_kj                                accumulated over the earlier queries
    o_i    = Σ_{j <= i} softmax_j(scale · q_i·k_j - F_ij) v_j      every head

A token k that "selects" an earlier token j (a positive logit of the selection head) lowers the logit
of j for every later query, in every head: j is softly removed from the context once an earlier token
judged it unneeded. Parameter-free: S reuses head 0's logits (query head 0 against its key/value
head). These are the paper's equations line by line (its Figure 1 code: `S = relu(attn_logits[0])`,
`S[..., 0] = 0` (do not mask BOS), `S = (1 - eye) * S` (do not mask self), `roll(S, 1, -2)` with the
first row zeroed (mask strictly in the future), `F = cumsum(S, axis=-2)`, `attn_logits -= F`).

The BOS is the first token of each sequence: key 0, and with packed documents (`segment_ids`) the
first token of each document, so packed documents equal separate ones (S never crosses documents:
head 0 cannot see across them). `kv_lengths` hides padded key slots (their S is 0).

F needs the selection head's logits of every earlier query, a `[T, S]` matrix per sequence that is
materialized here (one head: N times smaller than the attention matrix); the attention itself is
flex attention with the score_mod -F, so the `xla` path streams it over all heads with causal block
skipping. Decoding over a KV cache is not supported: the earlier queries are not in the cache, and
the contract's cache has no slot for the per-key sum F_·j that the paper carries at inference
(`decode=False`); a call must be a full causal self-attention forward (T == S, q_offset = 0).
Not implemented: the paper's context pruning (dropping cache entries with the largest F to a
memory budget), which is a decode-time cache policy.

Shapes: `q [B,T,N,H]`, `k [B,T,K,H]`, `v [B,T,K,h]` → `[B,T,N,h]`; `selection_penalty` → `[B,T,T]`.
Paper: Leviathan, Kalman and Matias, "Selective Attention Improves Transformer", arXiv:2410.02703.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.registry import Mechanism, register
from attnjax.typing import Array, Float, Key, Lengths, Output, Query, Value

__all__ = ["selective_attention_masking", "selection_penalty"]

# F: one penalty per (query, key) pair of a sequence.
Penalty = Float[Array, "B T S"]


def selection_penalty(q: Query, k: Key, *, segment_ids=None, kv_lengths: Optional[Lengths] = None,
                      scale: Optional[float] = None) -> Penalty:
  """F_ij = Σ_{k<i} S_kj of the module docstring, `[B, T, T]` float32, from head 0's causal logits
  (a full causal self-attention: every query of the sequence)."""
  B, T, _, H = q.shape
  S = k.shape[1]
  scale = H ** -0.5 if scale is None else scale
  s0 = scale * jnp.einsum("bth,bsh->bts", q[:, :, 0].astype(jnp.float32),
                          k[:, :, 0].astype(jnp.float32))
  qi = jnp.arange(T, dtype=jnp.int32)[None, :, None]
  kj = jnp.arange(S, dtype=jnp.int32)[None, None, :]
  # Strictly earlier keys (no self, no future), in the query's document, within the lengths.
  keep = (kj < qi) & contract.valid_slots(B, S, kv_lengths)[:, None, :]
  start, _ = contract.document_bounds(segment_ids, B, S)
  keep &= kj != start[:, None, :]                                  # never the BOS of a document
  same_doc = True if segment_ids is None else segment_ids[:, :, None] == segment_ids[:, None, :]
  sel = jnp.where(keep & same_doc, jax.nn.relu(s0), 0.0)
  # Exclusive prefix sum over the query axis: row i sums the rows k < i (of its own document: the
  # sums of an earlier document's keys stay out of a later document's rows).
  F = jnp.concatenate([jnp.zeros((B, 1, S), jnp.float32), jnp.cumsum(sel, axis=1)[:, :-1]], axis=1)
  return jnp.where(same_doc, F, 0.0)


def selective_attention_masking(q: Query, k: Key, v: Value, *, causal: bool = True,
                                segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
                                scale: Optional[float] = None,
                                implementation: Optional[str] = None) -> Output:
  """Selective attention (see the module docstring): causal logits minus head 0's accumulated F."""
  op = "selective_attention_masking"
  B, T, S, _, _, _, _ = checks.check_qkv(op, q, k, v)
  if not causal:
    raise ValueError(f"{op}: selective attention is causal (earlier tokens mask keys for later "
                     "ones); pass causal=True")
  full = contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths,
                                       segment_ids=segment_ids)
  if not full:
    raise ValueError(f"{op}: needs every query of the sequence (T == S, q_offset == 0): F sums the "
                     f"selection head's logits of all earlier queries, which a KV cache does not "
                     f"keep; got T={T}, S={S}")
  if segment_ids is not None:
    checks.check_shape(op, "segment_ids", segment_ids, (B, T), "[B, T]")
  if kv_lengths is not None:
    checks.check_shape(op, "kv_lengths", kv_lengths, (B,), "[B]")
  penalty = selection_penalty(q, k, segment_ids=segment_ids, kv_lengths=kv_lengths, scale=scale)

  def score_mod(s, b, n, qi, ki):
    # penalty is [B, T, S]; the indices broadcast as [B, ., ., T, S]; every head gets the same F.
    return s - penalty[b, qi, ki]

  return contract.flex_with_contract(op, q, k, v, causal=True, segment_ids=segment_ids,
                                     q_offset=0, kv_lengths=kv_lengths, scale=scale,
                                     implementation=implementation, score_mod=score_mod)


register(Mechanism(
    name="selective_attention_masking", fn=selective_attention_masking, family="softmax-variant",
    seeds=(132,), paper="Selective Attention Improves Transformer", arxiv="2410.02703",
    patterns=frozenset({"causal_self"}), decode=False, complexity="O(T·S), F: O(T·S) memory"))
