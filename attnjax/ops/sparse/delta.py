"""Delta Attention: correct any sparse attention's output with dense rows at a stride.

Sparse attention (a sliding window with sinks, a block selection, ...) runs for every query; dense
(full) softmax attention runs only for the anchor queries, one every `gamma` rows. The difference of
the two at an anchor is added to the sparse outputs of the `gamma` queries of its group:

    a(i) = gamma · ⌊i / gamma⌋                                     (the anchor of row i)
    Δ_a  = o^dense_a - o^sparse_a
    o_i  = o^sparse_i + Δ_{a(i)}

so an anchor row is exactly dense attention, and with `gamma = 1` every row is. As in the authors'
code (`delta_forward` in `delta_attention/llama.py` of github.com/jeffwillette/delta-attention: the
strided query indices `arange(0, s, step=λ)` and `repeat_interleave` of the differences) the anchor
is the first row of its group; the authors also recompute the last `max(128, γ) + s % γ` rows
densely, which `dense_last` reproduces (0 by default). Groups are the rows of the call (a prefill);
with `segment_ids` they restart at each packed document, so a document is corrected from its own
anchors only (the dense rows are then computed for every query, since their number depends on the
documents: O(T·S)). The dense anchors cost O((T / gamma) · S) otherwise.

The correction is a prefill method: a decode step has no anchor row among its queries (the paper
decodes densely), so the registered mechanism declares no decoding. Every row's visible keys under
causal / length / document masks contain its anchor's, so a row that sees no key has an anchor that
sees none, and its output stays zero.

The registered `delta_corrected_sliding_window` corrects the paper's headline sparse method, a
sliding window with attention sinks: query at position p sees keys j with |p - j| < window (only
j <= p when causal) or j among the first `num_sinks` keys of its document. `delta_corrected_attention`
applies the correction over any registered mechanism (by name) or any callable with the contract.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `[B,T,N,h]`.
Paper: Willette, Lee, Hwang, "Delta Attention: Fast and Accurate Sparse Attention Inference by Delta
Correction", arXiv:2505.11254.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import catalog
from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import flex
from attnjax.core import masks
from attnjax.registry import Mechanism, get, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["delta_correction", "anchor_rows", "delta_corrected_attention",
           "delta_corrected_sliding_window", "sink_window_mask"]

_PAPER = dict(paper="Delta Attention: Fast and Accurate Sparse Attention Inference by Delta Correction",
              arxiv="2505.11254")


def _check_int(op: str, name: str, value, low: int):
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"{op}: `{name}` must be an int >= {low}, got {value!r}")


def _query_segments(segment_ids):
  return segment_ids[0] if isinstance(segment_ids, (tuple, list)) else segment_ids


def anchor_rows(B: int, T: int, gamma: int, *, segment_ids=None, dense_last: int = 0):
  """`[B, T]` int32: the anchor row a(i) whose dense output corrects row i (the first row of its
  group of `gamma`, groups restarting at each document of `segment_ids [B, T]`); the last
  `dense_last` rows are their own anchors."""
  t = jnp.arange(T, dtype=jnp.int32)[None]
  if segment_ids is None:
    start = jnp.zeros((B, T), jnp.int32)
  else:
    start, _ = contract.document_bounds(jnp.asarray(_query_segments(segment_ids)), B, T)
  anchor = start + ((t - start) // gamma) * gamma
  if dense_last:
    anchor = jnp.where(t >= T - dense_last, t, anchor)
  return jnp.broadcast_to(anchor, (B, T))


def delta_correction(o_sparse, o_dense, anchors) -> jax.Array:
  """`o_i = o_sparse_i + (o_dense_{a(i)} - o_sparse_{a(i)})`: `o_sparse`, `o_dense` `[B, T, N, h]`
  (`o_dense` is read at the anchors only), `anchors [B, T]` (see `anchor_rows`). float32 arithmetic,
  the result in `o_sparse`'s dtype."""
  take = jax.vmap(lambda x, idx: x[idx])
  sp = o_sparse.astype(jnp.float32)
  delta = take(o_dense.astype(jnp.float32), anchors) - take(sp, anchors)
  return (sp + delta).astype(o_sparse.dtype)


def _dense_at_anchors(op, q, k, v, *, gamma, dense_last, causal, segment_ids, q_offset, kv_lengths,
                      scale, implementation):
  """`(o_dense [B, T, N, h] valid at the anchor rows, anchors [B, T])`: dense softmax attention
  under the contract, computed for the strided anchor rows only when the groups are static."""
  B, T, S, _, _, _, _ = checks.check_qkv(op, q, k, v)
  anchors = anchor_rows(B, T, gamma, segment_ids=segment_ids, dense_last=dense_last)
  base = contract.contract_mask(B=B, T=T, S=S, causal=causal, q_offset=q_offset,
                                segment_ids=segment_ids, kv_lengths=kv_lengths, op=op)
  if segment_ids is not None or gamma == 1:
    # Document-relative anchors: their number is data-dependent, so every row is computed.
    dense = flex.flex_attention(q, k, v, mask_mod=base, scale=scale, implementation=implementation)
    return dense, anchors
  # Static rows (T, gamma and dense_last are Python ints): the strided anchors and the dense tail.
  rows = np.unique(np.concatenate([np.arange(0, T, gamma), np.arange(max(T - dense_last, 0), T)]))
  table = jnp.asarray(rows, jnp.int32)
  # The dense pass sees the gathered rows; its mask reads the contract at their original indices.
  mask_mod = None if base is None else (lambda b, n, i, kv: base(b, n, table[i], kv))
  dense_rows = flex.flex_attention(q[:, rows], k, v, mask_mod=mask_mod, scale=scale,
                                   implementation=implementation)
  # Scatter back to row positions (rows that are no anchor hold zeros and are never read).
  dense = jnp.zeros(q.shape[:3] + (v.shape[3],), dense_rows.dtype).at[:, rows].set(dense_rows)
  return dense, anchors


