"""LongHeads: each head attends to the `top_k` chunks whose summary key best matches its query.

The keys are cut into chunks of `chunk_size` (w) tokens. Each chunk c gets a summary key r_c by the
authors' two-stage attention pooling over the chunk's own tokens (`modeling_longheads/
modeling_llama.py` of github.com/LuLuLuyi/LongHeads; non-causal inside the chunk, padding excluded):

    o_j   = Σ_{i ∈ c} softmax_i(scale · q_j · k_i) x_i        j ∈ c    (in-chunk attention)
    q̄_c   = mean_{j ∈ c} o_j                                         (the chunk's summary query)
    r_c   = Σ_{i ∈ c} softmax_i(scale · q̄_c · k_i) k_i               (a weighted mean of its keys)

In the authors' code x = v (the chunk's attention outputs, so q̄_c lives in value space and is dotted
with keys: defined only when v's head dim h equals H): `summary="values"` is exactly that and
requires h == H. The default `summary="keys"` is the same pooling with the chunk's keys in place of
its values in the first stage (x = k), so q̄_c lives in key space and any h works (the q, k, v
contract, GQA, and the conformance suite's h != H): our interpretation, the closest form that needs
no value-space query. Each query head pools with its own queries against its key head's keys, so
summaries are per query head (GQA included).

Query t (position p, own chunk c = p // w) scores every chunk by the raw q_t · r_j (no scale, as the
code) and attends, with one causal softmax, to the union of `top_k` chunks: the first chunk (the
attention sink), the previous chunk c - 1 and its own chunk c are forced (they count among the
`top_k`, as the authors' +max fill before `topk`), the rest are the best-scoring chunks before
c - 1 (later chunks are never candidates). A head therefore attends to at most top_k · w keys: the
paper's "within the pretrained length" (its defaults: w = 256, top_k = 4096 / 256 = 16). Queries
with p < top_k · w see every earlier chunk, i.e. full causal attention (the authors' plain attention
before `begin_selective_length` = top_k · w). With top_k covering every chunk this is exactly full
causal attention. Ties go to the lower chunk index.

Interpretations, besides `summary`: (1) the call's `scale` (default H^-1/2, the authors' head_dim^-1/2)
scales both pooling stages and the attention; (2) the authors' prefill loop attends to the own
chunk's keys strictly before the query (an off-by-one: their decode step includes the current key);
we use the causal mask, the query's own key included; (3) positional encoding is the caller's: the
authors' chunk-local RoPE for the summaries and the remapping of the selected chunks onto positions
below top_k · w cannot be applied to already-encoded q, k; on un-rotated inputs the selection and
attention are theirs; (4) padding (`kv_lengths`) is excluded from the pooling (their code zero-fills
it but keeps it in the in-chunk softmax and mean).

The summary of chunk c needs the queries of its tokens, which a KV cache does not keep (the authors
cache past queries for that): a call must be a full causal self-attention forward (T == S,
q_offset 0; `decode=False`). Causality holds exactly: a query's selection reads only the summaries
of chunks ending before its previous chunk. Packed documents are not supported (chunks would
straddle documents); pass separate rows. The selection is a table `[B, N, T, nb]` turned into a
traced `BlockMask` by `attnjax.core.sparse.selection_mask`, so `flex_attention`'s `xla` path visits
only selected tiles; gradients flow through the attention over the selected keys (the selection is a
top-k, not differentiable).

Shapes: `q [B,T,N,H]`, `k [B,T,K,H]`, `v [B,T,K,h]` → `[B,T,N,h]`.
Paper: Lu et al., "LongHeads: Multi-Head Attention is Secretly a Long Context Processor",
arXiv:2402.10685.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import sparse
from attnjax.registry import Mechanism, register
from attnjax.typing import Key, Lengths, Output, Query, Value

__all__ = ["longheads_attention", "longheads_selection", "longheads_summaries"]

SUMMARIES = ("keys", "values")


def _masked_softmax(s, keep):
  """Softmax over the last axis among `keep`; a row with nothing kept gives zeros."""
  s = jnp.where(keep, s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  e = jnp.where(keep, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
  den = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(den > 0, den, 1.0)


def _chunks(x, w: int, nb: int):
  """`[B, L, ...]` → `[B, nb, w, ...]` (zero-padded to nb · w)."""
  pad = [(0, 0), (0, nb * w - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
  return jnp.pad(x, pad).reshape((x.shape[0], nb, w) + x.shape[2:])


def longheads_summaries(q: Query, k: Key, v: Value, *, chunk_size: int, summary: str = "keys",
                        kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None):
  """float32 `[B, nb, N, H]`: each chunk's summary key r_c per query head (see the module
  docstring); a chunk with no real token gives 0. Self-attention: q and k cover the same tokens."""
  B, T, N, H = q.shape
  K = k.shape[2]
  G, w = N // K, chunk_size
  nb = sparse.num_blocks(T, w)
  scale = H ** -0.5 if scale is None else scale
  # Selection only: nothing flows back through the summaries.
  q, k, v = (jax.lax.stop_gradient(x.astype(jnp.float32)) for x in (q, k, v))
  x = k if summary == "keys" else v
  qc = _chunks(q, w, nb).reshape(B, nb, w, K, G, H)
  kc, xc = _chunks(k, w, nb), _chunks(x, w, nb)                          # [B, nb, w, K, .]
  real = _chunks(contract.valid_slots(B, T, kv_lengths), w, nb)           # [B, nb, w]
  keep = real[:, :, None, None, None, :]                                  # over key slots i
  # Stage 1: non-causal attention inside the chunk, then the mean over its real tokens.
  p1 = _masked_softmax(jnp.einsum("bcjkgh,bcikh->bckgji", qc, kc) * scale, keep)
  o = jnp.einsum("bckgji,bcikd->bckgjd", p1, xc)
  count = jnp.maximum(jnp.sum(real, axis=-1), 1)[:, :, None, None, None]
  q_bar = jnp.sum(jnp.where(real[:, :, None, None, :, None], o, 0.0), axis=-2) / count
  # Stage 2: the summary query pools the chunk's keys.
  p2 = _masked_softmax(jnp.einsum("bckgd,bcikd->bckgi", q_bar, kc) * scale, keep[..., 0, :])
  r = jnp.einsum("bckgi,bcikh->bckgh", p2, kc)
  return r.reshape(B, nb, N, H)


def longheads_selection(q: Query, k: Key, v: Value, *, chunk_size: int, top_k: int,
                        summary: str = "keys", kv_lengths: Optional[Lengths] = None,
                        scale: Optional[float] = None):
  """bool `[B, N, T, nb]`: the chunks each query token of each head attends to (causal self-
  attention): first, previous and own chunk, plus the best q · r_c among the earlier ones, `top_k`
  in all."""
  B, T = q.shape[:2]
  w = chunk_size
  nb = sparse.num_blocks(T, w)
  r = longheads_summaries(q, k, v, chunk_size=w, summary=summary, kv_lengths=kv_lengths, scale=scale)
  # The raw q · r_c, unscaled as in the authors' `global_qk`.
  score = jnp.einsum("btnh,bcnh->bntc", q.astype(jnp.float32), r)
  candidates = sparse.candidate_blocks(B=B, T=T, S=T, q_block=1, block_size=w, causal=True,
                                       kv_lengths=kv_lengths)
  own = (contract.query_positions(B, T) // w)[:, None, :, None]          # [B, 1, T, 1]
  chunk = jnp.arange(nb)
  forced = (chunk == 0) | (chunk == own - 1) | (chunk == own)
  # +inf on the forced chunks: they take places among the top_k, as the authors' fill with max.
  return sparse.top_k_blocks(jnp.where(forced, jnp.inf, score), top_k, candidates=candidates,
                             always=forced)


def longheads_attention(q: Query, k: Key, v: Value, *, causal: bool = True, segment_ids=None,
                        q_offset=0, kv_lengths: Optional[Lengths] = None,
                        scale: Optional[float] = None, implementation: Optional[str] = None,
                        chunk_size: int = 256, top_k: int = 16, summary: str = "keys") -> Output:
  """LongHeads (see the module docstring): causal attention over each head's first, previous and
  own chunk plus the chunks whose summary key best matches the query, `top_k` chunks in all."""
  op = "longheads_attention"
  B, T, S, _, _, H, h = checks.check_qkv(op, q, k, v)
  for name, value, low in (("chunk_size", chunk_size, 1), ("top_k", top_k, 3)):
    if not isinstance(value, int) or value < low:
      raise ValueError(f"{op}: `{name}` must be an int >= {low}, got {value!r}")
  if summary not in SUMMARIES:
    raise ValueError(f"{op}: `summary` must be one of {SUMMARIES}, got {summary!r}")
  if summary == "values" and h != H:
    raise ValueError(f"{op}: summary='values' dots the chunk's mean attention output with keys, so "
                     f"`v`'s head dim h must equal q/k's H; got h={h}, H={H} (use summary='keys')")
  if not causal:
    raise ValueError(f"{op}: LongHeads is causal (a query selects among earlier chunks); pass "
                     "causal=True")
  if segment_ids is not None:
    raise ValueError(f"{op}: packed sequences (`segment_ids`) are not supported (chunks would "
                     "straddle documents); pass documents as separate rows")
  if not contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths):
    raise ValueError(f"{op}: needs every query of the sequence (T == S, q_offset == 0): a chunk's "
                     f"summary pools its tokens' queries, which a KV cache does not keep; got T={T}, "
                     f"S={S}")
  selected = longheads_selection(q, k, v, chunk_size=chunk_size, top_k=top_k, summary=summary,
                                 kv_lengths=kv_lengths, scale=scale)
  return sparse.attend_selected(op, q, k, v, selected, q_block=1, block_size=chunk_size,
                                causal=True, kv_lengths=kv_lengths, scale=scale,
                                implementation=implementation)


register(Mechanism(
    name="longheads_attention", fn=longheads_attention, family="sparse-inference", seeds=(197,),
    paper="LongHeads: Multi-Head Attention is Secretly a Long Context Processor", arxiv="2402.10685",
    patterns=frozenset({"causal_self"}), decode=False, packed=False,
    complexity="O(T·(T/chunk_size + top_k·chunk_size)), summaries O(T·chunk_size)",
    defaults=dict(chunk_size=256, top_k=16, summary="keys"),
    example=dict(chunk_size=4, top_k=4)))
