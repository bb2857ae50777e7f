"""The `cpu_flash` form of paged attention: the fused CPU kernel reads the keys of each row in place,
through its page table, with no gather of the row's pages.

The B rows' queries are stacked as one kernel batch row, `[1, B·T·G, K, H]` (the G = N / K query
heads of a kv head as rows of one tile, `core.gqa_rows`, so each page is read once per kv head, not
once per query head), one query block per row (block_q = T·G); the page pool is the key sequence,
`[1, P·page_size, K, H]`, one key block per page (block_kv = page_size). Query block b's tile lists
are row b's pages: the pages every query of the row sees whole are full tiles (no mask), the rest
it sees in part (the one holding the row's end; with `causal`, those the row's queries cross) are
partial tiles with their elementwise mask

    key j = slot · page_size + e of row b visible to query t  <=>  j < kv_lengths[b]
                                                              and (not causal or j <= q_offset[b] + t),

at most ceil(T / page_size) + 2 of them per row (one without `causal`). The kernel reads the values
of keys a partial tile hides from all its queries as zeros, so unused slots of a row's last page may
hold anything, NaN included. The gradient is the one of the caller's `backward` form (the `xla`
split-K path): decoding needs the forward, and the kernel's own backward reads hidden slots.

Paper: Ye et al., "FlashInfer: Efficient and Customizable Attention Engine for LLM Inference
Serving", arXiv:2501.01005 (the page table read as the block-sparse rows of one attention call).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import gqa_rows
from attnjax.kernels.cpu import flash

__all__ = ["paged_flash_attention"]


def _tile_lists(table, lens, offs, *, T: int, page_size: int, num_pages: int, causal: bool):
  """The kernel's tile lists and partial-tile mask for the stacked layout (module docstring)."""
  B, M = table.shape
  start = jnp.arange(M, dtype=jnp.int32)[None] * page_size                # [1, M]
  first, last, lens_ = offs[:, None], offs[:, None] + T - 1, lens[:, None]
  seen = start < lens_
  full = start + page_size <= lens_
  if causal:
    seen &= start <= last
    full &= start + page_size - 1 <= first
  partial = seen & ~full
  width = min(M, -(-T // page_size) + 2) if causal else 1
  pages = jnp.clip(table, 0, num_pages - 1)

  def listed(hit, w):
    slots = jnp.argsort(~hit, axis=-1, stable=True)[:, :w].astype(jnp.int32)
    return hit.sum(-1, dtype=jnp.int32)[None], jnp.take_along_axis(pages, slots, 1)[None], slots

  pnum, pidx, pslots = listed(partial, width)
  fnum, fidx, _ = listed(full, M)
  key = pslots[:, :, None, None] * page_size + jnp.arange(page_size, dtype=jnp.int32)
  visible = key < lens[:, None, None, None]                                 # [B, w, 1, ps]
  if causal:
    visible &= key <= offs[:, None, None, None] + jnp.arange(T, dtype=jnp.int32)[:, None]
  mask = jnp.broadcast_to(visible, (B, width, T, page_size))[None, None]
  return (pnum, pidx, fnum, fidx), mask


def paged_flash_attention(q, k_pages, v_pages, table, lens, offs, *, causal: bool, scale: float,
                          backward: Callable):
  """`(out [B,T,N,h] in q's dtype, lse [B,T,N] float32)` of `paged_attention` (its arguments, checked
  and normalized: `lens` clipped, `offs [B]`) from the CPU kernel; gradients are those of
  `backward(q, k_pages, v_pages, table, lens, offs) -> (out, lse)`. Raises NotImplementedError where
  the kernel cannot run (not built, not the CPU backend, a dtype it does not take, a traced scale)."""
  if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
    raise NotImplementedError(f"cpu_flash: dtype {q.dtype} is not supported")
  if not isinstance(scale, (int, float, np.floating)):
    raise NotImplementedError("cpu_flash: a traced scale is not supported")
  B, T, N, H = q.shape
  P, ps, K, hv = v_pages.shape
  G = N // K

  def forward(q, k_pages, v_pages, table, lens, offs):
    lists, mask = _tile_lists(table, lens, offs, T=T, page_size=ps, num_pages=P, causal=causal)
    f32 = lambda x: x.astype(jnp.float32)
    rows = gqa_rows.heads_to_rows(f32(q), K).reshape(1, B * T * G, K, H)
    out, lse = flash.tile_list_forward(
        rows, f32(k_pages).reshape(1, P * ps, K, H), f32(v_pages).reshape(1, P * ps, K, hv), lists,
        jnp.repeat(mask, G, axis=4), scale=scale, block_q=T * G, block_kv=ps)
    out = gqa_rows.rows_to_heads(out.reshape(B, T * G, K, hv), N)
    return out.astype(q.dtype), gqa_rows.rows_to_heads(lse.reshape(B, T * G, K), N)

  def gradients(args, cotangents):
    *arrays, table, lens, offs = args
    _, vjp = jax.vjp(lambda q, k, v: backward(q, k, v, table, lens, offs), *arrays)
    return (*vjp(cotangents), None, None, None)

  # Every traced array is an argument (a custom_vjp function must not close over tracers).
  run = jax.custom_vjp(forward)
  run.defvjp(lambda *args: (forward(*args), args), gradients)
  return run(q, k_pages, v_pages, table, lens, offs)