@catalog.serves(41, kind="function", name="attnjax.ops.sparse.delta_corrected_attention")
def delta_corrected_attention(q: Query, k: Key, v: Value, *, sparse: Union[str, Callable[..., Any]],
                              gamma: int, sparse_kwargs: Optional[dict] = None, causal: bool = False,
                              segment_ids=None, q_offset=0, kv_lengths: Optional[Lengths] = None,
                              scale: Optional[float] = None, implementation: Optional[str] = None,
                              dense_last: int = 0) -> Output:
  """Delta correction (see the module docstring) of the sparse attention `sparse`: a registered
  mechanism's name or a callable with the common contract, called with `sparse_kwargs` (its
  defaults first) and the contract's keywords. `implementation` selects the dense pass's flex
  implementation (put the sparse mechanism's own in `sparse_kwargs`)."""
  op = "delta_corrected_attention"
  _check_int(op, "gamma", gamma, 1)
  _check_int(op, "dense_last", dense_last, 0)
  kwargs = dict(sparse_kwargs or {})
  if isinstance(sparse, str):
    mech = get(sparse)
    fn, kwargs = mech.fn, {**mech.defaults, **kwargs}
  elif callable(sparse):
    fn = sparse
  else:
    raise ValueError(f"{op}: `sparse` must be a registered mechanism name or a callable, "
                     f"got {sparse!r}")
  if segment_ids is not None:
    kwargs["segment_ids"] = segment_ids
  o_sparse = fn(q, k, v, causal=causal, q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                **kwargs)
  dense, anchors = _dense_at_anchors(op, q, k, v, gamma=gamma, dense_last=dense_last, causal=causal,
                                     segment_ids=segment_ids, q_offset=q_offset,
                                     kv_lengths=kv_lengths, scale=scale,
                                     implementation=implementation)
  return delta_correction(o_sparse.astype(q.dtype), dense, anchors)


def sink_window_mask(window: int, num_sinks: int, *, B: int, S: int, q_offset=0, segment_ids=None):
  """mask_mod: key j is within the window of the query's position p (|p - j| < window) or among the
  first `num_sinks` keys of its packed document (of the whole row without `segment_ids`). Causality
  and the document restriction come from the call contract's mask."""
  if segment_ids is None:
    first = None
  else:
    kv_seg = segment_ids[1] if isinstance(segment_ids, (tuple, list)) else segment_ids
    first, _ = contract.document_bounds(jnp.asarray(kv_seg), B, S)

  def sinks(b, n, q_idx, kv_idx):
    del n, q_idx
    start = 0 if first is None else first[b, kv_idx]
    return kv_idx - start < num_sinks

  return masks.or_masks(sinks, masks.sliding_window(window - 1, window - 1, offset=q_offset))


def delta_corrected_sliding_window(q: Query, k: Key, v: Value, *, window: int, num_sinks: int = 4,
                                   gamma: int = 64, causal: bool = False, segment_ids=None,
                                   q_offset=0, kv_lengths: Optional[Lengths] = None,
                                   scale: Optional[float] = None,
                                   implementation: Optional[str] = None,
                                   dense_last: int = 0) -> Output:
  """Sliding-window-with-sinks attention plus Delta correction from dense rows every `gamma`
  queries (see the module docstring)."""
  op = "delta_corrected_sliding_window"
  B, T, S, _, _, _, _ = checks.check_qkv(op, q, k, v)
  _check_int(op, "window", window, 1)
  _check_int(op, "num_sinks", num_sinks, 0)
  _check_int(op, "gamma", gamma, 1)
  _check_int(op, "dense_last", dense_last, 0)
  mask_mod = sink_window_mask(window, num_sinks, B=B, S=S, q_offset=q_offset,
                              segment_ids=segment_ids)
  o_sparse = contract.flex_with_contract(op, q, k, v, causal=causal, segment_ids=segment_ids,
                                         q_offset=q_offset, kv_lengths=kv_lengths, scale=scale,
                                         implementation=implementation, mask_mod=mask_mod)
  dense, anchors = _dense_at_anchors(op, q, k, v, gamma=gamma, dense_last=dense_last, causal=causal,
                                     segment_ids=segment_ids, q_offset=q_offset,
                                     kv_lengths=kv_lengths, scale=scale,
                                     implementation=implementation)
  return delta_correction(o_sparse, dense, anchors)


register(Mechanism(
    name="delta_corrected_sliding_window", fn=delta_corrected_sliding_window,
    family="sparse-inference", seeds=(41,), **_PAPER,
    # A prefill correction: a decode step holds no anchor row (the paper decodes densely).
    decode=False, complexity="O(T·(window + num_sinks) + (T/gamma)·S)",
    defaults=dict(num_sinks=4, gamma=64),
    example=dict(window=3, num_sinks=2, gamma=4)))
