"""Attention over a paged KV cache, and cascade attention over a prefix shared by every row.

The cache is a pool of fixed-size pages shared by the rows of a batch, a page table per row and a
length per row (FlashInfer's / vLLM's layout; `attnjax.core.paged_kvcache.PagedKVCache` manages it):

    k_pages [P, page_size, K, H]   v_pages [P, page_size, K, h]   page_table [B, max_pages] int
    kv_lengths [B]                 key j of row b:  k_pages[page_table[b, j // page_size], j % page_size]

Query t of row b (absolute position p = q_offset[b] + t) sees key j when j < kv_lengths[b] and, with
`causal`, j <= p:

    o_bt = Σ_{j visible} e^{s_j} v_j / Σ_{j visible} e^{s_j},    s_j = scale · q_bt · k_bj.

Table entries past a row's pages may hold anything (-1, 0, a freed page): they are never read unmasked
(hidden slots are zeroed after the gather, so NaN or garbage in unused pages cannot reach the output).

Split-K over page groups (`xla`): the table is cut into groups of `pages_per_split` pages; group c is
gathered for every row (`[B, pages_per_split · page_size, K, H]`: the page table read as block
indices, never the whole row at once), flex attention gives its partial state (o_c, lse_c) under the
length / causal mask in global key positions, and the groups merge exactly:

    lse = log Σ_c e^{lse_c},        o = Σ_c e^{lse_c - lse} o_c.

The groups run one after another (`lax.scan` carrying the merged state in float32, each group
rematerialized in the backward), so memory holds one group (on a 2-core CPU at B = 8, 4096 keys, a
`vmap` over the groups was slower, 12.6 against 10.2 ms, and took 9x the temporary memory); a
group that starts past every row's last visible key is skipped and one that every query sees whole
takes no mask (`lax.switch`), so the work follows the longest row, not the table's width.

Cascade attention (FlashInfer's shared-prefix form): when every row starts with the same Sp prefix
tokens (a system prompt, a few-shot context), the prefix is attended once for all B·T queries stacked
as rows of one batch row, `[1, B·T·G, K, H]` (the G = N / K query heads of a kv head as rows too,
`core.gqa_rows`) against `[1, Sp, K, H]` (one large matmul that reads the prefix once instead of B·G
times), giving (o_p, lse_p); each row's own suffix pages give (o_s, lse_s); the merge
above combines them. Every query follows the prefix, so the whole prefix is visible to it.

Implementations (`core.implementations.dispatch`): `pallas_triton` (the split-K paged decode kernel,
`attnjax.kernels.decode_triton.paged_decode_attention`, GPU only; it raises NotImplementedError for a
query block of more than its T·G rows per kv head, under forward-mode autodiff and when residuals are
asked for, and the next entry serves), `cpu_flash` (the fused CPU kernel reading the pages in place,
`attnjax.kernels.cpu.paged`, gradients by `xla`), `xla` (split-K above, on flex attention's default
path for the platform) and `reference` (each row gathered whole, dense masked softmax in float32).

Paper: Ye et al., "FlashInfer: Efficient and Customizable Attention Engine for LLM Inference
Serving", arXiv:2501.01005 (paged / ragged KV, cascade inference); the split-K merge is Lean
Attention's (Sanovar et al., arXiv:2405.10480).
"""

from __future__ import annotations

from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from attnjax import catalog
from attnjax.core import checks
from attnjax.core import flex
from attnjax.core import gqa_rows
from attnjax.core import masks
from attnjax.core.implementations import dispatch
from attnjax.core.merge import merge_attention_states
from attnjax.typing import (Array, Float, KeyPages, Lengths, LogSumExp, Output, PageTable,
                            Query, ValuePages)

__all__ = ["paged_attention", "cascade_attention", "DEFAULT_SPLIT_TOKENS", "KeyPages", "ValuePages",
           "PageTable", "PrefixKey", "PrefixValue"]

# Keys per split when `pages_per_split` is not given (rounded to whole pages).
DEFAULT_SPLIT_TOKENS = 512

# A prefix shared by all rows (cascade attention).
PrefixKey = Float[Array, "Sp K H"]
PrefixValue = Float[Array, "Sp K h"]
# The first query's position: one for all rows, or one per row.
QOffset = Union[int, Lengths]

