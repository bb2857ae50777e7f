"""NSA: native sparse attention, three gated branches per query (compressed, selected, sliding).

For query t at absolute position p = q_offset + t (arXiv:2502.11089, section 3):

  compressed   blocks of l keys with stride d, block i = k[i·d .. i·d + l - 1], each compressed by a
               learned MLP φ with intra-block position encoding (eq. 7):
                   k̃_i = φ_k(k_block_i) = W2 · gelu(W1 · vec(k_block_i + P_k))   (per key head)
               (the same for values with φ_v); block i is visible when it ends at or before p
               (i·d + l <= p + 1, causal) and lies within the real keys. o_cmp = softmax(q·k̃ᵀ)·ṽ.
  selected     the compressed branch's probabilities p_cmp [B, N, T, nc] scored onto selection blocks
               of l' keys (eq. 9): p_slc[j] = Σ_i (overlap of compression block i with selection
               block j, in units of d) · p_cmp[i], summed over each GQA group (eq. 10: one selection
               per group); the top n blocks (the first block and the 2 local blocks, the query's own
               and the one before, always among them, as the paper fixes them) are attended with one
               softmax over their keys (causal inside). o_slc.
  sliding      the last w keys: o_win (causal; |p - j| < w without `causal`).

    o_t = g_cmp · o_cmp + g_slc · o_slc + g_win · o_win,     g = `gates [B, T, N, 3]` in (0, 1)

The gates are a per-token projection of the layer input through a sigmoid (`TokenInput` "gates").

Interpretations. Eq. 9 as printed sums p_cmp[(l'/d)·j - m - n]; its weights (1, 2, ..., 2, 1 for
l = 2d, l' = 4d) are the overlaps of the compression blocks with selection block j in units of d,
which is what is computed here, on the blocks that do overlap block j (the printed index is shifted
by l'/d - 1 blocks from them). φ is a two-layer GELU MLP over the flattened block with additive
position embeddings (the paper says "MLP with intra-block position encoding"), hidden width the head
dim; its block length l is the length of the learned `compress_pos_k` (so the learned arrays fix l).
The paper gives each branch its own key/value projections; here the one k, v the layer projects are
shared by the three branches. The compressed branch is a dense `[T, S/d]` softmax (its probabilities
are needed for the selection anyway), computed by query chunks that stay in cache, each chunk's
probabilities projected onto the selection blocks at once (eq. 9 as shifted sums); a causal call at
a static offset runs the chunks in bands that read only the blocks their last query sees; the selected
branch runs by default as the paper's kernel groups its loads, each selected block's queries
gathered into dense tiles (`implementation="gathered"`, `attnjax.core.block_gather`: the work is
T·n blocks), and on `flex_attention` under the selection's `BlockMask` with "xla" / "reference";
the sliding branch runs on `flex_attention` (the `xla` path visits only the window tiles).
Selection is a top-k: not differentiable; gradients reach φ through o_cmp. A query with no
complete block before it gets o_cmp = 0, and its selection is the forced blocks (ties of zero
scores go to lower indices). Without `causal` (an extension; the paper is causal) every complete
block is visible and candidate, and the window is symmetric. Packed documents are not supported
(blocks are global positions): pass separate rows.

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]`, `gates [B,T,N,3]`; `compress_pos_k [l,K,H]`,
`compress_w1_k [K,l·H,H]`, `compress_w2_k [K,H,H]` and the same for v with h → `[B,T,N,h]`.
Paper: Yuan et al., "Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse
Attention", arXiv:2502.11089.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import checks
from attnjax.core import contract
from attnjax.core import masks
from attnjax.core import param_tables
from attnjax.core import sparse
from attnjax.registry import Mechanism, TokenInput, example_params, register
from attnjax.typing import Float, Array, Key, Lengths, Output, Query, Value

__all__ = ["native_sparse_attention", "nsa_compress", "nsa_selection", "nsa_selection_weights",
           "NSA_TABLE"]

# Default compression block l (the learned arrays' length; the paper uses 32 with stride 16). The MLP's
# hidden width E defaults to the head dim. Both are mechanism settings the layer sizes the arrays from
# (`compress_block`, `compress_hidden`).
COMPRESS_BLOCK = 16
_init = jax.nn.initializers


def _e(D, hidden):
  return D if hidden is None else hidden


# (name, shape(N, K, H, h, block, hidden), letters, init): see `attnjax.core.param_tables`.
NSA_TABLE = (
    ("compress_pos_k", lambda N, K, H, h, block=COMPRESS_BLOCK, hidden=None: (block, K, H),
     "[l, K, H]", _init.zeros),
    ("compress_w1_k", lambda N, K, H, h, block=COMPRESS_BLOCK, hidden=None:
     (K, block * H, _e(H, hidden)), "[K, l·H, E]", param_tables.fan_in_normal),
    ("compress_w2_k", lambda N, K, H, h, block=COMPRESS_BLOCK, hidden=None: (K, _e(H, hidden), H),
     "[K, E, H]", param_tables.fan_in_normal),
    ("compress_pos_v", lambda N, K, H, h, block=COMPRESS_BLOCK, hidden=None: (block, K, h),
     "[l, K, h]", _init.zeros),
    ("compress_w1_v", lambda N, K, H, h, block=COMPRESS_BLOCK, hidden=None:
     (K, block * h, _e(h, hidden)), "[K, l·h, E]", param_tables.fan_in_normal),
    ("compress_w2_v", lambda N, K, H, h, block=COMPRESS_BLOCK, hidden=None: (K, _e(h, hidden), h),
     "[K, E, h]", param_tables.fan_in_normal),
)
NSA_SETTINGS = {"block": "compress_block", "hidden": "compress_hidden"}
NSA_PARAMS = param_tables.param_specs(NSA_TABLE, settings=NSA_SETTINGS)
# The per-token branch gates (g_cmp, g_slc, g_win) of each query head.
Gates = Float[Array, "B T N 3"]


def nsa_compress(x, pos, w1, w2, *, stride: int):
  """φ over every complete block of `l = pos.shape[0]` tokens at `stride`: `x [B, S, K, D]` →
  `[B, nc, K, D]` float32, nc = floor((S - l) / stride) + 1 (0 when S < l)."""
  B, S, K, D = x.shape
  block = pos.shape[0]
  nc = max(0, (S - block) // stride + 1)
  idx = np.arange(nc)[:, None] * stride + np.arange(block)[None]                # [nc, l]
  blocks = x.astype(jnp.float32)[:, idx] + pos.astype(jnp.float32)               # [B, nc, l, K, D]
  flat = jnp.moveaxis(blocks, 3, 2).reshape(B, nc, K, block * D)
  hidden = jax.nn.gelu(jnp.einsum("bckf,kfe->bcke", flat, w1.astype(jnp.float32)))
  return jnp.einsum("bcke,ked->bckd", hidden, w2.astype(jnp.float32))


def nsa_selection_weights(num_compressed: int, S: int, *, block: int, stride: int,
                          select_block: int) -> np.ndarray:
  """`[nc, nb]` float32: the overlap of compression block i (`[i·stride, i·stride + block)`) with
  selection block j (`[j·select_block, (j+1)·select_block)`), in units of `stride` (eq. 9)."""
  nb = sparse.num_blocks(S, select_block)
  start = np.arange(num_compressed)[:, None] * stride
  lo = np.maximum(start, np.arange(nb)[None] * select_block)
  hi = np.minimum(start + block, (np.arange(nb)[None] + 1) * select_block)
  return (np.maximum(hi - lo, 0) / stride).astype(np.float32)


def _banded(weights: np.ndarray):
  """The overlap weights `[nc, nb]` as R bands: per compressed block i its r-th overlapped selection
  block `cols [R, nc]` (non-decreasing in i) and weight `vals [R, nc]` (0 past its last)."""
  nc = weights.shape[0]
  R = max(1, int((weights > 0).sum(axis=1).max(initial=0)))
  cols = np.zeros((R, nc), np.int32)
  vals = np.zeros((R, nc), np.float32)
  for i in range(nc):
    nz = np.flatnonzero(weights[i])
    first = nz[0] if len(nz) else 0
    for r in range(R):
      j = min(first + r, weights.shape[1] - 1)
      cols[r, i], vals[r, i] = j, weights[i, j] if r < len(nz) else 0.0
  return cols, vals


def _onto_selection_blocks(p, weights: np.ndarray, *, block: int, stride: int, select_block: int):
  """Eq. 9: `p [..., nc]` → `[..., nb]`, Σ_i weights[i, j] p_i, in O(nc) work, not O(nc · nb).

  When d divides l and l', the overlap of compression block i with selection block j in units of d
  is the number of its l/d stride segments (u = i .. i + l/d - 1, each d keys) inside block j, so
  p_slc[j] = Σ_{u // (l'/d) = j} M_u with M_u = Σ_{i = u - l/d + 1 .. u} p_i: shifted sums and one
  reshape. Otherwise a sorted segment sum per band of the weights."""
  nc, nb = weights.shape
  if block % stride == 0 and select_block % stride == 0:
    span, per_block = block // stride, select_block // stride
    segments = nb * per_block            # segments past nb·l' start at or after S: no block reaches them
    width = max(segments, nc + span - 1)
    padded = jnp.pad(p, [(0, 0)] * (p.ndim - 1) + [(0, width - nc)])
    mass = sum(jnp.pad(padded, [(0, 0)] * (p.ndim - 1) + [(shift, 0)])[..., :width]
               for shift in range(span))
    return mass[..., :segments].reshape(p.shape[:-1] + (nb, per_block)).sum(axis=-1)
  cols, vals = _banded(weights)
  lead = jnp.moveaxis(p, -1, 0)                                                  # [nc, ...]
  out = 0.0
  for r in range(cols.shape[0]):
    scaled = lead * vals[r].reshape((-1,) + (1,) * (lead.ndim - 1))
    out = out + jax.ops.segment_sum(scaled, cols[r], num_segments=weights.shape[1],
                                    indices_are_sorted=True)
  return jnp.moveaxis(out, 0, -1)


def nsa_selection(p_cmp, *, S: int, K: int, block: int, compress_stride: int, select_block: int,
                  num_selected: int, causal: bool = False, q_offset=0, kv_lengths=None):
  """bool `[B, N, T, nb]`: the selection blocks each query attends to, from the compressed branch's
  probabilities `p_cmp [B, N, T, nc]`: scored by eq. 9 (overlap weights), summed over each group of
  N / K query heads (eq. 10, one selection per group), top `num_selected` among the candidates with
  the first block and the 2 local blocks (the query's own and the one before) always among them."""
  weights = nsa_selection_weights(p_cmp.shape[-1], S, block=block, stride=compress_stride,
                                  select_block=select_block)
  p_slc = _onto_selection_blocks(p_cmp, weights, block=block, stride=compress_stride,
                                 select_block=select_block)
  return _select(p_slc, S=S, K=K, select_block=select_block,
                 num_selected=num_selected, causal=causal, q_offset=q_offset,
                 kv_lengths=kv_lengths)


def _select(p_slc, *, S, K, select_block, num_selected, causal, q_offset, kv_lengths):
  """`nsa_selection` from the eq.-9 scores `p_slc [B, N, T, nb]`."""
  B, N, T, _ = p_slc.shape
  group = jnp.sum(p_slc.reshape(B, K, N // K, T, -1), axis=2, keepdims=True)
  p_slc = jnp.broadcast_to(group, (B, K, N // K) + group.shape[3:]).reshape(p_slc.shape)
  dims = dict(B=B, T=T, S=S, q_block=1, block_size=select_block)
  candidates = sparse.candidate_blocks(**dims, causal=causal, q_offset=q_offset, kv_lengths=kv_lengths)
  forced = (sparse.own_and_first(**dims, q_offset=q_offset, include=("own", "first"))
            | sparse.own_and_first(**dims, q_offset=jnp.asarray(q_offset) - select_block))
  # Forced blocks score +inf so that they count among the n, as in the paper.
  return sparse.top_k_blocks(jnp.where(forced, jnp.inf, p_slc), num_selected, candidates=candidates,
                             always=forced)


# Scores held at once by the compressed branch (one query chunk of every head): small enough to stay
# in cache, where the dense branch is compute- rather than memory-bound.
_CHUNK_SCORES = 1 << 19
# Causal query chunks are run in up to this many bands, each over the compressed blocks its last row
# can see: about (1 + 1/bands) / 2 of the dense [T, S/d] work (the paper's kernel skips the rest too).
_CAUSAL_BANDS = 8


def _compressed_branch(q, kc, vc, *, visible, scale, weights: np.ndarray, block: int, stride: int,
                       select_block: int, causal_offset: Optional[int]):
  """Dense softmax over the compressed tokens, by query chunks whose scores stay in cache (the
  backward recomputes them, as flash attention does): `(o [B, T, N, h] float32, p_slc [B, N, T, nb])`
  with p_slc the probabilities projected onto the selection blocks (eq. 9; no gradient: it only
  ranks). `causal_offset`: the offset of a causal call when it is static; each band of query chunks
  then reads only the compressed blocks that end by its last row (None: every chunk reads all)."""
  B, T, N, H = q.shape
  K, nc, h = kc.shape[2], kc.shape[1], vc.shape[-1]
  G, nb = N // K, weights.shape[1]
  rows = max(1, min(T, _CHUNK_SCORES // (B * N * max(nc, 1))))
  chunks = -(-T // rows)
  pad = chunks * rows - T
  qc = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, pad), (0, 0), (0, 0)))
  qc = jnp.moveaxis(qc.reshape(B, chunks, rows, K, G, H), 1, 0)
  vis = jnp.pad(jnp.broadcast_to(visible, (B, T, nc)), ((0, 0), (0, pad), (0, 0)))
  vis = jnp.moveaxis(vis.reshape(B, chunks, rows, nc), 1, 0)

  def band(qq, vv, seen: int):
    """Chunks `qq [c, B, rows, K, G, H]` over the first `seen` compressed blocks."""
    if seen == 0:  # no complete block visible: nothing to attend to (and no max over an empty axis)
      return (jnp.zeros(qq.shape[:-1] + (h,), jnp.float32),
              jnp.zeros((qq.shape[0], B, K, G, rows, nb), jnp.float32))
    kk, vals, w = kc[:, :seen], vc[:, :seen], weights[:seen]

    @jax.checkpoint
    def chunk(args):
      qq, vv = args                                                              # [B, rows, K, G, H]
      s = jnp.einsum("btkgh,bckh->bkgtc", qq, kk) * scale
      s = jnp.where(vv[:, None, None], s, -jnp.inf)
      m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
      e = jnp.where(vv[:, None, None], jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
      den = jnp.sum(e, axis=-1, keepdims=True)
      p = e / jnp.where(den > 0, den, 1.0)                                       # [B, K, G, rows, c]
      o = jnp.einsum("bkgtc,bckh->btkgh", p, vals)
      return o, _onto_selection_blocks(jax.lax.stop_gradient(p), w, block=block, stride=stride,
                                       select_block=select_block)

    return jax.lax.map(chunk, (qq, vv[..., :seen]))

  bands = 1 if causal_offset is None else min(chunks, _CAUSAL_BANDS)
  edges = np.linspace(0, chunks, bands + 1).round().astype(int)
  parts = []
  for lo, hi in zip(edges[:-1], edges[1:], strict=True):
    # Blocks i that end by the band's last query: i·d + l <= position + 1.
    seen = nc if causal_offset is None else int(
        np.clip((causal_offset + hi * rows - block) // stride + 1, 0, nc))
    parts.append(band(qc[lo:hi], vis[lo:hi], seen))
  o = jnp.concatenate([part[0] for part in parts])          # [chunks, B, rows, K, G, h]
  p_slc = jnp.concatenate([part[1] for part in parts])      # [chunks, B, K, G, rows, nb]
  o = jnp.moveaxis(o, 0, 1).reshape(B, chunks * rows, N, h)[:, :T]
  p_slc = jnp.moveaxis(p_slc, 0, 3).reshape(B, N, chunks * rows, nb)[:, :, :T]
  return o, p_slc


def native_sparse_attention(
    q: Query, k: Key, v: Value, *, gates: Gates, compress_pos_k: jax.Array,
    compress_w1_k: jax.Array, compress_w2_k: jax.Array, compress_pos_v: jax.Array,
    compress_w1_v: jax.Array, compress_w2_v: jax.Array, causal: bool = False, segment_ids=None,
    q_offset=0, kv_lengths: Optional[Lengths] = None, scale: Optional[float] = None,
    implementation: Optional[str] = None, compress_stride: int = 8, select_block: int = 32,
    num_selected: int = 6, window: int = 64, compress_block: Optional[int] = None,
    compress_hidden: Optional[int] = None) -> Output:
  """NSA (see the module docstring): gated sum of compressed, top-n selected and sliding-window
  attention. The compression block l and the MLP width are those of the learned arrays
  (`compress_block` / `compress_hidden`, when given, must agree: the layer sizes the arrays by them)."""
  op = "native_sparse_attention"
  B, T, S, N, K, H, h = checks.check_qkv(op, q, k, v)
  block = jnp.shape(compress_pos_k)[0] if jnp.ndim(compress_pos_k) == 3 else 0
  block = max(block, 1) if compress_block is None else compress_block
  params = dict(compress_pos_k=compress_pos_k, compress_w1_k=compress_w1_k,
                compress_w2_k=compress_w2_k, compress_pos_v=compress_pos_v,
                compress_w1_v=compress_w1_v, compress_w2_v=compress_w2_v)
  for rows, w2 in ((NSA_TABLE[:3], compress_w2_k), (NSA_TABLE[3:], compress_w2_v)):
    # The MLP width E: the setting, else read off W2 [K, E, D] (checked against W1 by the table).
    hidden = compress_hidden if compress_hidden is not None else (
        jnp.shape(w2)[1] if jnp.ndim(w2) == 3 else None)
    param_tables.check_table(op, rows, params, N=N, K=K, H=H, h=h, block=block, hidden=hidden)
  checks.check_shape(op, "gates", gates, (B, T, N, 3), "[B, T, N, 3]")
  for name, value in (("compress_stride", compress_stride), ("select_block", select_block),
                      ("num_selected", num_selected), ("window", window)):
    if not isinstance(value, int) or value < 1:
      raise ValueError(f"{op}: `{name}` must be a positive int, got {value!r}")
  if segment_ids is not None:
    raise ValueError(f"{op}: packed sequences (`segment_ids`) are not supported (NSA's blocks are "
                     "global positions); pass documents as separate rows")
  contract.check_self_attention(op, T=T, S=S, q_offset=q_offset, kv_lengths=kv_lengths)
  scale = H ** -0.5 if scale is None else scale
  length = contract.lengths_or_full(op, kv_lengths, B, S)
  pos = contract.query_positions(B, T, q_offset)                                 # [B, T]

  # Compressed branch: φ over complete blocks (unfilled cache slots zeroed first: they may be garbage).
  kc = nsa_compress(contract.zero_padded(k, kv_lengths), compress_pos_k, compress_w1_k, compress_w2_k,
                    stride=compress_stride)
  vc = nsa_compress(contract.zero_padded(v, kv_lengths), compress_pos_v, compress_w1_v, compress_w2_v,
                    stride=compress_stride)
  ends = jnp.arange(kc.shape[1]) * compress_stride + block                       # [nc]
  visible = ends[None, None, :] <= length[:, None, None]
  if causal:
    visible = visible & (ends[None, None, :] <= pos[..., None] + 1)
  weights = nsa_selection_weights(kc.shape[1], S, block=block, stride=compress_stride,
                                  select_block=select_block)
  static = not isinstance(q_offset, jax.core.Tracer) and np.ndim(q_offset) == 0
  o_cmp, p_slc = _compressed_branch(
      q, kc, vc, visible=visible, scale=scale, weights=weights, block=block,
      stride=compress_stride, select_block=select_block,
      causal_offset=int(q_offset) if causal and static else None)

  # Selected branch: eq. 9 onto selection blocks (above), eq. 10 summed over each GQA group, top n.
  selected = _select(p_slc, S=S, K=K, select_block=select_block, num_selected=num_selected,
                     causal=causal, q_offset=q_offset, kv_lengths=length)
  o_slc = sparse.attend_selected(op, q, k, v, selected, q_block=1, block_size=select_block,
                                 causal=causal, q_offset=q_offset, kv_lengths=kv_lengths,
                                 scale=scale, implementation=implementation, per_query=num_selected)

  # Sliding window branch.
  o_win = contract.flex_with_contract(
      op, q, k, v, causal=causal, segment_ids=None, q_offset=q_offset, kv_lengths=kv_lengths,
      scale=scale, implementation=None if implementation == sparse.GATHERED else implementation,
      mask_mod=masks.sliding_window(window - 1, 0 if causal else window - 1, offset=q_offset))

  g = gates.astype(jnp.float32)
  out = (g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc.astype(jnp.float32)
         + g[..., 2:3] * o_win.astype(jnp.float32))
  return out.astype(q.dtype)


register(Mechanism(
    name="native_sparse_attention", fn=native_sparse_attention, family="sparse-trainable",
    seeds=(156,),
    paper="Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention",
    arxiv="2502.11089", patterns=frozenset({"self", "causal_self"}), packed=False,
    complexity="O(T·(S/d + n·l' + w))", params=NSA_PARAMS,
    implementations=(sparse.GATHERED, "xla", "reference"),
    token_inputs=(TokenInput("gates", side="q", shape=lambda N, K, H: (N, 3),
                             activation=jax.nn.sigmoid),),
    defaults=dict(compress_stride=8, select_block=32, num_selected=6, window=64),
    example=lambda *, N, K, H, h: dict(
        example_params(param_tables.param_specs(NSA_TABLE, h=h, settings=NSA_SETTINGS), N=N, K=K,
                       H=H, perturb=0.5, settings=dict(compress_block=4)),
        compress_stride=2, select_block=4, num_selected=4, window=4)))
