"""Decode attention kernels (Pallas, lowered through Triton): split-K over a contiguous or a paged KV
cache, with an exact log-sum-exp merge of the partial states.

During decoding the queries are a handful of tokens (T = 1, or a short speculative block), so the
parallelism has to come from the key axis (FlashDecoding; Lean Attention). The kernel grid is
`(B, K, num_splits)`: program (b, κ, c) takes the G = N / K query heads that share kv head κ, all T
of them together as one `[T·G, H]` tile (GQA without repeating K/V: one key tile load serves the
whole group), walks key chunk c tile by tile with the online softmax, and writes the chunk's partial
state

    m_c = max_j s_j,   l_c = Σ_{j∈c} e^{s_j - m_c},   o_c = Σ_{j∈c} e^{s_j - m_c} v_j / l_c,
    lse_c = m_c + log l_c          (s_j = scale · q·k_j over the visible keys j of chunk c).

`attnjax.core.merge.merge_attention_states` then combines the chunks exactly,

    lse = log Σ_c e^{lse_c},       o = Σ_c e^{lse_c - lse} o_c,

which equals softmax(s) v over all visible keys. A chunk with no visible key has lse_c = -inf and
contributes nothing; a query row with no visible key at all gives zeros, never NaN.

Visibility: key j of row b is visible to query t when j < kv_lengths[b] and, with `causal`,
j <= q_offset[b] + t. A program stops at the last tile that holds a visible key, so the work per
row follows its own length (ragged batches).

The paged form reads key j of row b from `k_pages[page_table[b, j // page_size], j % page_size]`
inside the kernel (the gather is the tile load itself; nothing outside the kernel copies the
cache), so a tile may span several pages and any page size works (FlashInfer's paged / ragged KV).

Each operator has an implementation table: `"pallas_triton"` (the kernel; listed for "gpu", and run
in Pallas' interpret mode when named on a CPU) and `"reference"` (gather pages, dense masked softmax in
float32). The kernel computes the forward only; its VJP is the reference's (recomputed densely:
decode is inference, but `jax.grad` through it works). It raises `NotImplementedError` (automatic
dispatch then takes the reference) under forward-mode autodiff and for more than `MAX_QUERY_ROWS`
query rows per kv head (T·G: its query tile is one block); a traced `scale` is folded into q. Dots
take the inputs' dtype (bf16 queries read a float32 cache as bf16) and accumulate in float32; float32
dots may run in TF32 on the GPU.

Papers: Sanovar et al., "Lean Attention: Hardware-Aware Scalable Attention Mechanism for the
Decode-Phase of Transformers", arXiv:2405.10480; Ye et al., "FlashInfer: Efficient and Customizable
Attention Engine for LLM Inference Serving", arXiv:2501.01005; Dao et al., "Flash-Decoding for
long-context inference" (2023).
"""

from __future__ import annotations

import functools
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attnjax.core import checks
from attnjax.core import implementations
from attnjax.core.implementations import dispatch
from attnjax.core.merge import merge_attention_states
from attnjax.kernels import platform
from attnjax.typing import (Key, KeyPages, Lengths, Output, PageTable, Query,
                            Value, ValuePages)

__all__ = ["decode_attention", "paged_decode_attention", "reference_decode_attention",
           "reference_paged_decode_attention", "KERNEL", "DEFAULT_SPLIT_SIZE"]

KERNEL = "decode_triton"
# Keys per split when `num_splits` is not given (the same default as `core.kvcache`).
DEFAULT_SPLIT_SIZE = 512
# Most query rows (T·G: query steps times the heads sharing a kv head) the kernel holds in one tile.
MAX_QUERY_ROWS = 128

# The first query's position: one for all rows, or one per row.
QOffset = Union[int, Lengths]


def _pow2(n: int) -> int:
  """The smallest power of two >= max(n, 16): Triton dots need power-of-two tiles of at least 16."""
  return max(16, 1 << (max(n, 1) - 1).bit_length())


