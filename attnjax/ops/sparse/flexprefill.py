"""FlexPrefill: per-head choice between a query-aware and a vertical-slash block pattern, each sized
by cumulative attention mass.

Keys and queries are cut into blocks of `block_size` (b) tokens, nb = ceil(T / b). For every head:

1. Pattern choice (the paper's Query-Aware Sparse Pattern Determination). Q̂ = the last b real
   queries of the prompt (positions L-b .. L-1, L the row's length). Their true attention
   A = softmax(scale · Q̂ Kᵀ) (causal) gives the block distribution ā_j = (1/|Q̂|) Σ_{r, t∈j} A_rt;
   the pooled estimate is â = softmax_j(scale · mean(Q̂) · mean(k_block j)). With
   d = sqrt(JSD(â ‖ ā)) (natural log), the head is query-aware when d < τ, else vertical-slash.
2. Vertical-slash heads (Cumulative-Attention Based Index Selection on A): the vertical mass of key
   block j is ā_j; the slash mass of diagonal group g is (1/|Q̂|) Σ_r Σ_{g·b ≤ d < (g+1)·b} A_{r,p_r-d}
   (attention at distance d from the query, grouped by b distances, as the authors' code). Each
   keeps the smallest set of blocks, ranked by mass with the first vertical block / the main
   diagonal (g = 0) forced to the front (the authors' +inf fill), whose mass reaches γ of the total,
   clipped to [min_budget, max_budget] blocks. Key block j covers the tiles (i, j) for all query
   blocks i; diagonal g covers the tiles (i, i - g).
3. Query-aware heads: Ã_ij = softmax_{j ≤ i}(scale · mean(q_block i) · mean(k_block j)), flattened
   over all (i, j) of the head and normalized; the smallest set of tiles whose estimated mass
   reaches γ (the paper's Algorithm for query-aware index search; one set per head over the whole
   map, as the paper and the authors' `score_cover_idx(attn.view(-1), gamma * num_blocks)`). As in
   the authors' code the head also keeps min_budget vertical and slash blocks (the first block and
   the diagonal by default).
4. Block-sparse attention: o_t = Σ_{s visible, tile(t, s) kept} softmax_s(scale · q_t · k_s) v_s, on
   `flex_attention` under the traced `BlockMask` of the kept tiles (`core.sparse.selection_mask`).

Prefill only. Every row attends only to keys visible under the call's mask (causal masking holds
exactly: a query never sees a later key), but the *choice* of tiles for every query block is made
from the whole prompt (the last query block's attention, the pooled map's global ranking), so
changing a later token can change which earlier keys an earlier query attends to. This is an
inference method for prefilling a prompt, not a layer to train an autoregressive model with, and it
does not decode over a KV cache (`decode=False`; the authors run dense attention for single-token
decode steps). The call must be a full causal self-attention forward (T == S, q_offset 0);
`kv_lengths` pads rows of a batch (each row's statistics use its real tokens only). Packed documents
are not supported.

Interpretations (the paper and the authors' code, github.com/bytedance/FlexPrefill,
`get_active_blocks`, differ in details, or the code assumes batch 1 and T a multiple of b):
(1) vertical-slash budgets are counted on the block masses (the smallest covering set of blocks);
the code counts tokens and takes (count // 128 + 1) blocks, which need not reach γ; (2) the forced
first block / diagonal takes one of the counted places (the code's +inf fill), so the kept set is
the smallest covering set that contains it; (3) the query-aware cover is the smallest set whose mass
*reaches* γ (the paper); the code keeps those whose cumulative mass stays ≤ γ (one fewer);
(4) diagonal groups are distance // b (the code's grouping when T is a multiple of b); (5) the
call's `scale` (default H^-1/2) is used in the selection too (the code uses head_dim^-1/2 there);
(6) the authors' dense shortcut for prompts of at most two blocks is not applied (with the first
block and the diagonal forced, such prompts select every tile anyway, min_budget aside).
The selection is not differentiable (stop-gradient): gradients flow through the attention over the
kept tiles. GQA: each query head selects for itself against its key head's keys.

Shapes: `q [B,T,N,H]`, `k [B,T,K,H]`, `v [B,T,K,h]` → `[B,T,N,h]`.
Paper: Lai et al., "FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient
Long-Sequence Inference", arXiv:2502.20766.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import sparse
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["flexprefill_attention", "flexprefill_selection", "FlexPrefillSelection",
           "cumulative_mass_cover"]


class FlexPrefillSelection(NamedTuple):
  """What `flexprefill_selection` chose, per batch row and query head (nb = ceil(T / block_size)).

  Attributes:
    selected: bool `[B, N, nb, nb]`: the (query block, key block) tiles attended (causal and
      padding candidates only).
    query_aware: bool `[B, N]`: the head uses the query-aware pattern (divergence < tau).
    divergence: float32 `[B, N]`: sqrt Jensen-Shannon divergence of the pooled estimate from the
      last query block's true block distribution.
    vertical: bool `[B, N, nb]`: the kept key-block columns.
    slash: bool `[B, N, nb]`: the kept block diagonals (g = query block - key block).
    query_blocks: bool `[B, N, nb, nb]`: the query-aware cover of the estimated map (all False on
      vertical-slash heads).
  """
  selected: jax.Array
  query_aware: jax.Array
  divergence: jax.Array
  vertical: jax.Array
  slash: jax.Array
  query_blocks: jax.Array


def _masked_softmax(s, keep):
  """Softmax over the last axis among `keep`; a row with nothing kept gives zeros."""
  s = jnp.where(keep, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.where(keep, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  den = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(den > 0, den, 1.0)


def _keep_first(order, count):
  """bool like `order`: True at the entries ranked (by `order`, along the last axis) before `count`."""
  ranked = jnp.arange(order.shape[-1]) < count[..., None]
  return jnp.take_along_axis(ranked, jnp.argsort(order, axis=-1), axis=-1)


def _cover(mass, gamma: float, forced=None):
  """(ranking, count): entries ordered by `mass` descending (`forced` first, ties to lower index),
  and the size of the smallest prefix of that order whose mass reaches `gamma` of the total."""
  key = mass if forced is None else jnp.where(forced, jnp.inf, mass)
  order = jnp.argsort(-key, axis=-1, stable=True)
  ranked = jnp.take_along_axis(mass, order, axis=-1)
  # Entry r is needed while the mass before it is below gamma · total, i.e. while the mass from r on
  # exceeds (1 - gamma) · total: the tail form keeps every positive entry at gamma = 1 exactly.
  tail = jnp.cumsum(ranked[..., ::-1], axis=-1)[..., ::-1]
  count = jnp.sum(tail > (1.0 - gamma) * tail[..., :1], axis=-1)
  return order, count


def cumulative_mass_cover(mass, gamma: float, *, forced=None):
  """bool like `mass [..., L]` (non-negative): the smallest set of entries along the last axis whose
  mass reaches `gamma` of the total, taken in order of decreasing mass (ties to the lower index),
  with `forced` entries (bool, broadcastable) ranked first and so always kept."""
  order, count = _cover(mass, gamma, forced)
  return _keep_first(order, count)


def _last_block_masses(q, k, *, block_size: int, lengths, scale: float):
  """The last query block's statistics: (vertical `[B, N, nb]`, slash `[B, N, nb]`, estimate
  `[B, N, nb]`), each a distribution over key blocks / diagonal groups (zeros for an empty row)."""
  B, T, N, H = q.shape
  K = k.shape[2]
  nb = sparse.num_blocks(T, block_size)
  pos = lengths[:, None] - block_size + jnp.arange(block_size)[None]         # [B, r]
  rows = pos >= 0
  n_rows = jnp.maximum(jnp.sum(rows, axis=-1), 1)[:, None, None]             # [B, 1, 1]
  q_last = contract.gather_positions(q, pos)                                 # [B, r, N, H]
  s = jnp.einsum("brkgh,bjkh->bkgrj", q_last.reshape(B, block_size, K, N // K, H), k) * scale
  s = s.reshape(B, N, block_size, T)
  keys = jnp.arange(T)
  visible = rows[:, None, :, None] & (keys <= pos[:, None, :, None])
  attn = _masked_softmax(s, visible)                                         # [B, N, r, T]
  # Key j at distance d = p_r - j from row r: A_{r, p_r - d}.
  at = pos[:, :, None] - keys[None, None, :]                                 # [B, r, d]
  diag = jnp.take_along_axis(attn, jnp.clip(at, 0, T - 1)[:, None], axis=-1)
  diag = jnp.where((at >= 0)[:, None], diag, 0.0)
  pad = nb * block_size - T

  def blocks(x):                                      # [B, N, T] → sums over groups of block_size
    return jnp.pad(x, ((0, 0), (0, 0), (0, pad))).reshape(B, N, nb, block_size).sum(-1)

  vertical = blocks(jnp.sum(attn, axis=2)) / n_rows
  slash = blocks(jnp.sum(diag, axis=2)) / n_rows
  # The pooled estimate: mean of the last block's queries against each key block's mean key.
  q_mean = jnp.sum(jnp.where(rows[:, :, None, None], q_last, 0.0), axis=1) / n_rows[:, 0, :, None]
  k_mean = sparse.pool_blocks(k, block_size, lengths=lengths)               # [B, nb, K, H]
  est = jnp.einsum("bkgh,bjkh->bkgj", q_mean.reshape(B, K, N // K, H), k_mean) * scale
  real = (jnp.arange(nb) * block_size)[None] < lengths[:, None]             # [B, nb]
  estimate = _masked_softmax(est.reshape(B, N, nb), real[:, None, :])
  return vertical, slash, estimate


def _sqrt_js(p, q):
  """sqrt of the Jensen-Shannon divergence (natural log) along the last axis; 0 · log 0 = 0."""
  m = 0.5 * (p + q)
  safe = jnp.where(m > 0, m, 1.0)

  def kl(x):
    return jnp.sum(jnp.where(x > 0, x * jnp.log(jnp.where(x > 0, x, 1.0) / safe), 0.0), axis=-1)

  return jnp.sqrt(jnp.maximum(0.5 * kl(p) + 0.5 * kl(q), 0.0))


# One compiled program: called eagerly, its ~100 small ops would each be dispatched (and compiled)
# on their own; under an outer jit it is inlined. gamma and tau stay traced (no recompile per value).
@functools.partial(jax.jit, static_argnames=("block_size", "min_budget", "max_budget"))
def flexprefill_selection(q: Query, k: Key, *, block_size: int, gamma: float, tau: float,
                          min_budget: Optional[int] = None, max_budget: Optional[int] = None,
                          kv_lengths: Optional[Lengths] = None,
                          scale: Optional[float] = None) -> FlexPrefillSelection:
  """FlexPrefill's tile selection for a causal prefill (T == S): the pattern of each head and the
  kept tiles (see the module docstring). Budgets are in tokens, as the authors' (ceil to blocks)."""
  B, T, N, H = q.shape
  b = block_size
  nb = sparse.num_blocks(T, b)
  scale = H ** -0.5 if scale is None else scale
  lengths = contract.lengths_or_full("flexprefill_selection", kv_lengths, B, T)
  low = 1 if min_budget is None else -(-min_budget // b)
  high = nb if max_budget is None else min(-(-max_budget // b), nb)
  # Selection only: nothing flows back through it.
  q, k = (jax.lax.stop_gradient(x.astype(jnp.float32)) for x in (q, k))
  vertical_mass, slash_mass, estimate = _last_block_masses(q, k, block_size=b, lengths=lengths,
                                                           scale=scale)
  divergence = _sqrt_js(estimate, vertical_mass)
  query_aware = divergence < tau
  # Vertical-slash budgets from the masses; query-aware heads keep min_budget of each.
  first = jnp.arange(nb) == 0
  budgets = []
  for mass in (vertical_mass, slash_mass):
    order, count = _cover(mass, gamma, first)
    count = jnp.where(query_aware, low, jnp.clip(count, low, high))
    budgets.append(_keep_first(order, count))
  vertical, slash = budgets
  # Query-aware: the pooled block map of every query block, one cover over the flattened map.
  k_blocks = sparse.pool_blocks(k, b, lengths=lengths)
  scores = sparse.block_scores(q, k_blocks, q_block=b, scale=scale, q_lengths=lengths)
  candidates = sparse.candidate_blocks(B=B, T=T, S=T, q_block=b, block_size=b, causal=True,
                                       kv_lengths=lengths)                   # [B, 1, nb, nb]
  real_rows = ((jnp.arange(nb) * b)[None] < lengths[:, None])[:, None, :, None]
  block_map = _masked_softmax(scores, candidates & real_rows)
  cover = cumulative_mass_cover(block_map.reshape(B, N, nb * nb), gamma).reshape(B, N, nb, nb)
  query_blocks = cover & query_aware[..., None, None] & candidates
  offset = jnp.arange(nb)[:, None] - jnp.arange(nb)[None, :]                # query - key block
  on_slash = jnp.where(offset >= 0, slash[..., jnp.clip(offset, 0, nb - 1)], False)
  selected = (vertical[..., None, :] | on_slash | query_blocks) & candidates
  return FlexPrefillSelection(selected, query_aware, divergence, vertical, slash, query_blocks)


def flexprefill_attention(q: Query, k: Key, v: Value, *, causal: bool = True, segment_ids=None,
                          q_offset=0, kv_lengths: Optional[Lengths] = None,
                          scale: Optional[float] = None, implementation: Optional[str] = None,
                          block_size: int = 128, gamma: float = 0.9, tau: float = 0.1,
                          min_budget: Optional[int] = None,
                          max_budget: Optional[int] = None) -> Output:
  """FlexPrefill (see the module docstring): causal prefill attention over the tiles each head
  keeps, by a query-aware or vertical-slash pattern chosen by sqrt JS divergence < `tau` and sized
  to cover `gamma` of the attention mass."""
  op = "flexprefill_attention"
  B, T, S, _, _, _, _ = checks.check_qkv(op, q, k, v)
  if not isinstance(block_size, int) or block_size < 1:
    raise ValueError(f"{op}: `block_size` must be a positive int, got {block_size!r}")
  if not 0.0 < gamma <= 1.0:
    raise ValueError(f"{op}: `gamma` (attention coverage) must be in (0, 1], got {gamma!r}")
  for name, value in (("min_budget", min_budget), ("max_budget", max_budget)):
    if value is not None and (not isinstance(value, int) or value < 1):
      raise ValueError(f"{op}: `{name}` (tokens) must be a positive int or None, got {value!r}")
  if not causal:
    raise ValueError(f"{op}: FlexPrefill is a causal prefill method; pass causal=True")
  if segment_ids is not None:
    raise ValueError(f"{op}: packed sequences (`segment_ids`) are not supported (the pattern is "
                     "chosen from the row's last query block); pass documents as separate rows")
  if not contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths):
    raise ValueError(f"{op}: prefill only: needs the whole prompt (T == S, q_offset == 0), since "
                     f"the pattern is chosen from its last query block; got T={T}, S={S}")
  selection = flexprefill_selection(q, k, block_size=block_size, gamma=gamma, tau=tau,
                                    min_budget=min_budget, max_budget=max_budget,
                                    kv_lengths=kv_lengths, scale=scale)
  return sparse.attend_selected(op, q, k, v, selection.selected, q_block=block_size,
                                block_size=block_size, causal=True, kv_lengths=kv_lengths,
                                scale=scale, implementation=implementation)


register(Mechanism(
    name="flexprefill_attention", fn=flexprefill_attention, family="sparse-inference", seeds=(14,),
    paper=("FlexPrefill: A Context-Aware Sparse Attention Mechanism for Efficient Long-Sequence "
           "Inference"), arxiv="2502.20766",
    patterns=frozenset({"causal_self"}), decode=False, packed=False,
    complexity="O(block_size·T + (T/block_size)² + kept tiles·block_size²)",
    defaults=dict(block_size=128, gamma=0.9, tau=0.1),
    example=dict(block_size=4, gamma=0.8, tau=0.3)))
