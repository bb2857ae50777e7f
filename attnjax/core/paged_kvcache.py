"""Paged KV cache: a shared pool of fixed-size pages, a page table per row, copy-on-write prefixes.

    k_pages [P, page_size, K, H]     v_pages [P, page_size, K, h]      the pool (every row's tokens)
    page_table [B, max_pages] int32  row b's j-th page (-1: none)      lengths [B] int32
    refcount [P] int32               rows holding each page (0: free)  overflow [B] bool

Row b's token at position p lives at `pool[page_table[b, p // page_size], p % page_size]`. Pages are
taken from the free list when a row grows past its last page and returned when the last row holding
them is freed, so rows of very different lengths share one pool (vLLM's PagedAttention: Kwon et al.,
"Efficient Memory Management for Large Language Model Serving with PagedAttention",
arXiv:2309.06180; FlashInfer's paged / ragged KV: Ye et al., arXiv:2501.01005).

Prefix sharing: `share_prefix` points a row's table at another row's first pages (refcounts grow);
nothing is copied until a row writes into a page another row also holds: `append` then copies that
page to a fresh one first (copy-on-write), so the rows never see each other's later tokens.

Everything is traceable (jit, scan): allocation takes the lowest-numbered free pages in row-major
order of the demands. The pool is finite and a traced append cannot raise, so a row whose demand
finds no free page is flagged in `overflow` (sticky until `free`) and its new tokens are not written
nor counted; size the pool for the batch (`num_free_pages`) or check `overflow` on the host.

Attention over the cache: `attnjax.core.paged_attention.paged_attention(q, cache.k_pages,
cache.v_pages, cache.page_table, cache.lengths, ...)`; decoding a model over it:
`attnjax.models.paged_generate`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp

from attnjax.core import checks

__all__ = ["PagedKVCache"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
  """A pool of KV pages shared by the rows of a batch (see the module docstring)."""
  k_pages: jax.Array
  v_pages: jax.Array
  page_table: jax.Array
  lengths: jax.Array
  refcount: jax.Array
  overflow: jax.Array

  @classmethod
  def create(cls, batch: int, num_pages: int, page_size: int, max_pages: int, num_kv_heads: int,
             head_dim: int, value_head_dim: Optional[int] = None,
             dtype=jnp.float32) -> "PagedKVCache":
    """An empty cache: `num_pages` free pages of `page_size` tokens, rows of up to `max_pages`
    pages (`max_pages · page_size` tokens); `value_head_dim` defaults to `head_dim`."""
    for name, value in (("batch", batch), ("num_pages", num_pages), ("page_size", page_size),
                        ("max_pages", max_pages), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
      if int(value) < 1:
        raise ValueError(f"PagedKVCache.create: `{name}` must be >= 1, got {value}")
    hv = head_dim if value_head_dim is None else value_head_dim
    return cls(jnp.zeros((num_pages, page_size, num_kv_heads, head_dim), dtype),
               jnp.zeros((num_pages, page_size, num_kv_heads, hv), dtype),
               jnp.full((batch, max_pages), -1, jnp.int32), jnp.zeros((batch,), jnp.int32),
               jnp.zeros((num_pages,), jnp.int32), jnp.zeros((batch,), bool))

  @property
  def num_pages(self) -> int:
    return self.k_pages.shape[0]

  @property
  def page_size(self) -> int:
    return self.k_pages.shape[1]

  @property
  def max_length(self) -> int:
    """Tokens one row can hold (its table's pages, full)."""
    return self.page_table.shape[1] * self.page_size

  def num_free_pages(self) -> jax.Array:
    """Pages no row holds (int32 scalar)."""
    return jnp.sum(self.refcount == 0).astype(jnp.int32)

  def append(self, k_new, v_new, num_new=None) -> "PagedKVCache":
    """Writes the first `num_new[b]` of `k_new [B, T, K, H]`, `v_new [B, T, K, h]` at row b's length.

    `num_new` `[B]` int (default T for every row; 0 leaves a row untouched: ragged prefill, rows
    idle in continuous batching). New pages come from the free list; a shared page about to be
    written is copied first. A row whose pages cannot all be found, or whose length would pass
    `max_length`, writes nothing and is flagged in `overflow`.

    Raises:
      ValueError: when `k_new` / `v_new` / `num_new` do not have the shapes above.
    """
    B, max_pages = self.page_table.shape
    _, ps, K, H = self.k_pages.shape
    checks.check_shape("PagedKVCache.append", "k_new", k_new, (B, None, K, H), "[B, T, K, H]")
    T = k_new.shape[1]
    checks.check_shape("PagedKVCache.append", "v_new", v_new, (B, T, K, self.v_pages.shape[3]),
                       "[B, T, K, h]")
    if num_new is None:
      num_new = jnp.full((B,), T, jnp.int32)
    checks.check_shape("PagedKVCache.append", "num_new", num_new, (B,), "[B]")
    num_new = jnp.clip(jnp.asarray(num_new, jnp.int32), 0, T)
    P = self.num_pages
    table, refcount = self.page_table, self.refcount
    start, end = self.lengths, self.lengths + num_new
    fits = end <= max_pages * ps
    slot = jnp.arange(max_pages, dtype=jnp.int32)[None]
    # Pages written by this append: slots from the one holding `start` to the one holding `end - 1`.
    written = (num_new[:, None] > 0) & (slot >= start[:, None] // ps) & (slot * ps < end[:, None])
    held = table >= 0
    shared = held & (refcount[jnp.maximum(table, 0)] > 1)
    demand = written & (~held | shared) & fits[:, None]
    # The k-th demand (row-major) takes the k-th free page; those past the free count get none.
    rank = jnp.cumsum(demand.reshape(-1)).reshape(B, max_pages) - 1
    free_pages = jnp.argsort(refcount != 0, stable=True).astype(jnp.int32)
    found = demand & (rank < jnp.sum(refcount == 0))
    short = jnp.any(demand & ~found, axis=1)
    ok = fits & ~short
    take = found & ok[:, None]            # a row that cannot get every page it needs takes none
    new_page = jnp.where(take, free_pages[jnp.clip(rank, 0, P - 1)], -1)
    copy_from = jnp.where(take & held, table, -1)
    # Copy-on-write: the shared page's tokens move to the fresh page before the new ones land.
    src, dst = copy_from.reshape(-1), jnp.where(copy_from >= 0, new_page, P).reshape(-1)
    k_pages = self.k_pages.at[dst].set(self.k_pages[jnp.maximum(src, 0)], mode="drop")
    v_pages = self.v_pages.at[dst].set(self.v_pages[jnp.maximum(src, 0)], mode="drop")
    refcount = refcount.at[jnp.where(take, new_page, P).reshape(-1)].add(1, mode="drop")
    refcount = refcount.at[jnp.where(copy_from >= 0, copy_from, P).reshape(-1)].add(-1, mode="drop")
    table = jnp.where(take, new_page, table)
    # Scatter the new tokens: row b's token t goes to position start_b + t when t < num_new_b.
    pos = start[:, None] + jnp.arange(T, dtype=jnp.int32)[None]
    valid = (jnp.arange(T)[None] < num_new[:, None]) & ok[:, None]
    page = jnp.take_along_axis(table, jnp.clip(pos // ps, 0, max_pages - 1), axis=1)
    page = jnp.where(valid & (page >= 0), page, P)          # P: out of range, dropped
    k_pages = k_pages.at[page, pos % ps].set(k_new.astype(k_pages.dtype), mode="drop")
    v_pages = v_pages.at[page, pos % ps].set(v_new.astype(v_pages.dtype), mode="drop")
    return PagedKVCache(k_pages, v_pages, table, jnp.where(ok, end, start), refcount,
                        self.overflow | ~ok)

  def free(self, rows) -> "PagedKVCache":
    """Releases the pages of the rows where `rows [B]` (bool) is True; those rows become empty.

    A page shared with a row that is not freed stays allocated (its refcount drops by one)."""
    B, max_pages = self.page_table.shape
    checks.check_shape("PagedKVCache.free", "rows", rows, (B,), "[B] bool")
    rows = jnp.asarray(rows, bool)
    drop = rows[:, None] & (self.page_table >= 0)
    refcount = self.refcount.at[jnp.where(drop, self.page_table, self.num_pages).reshape(-1)].add(
        -1, mode="drop")
    return dataclasses.replace(
        self, page_table=jnp.where(rows[:, None], -1, self.page_table),
        lengths=jnp.where(rows, 0, self.lengths), refcount=refcount,
        overflow=jnp.where(rows, False, self.overflow))

  def share_prefix(self, src, dst, length) -> "PagedKVCache":
    """Row `dst` starts as the first `length` tokens of row `src`, sharing their pages (no copy).

    `src`, `dst`, `length`: int32 scalars (traceable); `dst` must be empty (freed) and `length` at
    most row src's length. A partly filled last page is shared too: whichever row writes into it
    first gets its own copy (`append`). Several rows may share one prefix (call once per row).
    """
    ps = self.page_size
    src, dst, length = (jnp.asarray(x, jnp.int32) for x in (src, dst, length))
    length = jnp.minimum(length, self.lengths[src])
    pages = jnp.where(jnp.arange(self.page_table.shape[1]) * ps < length,
                      self.page_table[src], -1)
    refcount = self.refcount.at[jnp.where(pages >= 0, pages, self.num_pages)].add(1, mode="drop")
    return dataclasses.replace(self, page_table=self.page_table.at[dst].set(pages),
                               lengths=self.lengths.at[dst].set(length), refcount=refcount)

  def gather(self, row: int) -> tuple[jax.Array, jax.Array]:
    """Row `row`'s keys `[max_length, K, H]` and values `[max_length, K, h]` in order (for tests and
    inspection; slots at or past its length hold whatever the pool has there, or zeros)."""
    pages = self.page_table[row]
    safe = jnp.maximum(pages, 0)
    keep = (pages >= 0)[:, None, None, None]
    k = jnp.where(keep, self.k_pages[safe], 0).reshape(-1, *self.k_pages.shape[2:])
    v = jnp.where(keep, self.v_pages[safe], 0).reshape(-1, *self.v_pages.shape[2:])
    return k, v
