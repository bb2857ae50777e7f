"""Round Attention: attend only to the dialogue rounds the query attends to most.

A multi-round dialogue's KV cache is grouped by round (a user question and the model's answer); each
key carries its round id. At a watershed layer L_w the paper finds that the distribution of attention
over rounds stops changing from layer to layer, so it is computed there once: the attention the
current round's queries give to each earlier round r,

    qAtt_r = Σ_{i ∈ queries} Σ_n Σ_{j ∈ round r} softmax_j(scale · q_{i,n} · k_j)      (full attention)

(summed over the query heads n; the paper normalizes it to a distribution over rounds, which leaves
the ranking as it is), and only the top-k rounds' KV (plus the current round's) are loaded for the
layers after L_w:

    o_i = Σ_{j ∈ selected rounds ∪ current round} softmax_j(scale · q_i · k_j) v_j

`round_attention` is that attention. Given `selected_rounds` (the watershed layer's choice, e.g. from
`select_rounds`, `[B, k]` per sequence or `[B, T, k]` per query; negative ids are empty slots) it
attends to those rounds and each query's own round. Without it the layer is its own watershed: each
query scores the rounds by its own row of full attention (qAtt_r of that one query) and keeps its
`top_k_rounds` best, so a row depends only on keys it may see (a causal decode step over a KV cache
equals the full forward's row). `select_rounds` is the watershed's choice for a whole call (a
question's prefill): qAtt_r summed over all of the call's queries, one top-k per sequence.

The current round of a query is the round id at its own position (`q_offset + t`): self-attention
over the dialogue (with a KV cache: `q_offset`, `kv_lengths`). Only earlier ("history") rounds
compete; rounds with no visible key are never chosen, so with `top_k_rounds` at least the number of
history rounds this is exactly softmax attention. Selection is a top-k (ties to the lower round id)
and carries no gradient; gradients flow through the attention over the selected keys.

Scoring materializes the full-attention weights `[B, N, T, S]` (float32), as the watershed layer
computes them once; the attention over the kept rounds is flex attention under a `[B, T, S]` keep
mask (every flex implementation serves it).

Round ids are ints in [0, S) (rounds numbered from 0, each with at least one token, always are);
they need not be contiguous. Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`, `round_ids [B,S]`
→ `[B,T,N,h]`.
Paper: Tang, Hu, Cheng, Mo, Lv, Wang and Chen, "Round Attention: A Novel Round-Level Attention
Mechanism to Accelerate LLM Inference", arXiv:2502.15294.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import dense
from attnjax.core import sparse
from attnjax.registry import Mechanism, TokenInput, register
from attnjax.typing import Array, Int, Key, Lengths, Output, PerKeyToken, Query, Value

__all__ = ["round_attention", "select_rounds"]

Rounds = Int[Array, "B ..."]
RoundChoice = Int[Array, "B k"]
# The conformance suite draws round ids in [0, _EXAMPLE_ROUNDS); the operator takes any ids in [0, S).
_EXAMPLE_ROUNDS = 4


def _check_top_k(op: str, top_k_rounds) -> int:
  if isinstance(top_k_rounds, bool) or not isinstance(top_k_rounds, int) or top_k_rounds < 1:
    raise ValueError(f"{op}: `top_k_rounds` must be an int >= 1, got {top_k_rounds!r}")
  return top_k_rounds


def _history_scores(op, q, k, round_ids, *, causal, segment_ids, q_offset, kv_lengths, scale):
  """Per query: `(qAtt [B, T, R], present [B, T, R], own [B, T], visible [B, N, T, S])` with R = S
  round slots: the full-attention weight (summed over heads) each history round gets, whether the
  round has a visible key, each query's own round, and the contract's mask."""
  B, T, S, _, _, _, _ = checks.check_qkv(op, q, k, k)
  checks.check_shape(op, "round_ids", round_ids, (B, S), "[B, S]")
  contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths,
                                segment_ids=segment_ids)
  s, visible = dense.contract_scores(op, q, k, k, causal=causal, segment_ids=segment_ids,
                                     q_offset=q_offset, kv_lengths=kv_lengths, scale=scale)
  # Selection is discrete: the scores that rank rounds carry no gradient.
  s = jax.lax.stop_gradient(s)
  m = jnp.max(jnp.where(visible, s, -jnp.inf), axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(visible, jnp.exp(jnp.where(visible, s - m, 0.0)), 0.0)
  den = jnp.sum(e, axis=-1, keepdims=True)
  weights = jnp.sum(e / jnp.where(den > 0, den, 1.0), axis=1)                   # [B, T, S]
  own = contract.gather_positions(round_ids, contract.query_positions(B, T, q_offset))   # [B, T]
  history = jnp.any(visible, axis=1) & (round_ids[:, None, :] != own[:, :, None])
  per_round = jax.vmap(lambda x, ids: jax.ops.segment_sum(x.T, ids, num_segments=S).T)
  q_att = per_round(jnp.where(history, weights, 0.0), round_ids)
  present = per_round(history.astype(jnp.float32), round_ids) > 0
  return q_att, present, own, visible


def select_rounds(q: Query, k: Key, round_ids: PerKeyToken, top_k_rounds: int, *,
                  causal: bool = True, segment_ids=None, q_offset=0,
                  kv_lengths: Optional[Lengths] = None,
                  scale: Optional[float] = None) -> RoundChoice:
  """The watershed layer's choice for a call (a question's prefill): the `top_k_rounds` history
  rounds with the largest qAtt_r (module docstring) summed over all the call's queries and heads,
  `[B, top_k_rounds]` int32 round ids, best first, -1 where a sequence has fewer history rounds.
  Pass it to `round_attention(..., selected_rounds=...)` in the layers after the watershed."""
  op = "select_rounds"
  top_k_rounds = _check_top_k(op, top_k_rounds)
  round_ids = jnp.asarray(round_ids, jnp.int32)
  q_att, present, _, _ = _history_scores(op, q, k, round_ids, causal=causal,
                                         segment_ids=segment_ids, q_offset=q_offset,
                                         kv_lengths=kv_lengths, scale=scale)
  chosen, valid = sparse.token_top_k(jnp.sum(q_att, axis=1), top_k_rounds,
                                     visible=jnp.any(present, axis=1))
  chosen = jnp.where(valid, chosen, -1)
  if chosen.shape[-1] < top_k_rounds:   # fewer round slots (S) than asked: pad with empty slots
    chosen = jnp.pad(chosen, ((0, 0), (0, top_k_rounds - chosen.shape[-1])), constant_values=-1)
  return chosen


def round_attention(q: Query, k: Key, v: Value, *, round_ids: PerKeyToken, causal: bool = False,
                    segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
                    scale: Optional[float] = None, implementation: Optional[str] = None,
                    top_k_rounds: Optional[int] = None,
                    selected_rounds: Optional[Rounds] = None) -> Output:
  """Round Attention: softmax attention over the selected dialogue rounds and the current one.

  Args:
    q: `[B, T, N, H]`; k: `[B, S, K, H]`; v: `[B, S, K, h]`, K dividing N (self-attention: T == S,
      or new tokens over a KV cache with `q_offset` and `kv_lengths`).
    round_ids: `[B, S]` int, each key's dialogue round, in [0, S).
    causal, segment_ids, q_offset, kv_lengths, scale, implementation: the common contract
      (`attnjax.registry`).
    top_k_rounds: how many history rounds each query keeps when it scores them itself (without
      `selected_rounds`).
    selected_rounds: a watershed layer's choice, `[B, k]` (one per sequence, e.g. `select_rounds`)
      or `[B, T, k]` (one per query) round ids; negative ids are empty slots. Overrides the
      scoring.

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "round_attention"
  B, T, S, _, _, _, _ = checks.check_qkv(op, q, k, v)
  round_ids = jnp.asarray(round_ids, jnp.int32)
  if selected_rounds is None:
    if top_k_rounds is None:
      raise ValueError(f"{op}: give `top_k_rounds` (the query scores the rounds itself) or "
                       "`selected_rounds` [B, k] / [B, T, k] (a watershed layer's choice)")
    q_att, present, own, _ = _history_scores(op, q, k, round_ids, causal=causal,
                                             segment_ids=segment_ids, q_offset=q_offset,
                                             kv_lengths=kv_lengths, scale=scale)
    chosen, valid = sparse.token_top_k(q_att, _check_top_k(op, top_k_rounds), visible=present)
  else:
    checks.check_shape(op, "round_ids", round_ids, (B, S), "[B, S]")
    contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths,
                                  segment_ids=segment_ids)
    chosen = jnp.asarray(selected_rounds, jnp.int32)
    if chosen.ndim == 2 and chosen.shape[0] == B:
      chosen = jnp.broadcast_to(chosen[:, None, :], (B, T, chosen.shape[1]))
    checks.check_shape(op, "selected_rounds", chosen, (B, T, None), "[B, k] or [B, T, k]")
    valid = chosen >= 0
    own = contract.gather_positions(round_ids, contract.query_positions(B, T, q_offset))
  # Each query's kept rounds as a [B, T, R] table (R = S round slots), read at every key's round.
  slots = jnp.where(valid, chosen, S)
  rows = jnp.arange(B)[:, None, None], jnp.arange(T)[None, :, None]
  table = jnp.zeros((B, T, S), bool).at[rows[0], rows[1], slots].set(True, mode="drop")
  ids = jnp.clip(round_ids, 0, S - 1)
  kept = jnp.take_along_axis(table, jnp.broadcast_to(ids[:, None, :], (B, T, S)), axis=-1)
  kept = kept | (round_ids[:, None, :] == own[:, :, None])
  kept = jax.lax.stop_gradient(kept)

  def mask_mod(b, n, q_idx, kv_idx):
    del n
    return kept[b, q_idx, kv_idx]

  return contract.flex_with_contract(op, q, k, v, causal=causal, segment_ids=segment_ids,
                                     q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                                     implementation=implementation, mask_mod=mask_mod)


register(Mechanism(
    name="round_attention", fn=round_attention, family="decode-kvcache", seeds=(4,),
    paper="Round Attention: A Novel Round-Level Attention Mechanism to Accelerate LLM Inference",
    arxiv="2502.15294", patterns=frozenset({"self", "causal_self"}),
    token_inputs=(TokenInput("round_ids", side="kv", kind="given", dtype="int",
                             num_values=_EXAMPLE_ROUNDS),),
    # One history round of up to three besides the query's own: the selection decides.
    example={"top_k_rounds": 1}))