def _split_partials(lens_ref, offs_ref, q_ref, o_ref, lse_ref, *, load_kv, scale, causal, T, G,
                    block_k, split_len):
  """One program: the partial (o, lse) of one (row, kv head, key chunk); `load_kv(pos, valid)` gives
  the `[block_k, Hp]` key and `[block_k, hp]` value tiles (zeros where not `valid`)."""
  b, c = pl.program_id(0), pl.program_id(2)
  kv_len, offset = lens_ref[b], offs_ref[b]
  lo = c * split_len
  hi = jnp.minimum(lo + split_len, kv_len)
  if causal:
    # The last query (position offset + T - 1) sees no key past itself: later tiles are skipped.
    hi = jnp.minimum(hi, offset + T)
  # Dynamic trip count: an empty chunk (short row) costs nothing but its (zero, -inf) store.
  num_tiles = jnp.maximum((hi - lo + block_k - 1) // block_k, 0)
  q = q_ref[...]
  rows, hp = o_ref.shape
  # Rows are (t, g) t-major: row r holds query t = r // G of head g = r % G of this kv head.
  q_pos = offset + jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 0) // G

  def body(i, carry):
    acc, m, l = carry
    pos = lo + i * block_k + jnp.arange(block_k, dtype=jnp.int32)
    valid = pos < hi
    k, v = load_kv(pos, valid)
    # A dot takes one input dtype (a cache may be stored narrower than the queries).
    s = plgpu.dot(q, k.astype(q.dtype), trans_b=True).astype(jnp.float32) * scale
    visible = valid[None, :]
    if causal:
      visible = visible & (pos[None, :] <= q_pos)
    s = jnp.where(visible, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    # A row that has seen no visible key yet keeps m = -inf; shifting by 0 then gives exp(-inf) = 0
    # instead of exp(-inf - -inf) = NaN.
    m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    alpha = jnp.exp(m - m_safe)
    p = jnp.exp(s - m_safe[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v).astype(jnp.float32)
    return acc, m_new, l

  init = (jnp.zeros((rows, hp), jnp.float32), jnp.full((rows,), -jnp.inf, jnp.float32),
          jnp.zeros((rows,), jnp.float32))
  acc, m, l = jax.lax.fori_loop(0, num_tiles, body, init)
  empty = l == 0.0
  o_ref[...] = acc / jnp.where(empty, 1.0, l)[:, None]
  lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log(jnp.where(empty, 1.0, l)))


def _tile_loader(k_ref, v_ref, H, h, Hp, hp, page_ref=None, page_size=None):
  """`load_kv(pos, valid)` for a contiguous `[S, H]` ref or, with `page_ref`, a paged `[P, page_size,
  H]` ref read through the row's page table. Loads are masked: no address past a row's visible keys,
  its page-table entries or the head dim is touched (unused table entries may hold anything)."""
  dk, dv = jnp.arange(Hp, dtype=jnp.int32), jnp.arange(hp, dtype=jnp.int32)

  def load_kv(pos, valid):
    if page_ref is None:
      index = (pos[:, None],)
    else:
      pages = plgpu.load(page_ref.at[pos // page_size], mask=valid, other=0)
      index = (pages[:, None], (pos % page_size)[:, None])
    k = plgpu.load(k_ref.at[(*index, dk[None, :])], mask=valid[:, None] & (dk < H)[None, :], other=0)
    v = plgpu.load(v_ref.at[(*index, dv[None, :])], mask=valid[:, None] & (dv < h)[None, :], other=0)
    return k, v

  return load_kv


def _prepare(op, q, S_total, kv_lengths, q_offset, num_splits, block_k, K):
  """Shared set-up: the query tile `[B, K, M, Hp]` (M = T·G rows padded to a power of two), clamped
  lengths and offsets `[B]`, and the static split geometry."""
  B, T, N, H = q.shape
  G = N // K
  if kv_lengths is None:
    kv_lengths = jnp.full((B,), S_total, jnp.int32)
  if num_splits is None:
    num_splits = -(-S_total // DEFAULT_SPLIT_SIZE)
  rows, Hp = _pow2(T * G), _pow2(H)
  tiles = platform.block_sizes(KERNEL, head_dim=H, dtype=q.dtype)
  chunk = -(-S_total // num_splits)
  # A tile longer than a chunk would only load masked keys.
  block_k = min(block_k or tiles["block_k"], _pow2(chunk))
  # Chunks are whole tiles; rounding up may leave fewer (never more) chunks than asked for.
  split_len = block_k * -(-chunk // block_k)
  splits = -(-S_total // split_len)
  qt = q.reshape(B, T, K, G, H).transpose(0, 2, 1, 3, 4).reshape(B, K, T * G, H)
  qt = jnp.pad(qt, ((0, 0), (0, 0), (0, rows - T * G), (0, Hp - H)))
  lens = jnp.clip(jnp.asarray(kv_lengths, jnp.int32), 0, S_total)
  offs = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (B,))
  geometry = dict(T=T, G=G, block_k=block_k, split_len=split_len)
  return qt, lens, offs, splits, geometry, tiles


def _run(q, qt, lens, offs, kv_args, kv_specs, *, splits, geometry, tiles, K, h, scale, causal,
         loader):
  """The `pallas_call` over the grid (B, K, splits) and the merge of its partials."""
  B, T, N, H = q.shape
  rows, Hp = qt.shape[2:]
  hp = _pow2(h)
  kernel = functools.partial(_kernel, n_kv=len(kv_args), loader=loader, scale=scale, causal=causal,
                             **geometry)
  vector = pl.BlockSpec((B,), lambda b, j, c: (0,))

  def call(qt, lens, offs, *kv_args, interpret):
    return pl.pallas_call(
        kernel, grid=(B, K, splits),
        in_specs=[vector, vector, pl.BlockSpec((None, None, rows, Hp), lambda b, j, c: (b, j, 0, 0)),
                  *kv_specs],
        out_specs=[pl.BlockSpec((None, None, None, rows, hp), lambda b, j, c: (c, b, j, 0, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda b, j, c: (c, b, j, 0))],
        out_shape=[jax.ShapeDtypeStruct((splits, B, K, rows, hp), jnp.float32),
                   jax.ShapeDtypeStruct((splits, B, K, rows), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=tiles["num_warps"],
                                             num_stages=tiles["num_stages"]),
        interpret=interpret, name=KERNEL)(lens, offs, qt, *kv_args)

  o_parts, lse_parts = platform.on_platform(call, qt, lens, offs, *kv_args)
  out = merge_attention_states(o_parts, lse_parts)[0][:, :, :T * geometry["G"], :h]
  return out.reshape(B, K, T, -1, h).transpose(0, 2, 1, 3, 4).reshape(B, T, N, h).astype(q.dtype)


def _kernel(lens_ref, offs_ref, q_ref, *refs, n_kv, loader, **kw):
  kv_refs, (o_ref, lse_ref) = refs[:n_kv], refs[n_kv:]
  _split_partials(lens_ref, offs_ref, q_ref, o_ref, lse_ref, load_kv=loader(*kv_refs), **kw)


def _rows_and_scale(op, q, K, scale):
  """Raises NotImplementedError for what the kernel does not serve (forward-mode autodiff; more than
  MAX_QUERY_ROWS query rows per kv head); folds a traced `scale` into q (the kernel's is static)."""
  if implementations.under_forward_mode(q):
    raise NotImplementedError(f"{op}: pallas_triton differentiates in reverse mode only (a custom "
                              "VJP); for forward-mode autodiff use implementation='reference'")
  rows = q.shape[1] * (q.shape[2] // K)
  if rows > MAX_QUERY_ROWS:
    raise NotImplementedError(f"{op}: pallas_triton holds the T·G = {rows} query rows of a kv head in "
                              f"one tile (at most {MAX_QUERY_ROWS}); use flex attention for prefill")
  if isinstance(scale, (int, float, np.floating)):
    return q, float(scale)
  return q * jnp.asarray(scale, q.dtype), 1.0


def _lengths_and_offsets(B, S, kv_lengths, q_offset):
  lens = jnp.full((B,), S, jnp.int32) if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
  return lens, jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (B,))


def _pallas_decode(q, k, v, *, kv_lengths, q_offset, causal, scale, num_splits, block_k):
  q, scale = _rows_and_scale("decode_attention", q, k.shape[2], scale)
  lens, offs = _lengths_and_offsets(q.shape[0], k.shape[1], kv_lengths, q_offset)
  return _decode_call((causal, scale, num_splits, block_k), q, k, v, lens, offs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decode_call(settings, q, k, v, lens, offs):
  causal, scale, num_splits, block_k = settings
  B, S, K, H = k.shape
  h = v.shape[3]
  qt, lens, offs, splits, geometry, tiles = _prepare("decode_attention", q, S, lens, offs,
                                                     num_splits, block_k, K)
  # Whole `[S, H]` slab of one (row, kv head): the kernel reads only the tiles it needs from it.
  kv_specs = [pl.BlockSpec((None, S, None, d), lambda b, j, c: (b, 0, j, 0)) for d in (H, h)]
  loader = lambda k_ref, v_ref: _tile_loader(k_ref, v_ref, H, h, qt.shape[3], _pow2(h))
  return _run(q, qt, lens, offs, (k, v), kv_specs, splits=splits, geometry=geometry, tiles=tiles, K=K,
              h=h, scale=scale, causal=causal, loader=loader)


def _pallas_paged(q, k_pages, v_pages, page_table, *, kv_lengths, q_offset, causal, scale, num_splits,
                  block_k):
  q, scale = _rows_and_scale("paged_decode_attention", q, k_pages.shape[2], scale)
  lens, offs = _lengths_and_offsets(q.shape[0], page_table.shape[1] * k_pages.shape[1], kv_lengths,
                                    q_offset)
  return _paged_call((causal, scale, num_splits, block_k), q, k_pages, v_pages,
                     page_table.astype(jnp.int32), lens, offs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _paged_call(settings, q, k_pages, v_pages, page_table, lens, offs):
  causal, scale, num_splits, block_k = settings
  P, page_size, K, H = k_pages.shape
  h = v_pages.shape[3]
  max_pages = page_table.shape[1]
  qt, lens, offs, splits, geometry, tiles = _prepare("paged_decode_attention", q, max_pages * page_size,
                                                     lens, offs, num_splits, block_k, K)
  kv_specs = [pl.BlockSpec((None, max_pages), lambda b, j, c: (b, 0))]
  kv_specs += [pl.BlockSpec((P, page_size, None, d), lambda b, j, c: (0, 0, j, 0)) for d in (H, h)]
  loader = lambda t_ref, k_ref, v_ref: _tile_loader(k_ref, v_ref, H, h, qt.shape[3], _pow2(h),
                                                    page_ref=t_ref, page_size=page_size)
  return _run(q, qt, lens, offs, (page_table, k_pages, v_pages), kv_specs,
              splits=splits, geometry=geometry, tiles=tiles, K=K, h=h, scale=scale, causal=causal,
              loader=loader)


# The kernels compute the forward only (a Pallas call has no derivative rule): their VJPs are the
# dense references' (recomputed in float32 in the backward), so jax.grad through decode works.
def _decode_vjp_fwd(settings, q, k, v, lens, offs):
  return _decode_call(settings, q, k, v, lens, offs), (q, k, v, lens, offs)


def _decode_vjp_bwd(settings, res, ct):
  q, k, v, lens, offs = res
  causal, scale = settings[:2]
  _, vjp = jax.vjp(lambda q, k, v: reference_decode_attention(
      q, k, v, kv_lengths=lens, q_offset=offs, causal=causal, scale=scale), q, k, v)
  return vjp(ct) + (None, None)


def _paged_vjp_fwd(settings, q, k_pages, v_pages, page_table, lens, offs):
  return (_paged_call(settings, q, k_pages, v_pages, page_table, lens, offs),
          (q, k_pages, v_pages, page_table, lens, offs))


def _paged_vjp_bwd(settings, res, ct):
  q, k_pages, v_pages, page_table, lens, offs = res
  causal, scale = settings[:2]
  _, vjp = jax.vjp(lambda q, k, v: reference_paged_decode_attention(
      q, k, v, page_table, kv_lengths=lens, q_offset=offs, causal=causal, scale=scale),
      q, k_pages, v_pages)
  return vjp(ct) + (None, None, None)


_decode_call.defvjp(_decode_vjp_fwd, _decode_vjp_bwd)
_paged_call.defvjp(_paged_vjp_fwd, _paged_vjp_bwd)


def reference_decode_attention(q: Query, k: Key, v: Value, *, kv_lengths: Optional[Lengths] = None,
                               q_offset: QOffset = 0, causal: bool = False,
                               scale: Optional[float] = None, **unused) -> Output:
  """Dense masked softmax attention in float32 (the contract of `decode_attention`; split and tile
  settings in `unused` are ignored)."""
  del unused
  B, T, N, H = q.shape
  S, K = k.shape[1], k.shape[2]
  G = N // K
  lens = jnp.full((B,), S, jnp.int32) if kv_lengths is None else jnp.asarray(kv_lengths, jnp.int32)
  pos = jnp.arange(S, dtype=jnp.int32)
  visible = jnp.broadcast_to((pos[None, :] < lens[:, None])[:, None, :], (B, T, S))
  if causal:
    q_pos = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (B,))[:, None] + jnp.arange(T)
    visible = visible & (pos[None, None, :] <= q_pos[:, :, None])
  # Hidden slots are zeroed before use: an unfilled cache or an unused page may hold anything.
  kf = jnp.where((pos[None, :] < lens[:, None])[:, :, None, None], k.astype(jnp.float32), 0.0)
  vf = jnp.where((pos[None, :] < lens[:, None])[:, :, None, None], v.astype(jnp.float32), 0.0)
  qf = q.astype(jnp.float32).reshape(B, T, K, G, H)
  s = jnp.einsum("btkgd,bskd->bkgts", qf, kf) * (H ** -0.5 if scale is None else scale)
  s = jnp.where(visible[:, None, None], s, -jnp.inf)
  m = jnp.max(s, axis=-1, keepdims=True)
  w = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
  den = jnp.sum(w, axis=-1, keepdims=True)
  w = w / jnp.where(den == 0, 1.0, den)
  return jnp.einsum("bkgts,bskd->btkgd", w, vf).reshape(B, T, N, -1).astype(q.dtype)


def reference_paged_decode_attention(q: Query, k_pages: KeyPages, v_pages: ValuePages,
                                     page_table: PageTable, **kw) -> Output:
  """Gathers each row's pages into a contiguous `[B, max_pages·page_size, K, ·]` cache, then
  `reference_decode_attention` (out-of-range table entries are clipped; their keys are hidden)."""
  B, max_pages = page_table.shape
  gather = lambda x: jnp.take(x, page_table, axis=0, mode="clip").reshape(
      B, max_pages * x.shape[1], *x.shape[2:])
  return reference_decode_attention(q, gather(k_pages), gather(v_pages), **kw)


_DECODE_IMPLEMENTATIONS = (
    ("pallas_triton", _pallas_decode, ("gpu",)),
    ("reference", reference_decode_attention, ()),
)
_PAGED_IMPLEMENTATIONS = (
    ("pallas_triton", _pallas_paged, ("gpu",)),
    ("reference", reference_paged_decode_attention, ()),
)


def _check_settings(op, q, kv_lengths, q_offset, num_splits, block_k):
  """Raises on a bad `kv_lengths` ([B]), `q_offset` (int or [B]), `num_splits` or `block_k`."""
  B = q.shape[0]
  if kv_lengths is not None:
    checks.check_shape(op, "kv_lengths", kv_lengths, (B,), "[B]")
  if jnp.ndim(q_offset) not in (0, 1) or (jnp.ndim(q_offset) == 1 and jnp.shape(q_offset) != (B,)):
    raise ValueError(f"{op}: `q_offset` must be an int or have shape [B] = [{B}], "
                     f"got shape {jnp.shape(q_offset)}")
  if num_splits is not None and num_splits < 1:
    raise ValueError(f"{op}: `num_splits` must be >= 1, got {num_splits}")
  if block_k is not None and (block_k < 16 or block_k & (block_k - 1)):
    raise ValueError(f"{op}: `block_k` must be a power of two >= 16, got {block_k}")


def decode_attention(q: Query, k: Key, v: Value, *, kv_lengths: Optional[Lengths] = None,
                     q_offset: QOffset = 0, causal: bool = False, scale: Optional[float] = None,
                     num_splits: Optional[int] = None, block_k: Optional[int] = None,
                     implementation: Optional[str] = None) -> Output:
  """Split-K decode attention over a contiguous KV cache (FlashDecoding / Lean Attention).

  Program (b, κ, c) of the grid (B, K, num_splits) computes the partial state (o_c, lse_c) of the G
  query heads of kv head κ over key chunk c; `merge_attention_states` combines the chunks:
  lse = log Σ_c e^{lse_c}, o = Σ_c e^{lse_c - lse} o_c = softmax(scale · q kᵀ) v over the visible keys.

  Args:
    q: `[B, T, N, H]` (T small: one decode step or a short speculative block).
    k: `[B, S, K, H]`; v: `[B, S, K, h]`, K dividing N (query head n uses kv head n // (N / K)).
    kv_lengths: `[B]`; keys at or past the length are hidden (default: all S).
    q_offset: int or `[B]`, the position of the first query (for `causal`).
    causal: hide key j from query t when j > q_offset + t.
    scale: defaults to `H ** -0.5`.
    num_splits: key chunks per row (default ceil(S / 512)); chunks are whole tiles of `block_k`
      keys, so fewer chunks than asked may be used.
    block_k: keys per tile (a power of two >= 16; default from `platform.block_sizes`).
    implementation: "pallas_triton" (the kernel; interpret mode on a CPU) or "reference"; None picks
      the kernel on a GPU, the reference elsewhere.

  Returns:
    `[B, T, N, h]` in q's dtype; a query with no visible key gives zeros.
  """
  checks.check_qkv("decode_attention", q, k, v)
  _check_settings("decode_attention", q, kv_lengths, q_offset, num_splits, block_k)
  return dispatch("decode_attention", _DECODE_IMPLEMENTATIONS, implementation, q, k, v,
                  kv_lengths=kv_lengths, q_offset=q_offset, causal=causal,
                  scale=q.shape[-1] ** -0.5 if scale is None else scale, num_splits=num_splits,
                  block_k=block_k)


def paged_decode_attention(q: Query, k_pages: KeyPages, v_pages: ValuePages, page_table: PageTable,
                           kv_lengths: Lengths, *, q_offset: QOffset = 0, causal: bool = False,
                           scale: Optional[float] = None, num_splits: Optional[int] = None,
                           block_k: Optional[int] = None,
                           implementation: Optional[str] = None) -> Output:
  """`decode_attention` over a paged KV cache (FlashInfer's page-table layout).

  Key j of row b lives at `k_pages[page_table[b, j // page_size], j % page_size]` (likewise the
  value); the kernel reads it there, tile by tile, so only the visible keys of each row are read and
  the pool is never gathered. Split, merge and masking as in `decode_attention`, with
  S = max_pages · page_size.

  Args:
    q: `[B, T, N, H]`.
    k_pages: `[P, page_size, K, H]`; v_pages: `[P, page_size, K, h]` (a pool shared by all rows).
    page_table: `[B, max_pages]` int; entries past a row's `ceil(kv_lengths[b] / page_size)` pages
      are never read.
    kv_lengths: `[B]` keys filled per row.
    q_offset, causal, scale, num_splits, block_k, implementation: as in `decode_attention`.

  Returns:
    `[B, T, N, h]` in q's dtype.
  """
  op = "paged_decode_attention"
  if jnp.ndim(k_pages) != 4 or jnp.ndim(v_pages) != 4 or jnp.ndim(page_table) != 2:
    raise ValueError(f"{op}: expected k_pages [P, page_size, K, H], v_pages [P, page_size, K, h], "
                     f"page_table [B, max_pages]; got {jnp.shape(k_pages)}, {jnp.shape(v_pages)}, "
                     f"{jnp.shape(page_table)}")
  if not jnp.issubdtype(page_table.dtype, jnp.integer):
    raise TypeError(f"{op}: `page_table` must be integer, got {page_table.dtype}")
  B = q.shape[0]
  checks.check_shape(op, "page_table", page_table, (B, None), "[B, max_pages]")
  # The pool as a one-row cache: check_qkv checks heads, head dims and the q/k/v agreement.
  flat = lambda x: x.reshape(1, -1, *x.shape[2:])
  checks.check_qkv(op, q[:1], flat(k_pages), flat(v_pages))
  _check_settings(op, q, kv_lengths, q_offset, num_splits, block_k)
  return dispatch(op, _PAGED_IMPLEMENTATIONS, implementation, q, k_pages, v_pages, page_table,
                  kv_lengths=kv_lengths, q_offset=q_offset, causal=causal,
                  scale=q.shape[-1] ** -0.5 if scale is None else scale, num_splits=num_splits,
                  block_k=block_k)