_PAGED = "paged_attention"
_CASCADE = "cascade_attention"


# --------------------------------------------------------------------------------------------------
# Paged attention


@catalog.serves(194, kind="kernel", name="attnjax.core.paged_attention.paged_attention")
def paged_attention(q: Query, k_pages: KeyPages, v_pages: ValuePages, page_table: PageTable,
                    kv_lengths: Lengths, *, q_offset: QOffset = 0, causal: bool = True,
                    scale: Optional[float] = None, pages_per_split: Optional[int] = None,
                    return_residuals: bool = False, implementation: Optional[str] = None
                    ) -> Union[Output, tuple[Output, LogSumExp]]:
  """Softmax attention of each row's queries over the row's pages (see the module docstring).

  Args:
    q: `[B, T, N, H]` (decode: T = 1; prefill: the T tokens just appended, `q_offset = kv_lengths - T`).
    k_pages: `[P, page_size, K, H]`; v_pages: `[P, page_size, K, h]`, K dividing N (query head n
      reads kv head n // (N / K)).
    page_table: `[B, max_pages]` integer; entries past a row's `ceil(kv_lengths[b] / page_size)`
      pages are never read unmasked.
    kv_lengths: `[B]` integer, keys filled per row (clipped to `[0, max_pages · page_size]`).
    q_offset: int or `[B]`, the absolute position of the first query (for `causal`).
    causal: hide key j from query t when j > q_offset + t.
    scale: defaults to `H ** -0.5`.
    pages_per_split: pages per split-K group (`xla`; `pallas_triton` takes the same number of
      splits); default `DEFAULT_SPLIT_TOKENS` keys rounded to whole pages. `max_pages`: one group.
    return_residuals: also return `lse [B, T, N]` float32 (for merging with other key sets).
    implementation: "pallas_triton" (GPU), "cpu_flash" (CPU), "xla" or "reference"; None takes the
      first that serves.

  Returns:
    `[B, T, N, h]` in q's dtype (a query with no visible key gives zeros), and `lse` when
    `return_residuals`.

  Raises:
    ValueError: naming `paged_attention` and the argument, for arrays of the wrong rank, shape or
      dtype (`page_table` and `kv_lengths` must be integer), or `pages_per_split < 1`.
  """
  checks.check_paged(_PAGED, q, k_pages, v_pages, page_table, kv_lengths, q_offset, pages_per_split)
  B = q.shape[0]
  ps, max_pages = k_pages.shape[1], page_table.shape[1]
  lens = jnp.clip(jnp.asarray(kv_lengths, jnp.int32), 0, max_pages * ps)
  offs = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (B,))
  out, lse = dispatch(_PAGED, _IMPLEMENTATIONS, implementation, q, k_pages, v_pages,
                      jnp.asarray(page_table, jnp.int32), lens, offs, causal=causal,
                      scale=q.shape[-1] ** -0.5 if scale is None else scale,
                      pages_per_split=pages_per_split, return_residuals=return_residuals)
  return (out, lse) if return_residuals else out


def _visible(lens, offs, causal):
  """mask_mod in global key positions: j < kv_lengths[b], and j <= q_offset[b] + t when causal."""
  padding = masks.padding(kv_lengths=lens)
  return masks.and_masks(padding, masks.causal(offs)) if causal else padding


def _gather(pages, table, start=None, lens=None):
  """Keys (or values) of the pages `table [B, n]` as rows `[B, n · page_size, K, ·]`. With `lens`,
  slots at or past a row's length (positions counted from `start`) are zeroed: unused pages may hold
  anything, even NaN, and a zero weight times NaN is NaN."""
  B, n = table.shape
  ps = pages.shape[1]
  rows = jnp.take(pages, table, axis=0, mode="clip").reshape(B, n * ps, *pages.shape[2:])
  if lens is None:
    return rows
  pos = start + jnp.arange(n * ps, dtype=jnp.int32)
  return jnp.where((pos[None, :] < lens[:, None])[:, :, None, None], rows, 0)


def _pages_per_split(pages_per_split, page_size, max_pages):
  if pages_per_split is None:
    pages_per_split = max(1, DEFAULT_SPLIT_TOKENS // page_size)
  return min(int(pages_per_split), max_pages)


def _xla(q, k_pages, v_pages, table, lens, offs, *, causal, scale, pages_per_split,
         return_residuals):
  """Split-K over groups of pages, one group at a time, merged by log-sum-exp (module docstring)."""
  del return_residuals                      # the merge gives lse anyway
  B, T, N, _ = q.shape
  ps, max_pages = k_pages.shape[1], table.shape[1]
  pps = _pages_per_split(pages_per_split, ps, max_pages)
  splits = -(-max_pages // pps)
  visible = _visible(lens, offs, causal)

  def one_split(start, group, masked=True):
    if not masked:                        # every slot visible to every query of every row
      return flex.flex_attention(q, _gather(k_pages, group), _gather(v_pages, group), scale=scale,
                                 return_residuals=True)
    k = _gather(k_pages, group, start, lens)
    v = _gather(v_pages, group, start, lens)
    # flex sees group-local key indices; the mask is in global positions.
    mask_mod = lambda b, n, qi, ki: visible(b, n, qi, ki + start)
    return flex.flex_attention(q, k, v, mask_mod=mask_mod, scale=scale, return_residuals=True)

  if splits == 1:
    return one_split(jnp.int32(0), table)
  # Groups from the first key position no query of any row sees are skipped; groups before the
  # first position some query does not see need no mask.
  if causal:
    end = jnp.max(jnp.minimum(lens, offs + T))
    all_see = jnp.min(jnp.minimum(lens, offs + 1))
  else:
    end, all_see = jnp.max(lens), jnp.min(lens)
  group_len = pps * ps

  def merged(masked):
    def update(carry, start, group):
      o, lse = one_split(start, group, masked)
      # The running state stays float32: a bf16 output is rounded once, at the end.
      return merge_attention_states(jnp.stack([carry[0], o.astype(jnp.float32)]),
                                    jnp.stack([carry[1], lse]))
    return update

  @jax.checkpoint                            # the backward re-gathers one group at a time
  def body(carry, x):
    start, group = x
    branch = jnp.where(start >= end, 0, jnp.where(start + group_len <= all_see, 2, 1))
    skip = lambda carry, start, group: carry
    return jax.lax.switch(branch, (skip, merged(True), merged(False)), carry, start, group), None

  table = jnp.pad(table, ((0, 0), (0, splits * pps - max_pages)), constant_values=-1)
  groups = jnp.moveaxis(table.reshape(B, splits, pps), 1, 0)
  starts = jnp.arange(splits, dtype=jnp.int32) * group_len
  init = (jnp.zeros((B, T, N, v_pages.shape[3]), jnp.float32),
          jnp.full((B, T, N), -jnp.inf, jnp.float32))
  (out, lse), _ = jax.lax.scan(body, init, (starts, groups))
  return out.astype(q.dtype), lse


def _reference(q, k_pages, v_pages, table, lens, offs, *, causal, scale, pages_per_split,
               return_residuals):
  """Each row gathered whole (`[B, max_pages · page_size, K, ·]`), dense masked softmax in float32."""
  del pages_per_split, return_residuals
  zero = jnp.int32(0)
  k, v = _gather(k_pages, table, zero, lens), _gather(v_pages, table, zero, lens)
  return flex.flex_attention(q, k, v, mask_mod=_visible(lens, offs, causal), scale=scale,
                             return_residuals=True, implementation="reference")


def _pallas_triton(q, k_pages, v_pages, table, lens, offs, *, causal, scale, pages_per_split,
                   return_residuals):
  """The split-K paged decode kernel (it reads each key through the page table inside the kernel)."""
  if return_residuals:
    raise NotImplementedError(f"{_PAGED}: the pallas_triton kernel merges its splits inside and "
                              "returns no lse; use implementation='xla' for residuals")
  # Imported here: the core package does not load Pallas unless a kernel is asked for.
  from attnjax.kernels import decode_triton  # pylint: disable=import-outside-toplevel
  max_pages = table.shape[1]
  num_splits = None
  if pages_per_split is not None:
    num_splits = -(-max_pages // _pages_per_split(pages_per_split, k_pages.shape[1], max_pages))
  out = decode_triton.paged_decode_attention(q, k_pages, v_pages, table, lens, q_offset=offs,
                                             causal=causal, scale=scale, num_splits=num_splits,
                                             implementation="pallas_triton")
  return out, None


def _cpu_flash(q, k_pages, v_pages, table, lens, offs, *, causal, scale, pages_per_split,
               return_residuals):
  """The CPU kernel over the page table as tile lists; its gradient is the `xla` form's."""
  from attnjax.kernels.cpu import paged  # pylint: disable=import-outside-toplevel
  backward = lambda *args: _xla(*args, causal=causal, scale=scale, pages_per_split=pages_per_split,
                                return_residuals=return_residuals)
  return paged.paged_flash_attention(q, k_pages, v_pages, table, lens, offs, causal=causal,
                                     scale=scale, backward=backward)


_IMPLEMENTATIONS = (
    ("pallas_triton", _pallas_triton, ("gpu",)),
    ("cpu_flash", _cpu_flash, ("cpu",)),
    ("xla", _xla, ()),
    ("reference", _reference, ()),
)


# --------------------------------------------------------------------------------------------------
# Cascade attention


@catalog.serves(194, kind="kernel", name="attnjax.core.paged_attention.cascade_attention")
def cascade_attention(q: Query, prefix_k: PrefixKey, prefix_v: PrefixValue, k_pages: KeyPages,
                      v_pages: ValuePages, page_table: PageTable, kv_lengths: Lengths, *,
                      prefix_length=None, q_offset: QOffset = 0, causal: bool = True,
                      scale: Optional[float] = None, pages_per_split: Optional[int] = None,
                      implementation: Optional[str] = None) -> Output:
  """Attention over a shared prefix followed by each row's own paged suffix (module docstring).

  Row b's sequence is the `prefix_length` prefix tokens, then its `kv_lengths[b]` suffix tokens
  (`page_table[b]`'s pages). Positions `q_offset`, `kv_lengths` count within the suffix: query t of
  row b sits at absolute position `prefix_length + q_offset[b] + t` (decode: `q_offset =
  kv_lengths - T`), so it sees the whole prefix and, with `causal`, suffix keys up to its own
  position. Equal to `paged_attention` over a table whose first pages hold the prefix, with
  `kv_lengths + prefix_length` and `q_offset + prefix_length`.

  `xla`: the prefix once for all rows (queries stacked `[1, B·T·G, K, H]`, flex attention), the
  suffixes by `paged_attention` (residuals), merged by `merge_attention_states`;
  `reference`: each row's prefix and suffix concatenated, dense masked softmax in float32.

  Args:
    q: `[B, T, N, H]`.
    prefix_k: `[Sp, K, H]`; prefix_v: `[Sp, K, h]` (one copy, shared by every row).
    k_pages, v_pages, page_table, kv_lengths: each row's suffix, as in `paged_attention`.
    prefix_length: prefix tokens in use (an int or int32 scalar <= Sp; keys past it are hidden);
      default Sp.
    q_offset, causal, scale, pages_per_split: as in `paged_attention`, positions within the suffix.
    implementation: "xla" or "reference"; None takes "xla".

  Returns:
    `[B, T, N, h]` in q's dtype.

  Raises:
    ValueError: naming `cascade_attention` and the argument, for shapes or dtypes as in
      `paged_attention`, or a prefix that is not `[Sp, K, H]` / `[Sp, K, h]` like the pages.
  """
  checks.check_paged(_CASCADE, q, k_pages, v_pages, page_table, kv_lengths, q_offset, pages_per_split)
  K, H, h = k_pages.shape[2], k_pages.shape[3], v_pages.shape[3]
  checks.check_shape(_CASCADE, "prefix_k", prefix_k, (None, K, H), "[Sp, K, H]")
  Sp = prefix_k.shape[0]
  checks.check_shape(_CASCADE, "prefix_v", prefix_v, (Sp, K, h), "[Sp, K, h]")
  if prefix_length is not None and (jnp.ndim(prefix_length) != 0 or not jnp.issubdtype(
      jnp.result_type(prefix_length), jnp.integer)):
    raise ValueError(f"{_CASCADE}: `prefix_length` must be an integer scalar (one prefix for all "
                     f"rows), got {jnp.result_type(prefix_length)} of shape {jnp.shape(prefix_length)}")
  if isinstance(prefix_length, (int, np.integer)):
    if not 0 <= int(prefix_length) <= Sp:
      raise ValueError(f"{_CASCADE}: `prefix_length` must be in [0, Sp = {Sp}], got {prefix_length}")
    prefix_length = None if int(prefix_length) == Sp else int(prefix_length)
  B = q.shape[0]
  ps, max_pages = k_pages.shape[1], page_table.shape[1]
  lens = jnp.clip(jnp.asarray(kv_lengths, jnp.int32), 0, max_pages * ps)
  offs = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (B,))
  return dispatch(_CASCADE, _CASCADE_IMPLEMENTATIONS, implementation, q, prefix_k, prefix_v,
                  k_pages, v_pages, jnp.asarray(page_table, jnp.int32), lens, offs,
                  prefix_length=prefix_length, causal=causal,
                  scale=H ** -0.5 if scale is None else scale, pages_per_split=pages_per_split)


def _cascade_xla(q, prefix_k, prefix_v, k_pages, v_pages, table, lens, offs, *, prefix_length,
                 causal, scale, pages_per_split):
  B, T, N, H = q.shape
  # The suffixes by the first paged implementation that returns residuals (cpu_flash on a CPU).
  o_s, lse_s = paged_attention(q, k_pages, v_pages, table, lens, q_offset=offs, causal=causal,
                               scale=scale, pages_per_split=pages_per_split, return_residuals=True)
  Sp = prefix_k.shape[0]
  if Sp == 0 or (isinstance(prefix_length, int) and prefix_length == 0):
    return o_s
  mask_mod = None
  if prefix_length is not None:
    # Slots past the prefix in use may hold anything: zeroed, then hidden.
    in_use = (jnp.arange(Sp) < prefix_length)[:, None, None]
    prefix_k, prefix_v = jnp.where(in_use, prefix_k, 0), jnp.where(in_use, prefix_v, 0)
    mask_mod = lambda b, n, qi, ki: ki < prefix_length
  # Every query of every row (and every query head of a kv head) as rows of one batch row: the
  # prefix is read once, in one large matmul.
  K = prefix_k.shape[1]
  rows = gqa_rows.heads_to_rows(q, K).reshape(1, -1, K, H)
  o_p, lse_p = flex.flex_attention(rows, prefix_k[None], prefix_v[None], mask_mod=mask_mod,
                                   scale=scale, return_residuals=True)
  o_p = gqa_rows.rows_to_heads(o_p.reshape(B, -1, K, o_p.shape[-1]), N)
  lse_p = gqa_rows.rows_to_heads(lse_p.reshape(B, -1, K), N)
  out, _ = merge_attention_states(jnp.stack([o_p, o_s]), jnp.stack([lse_p, lse_s]))
  return out


def _cascade_reference(q, prefix_k, prefix_v, k_pages, v_pages, table, lens, offs, *,
                       prefix_length, causal, scale, pages_per_split):
  del pages_per_split
  B = q.shape[0]
  Sp = prefix_k.shape[0]
  zero = jnp.int32(0)
  row = lambda prefix, pages: jnp.concatenate(
      [jnp.broadcast_to(prefix[None], (B, *prefix.shape)).astype(pages.dtype),
       _gather(pages, table, zero, lens)], axis=1)
  k, v = row(prefix_k, k_pages), row(prefix_v, v_pages)
  n_prefix = Sp if prefix_length is None else prefix_length
  suffix = _visible(lens, offs, causal)

  def mask_mod(b, n, qi, ki):
    # Slot j < Sp is prefix key j; slot Sp + i is suffix key i.
    return jnp.where(ki < Sp, ki < n_prefix, suffix(b, n, qi, ki - Sp))

  prefix_mask = jnp.arange(Sp) < n_prefix
  # Hidden prefix slots are zeroed as the suffix's are (a buffer past prefix_length may hold NaN).
  keep = jnp.concatenate([prefix_mask, jnp.ones((k.shape[1] - Sp,), bool)])[None, :, None, None]
  k, v = jnp.where(keep, k, 0), jnp.where(keep, v, 0)
  return flex.flex_attention(q, k, v, mask_mod=mask_mod, scale=scale, implementation="reference")


_CASCADE_IMPLEMENTATIONS = (
    ("xla", _cascade_xla, ()),
    ("reference", _cascade_reference, ()),
)
