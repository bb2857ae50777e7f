"""Backward pass of the `pallas_triton` flex attention (`flex_triton.py`): FlashAttention-2's two
kernels (Dao, arXiv:2307.08691), scores recomputed tile by tile, no atomics.

With the forward's row statistic lse, P = f̃(s, lse), P' = h̃'(s, lse) and Δ = rowsum(dO ∘ O) - dlse:

    dS = f̃'(s, lse)·(dO·vᵀ) - P'·Δ        (Δ without h̃' for unnormalized normalizers)
    dq = scale · dS·k      dk = scale · dSᵀ·q      dv = Pᵀ·dO

since ∂o/∂s_j = (f'(s_j) v_j - h'(s_j) o)/D and ∂lse/∂s_j = h'(s_j)/D (the lse cotangent matters when
partial states are merged, e.g. split-K); dS passes back through score_mod's VJP first.

- dq: one program per (query block, batch row, query head) over the key blocks the BlockMask lists.
- dk, dv: one program per (key block, batch row, kv head), over the query heads of its GQA group and,
  for each, the query blocks that visit this key block (the block mask transposed), so dk / dv of a
  kv head are summed in registers, never across programs.
- float arrays captured by score_mod: each dk/dv program adds its tiles' contributions (the cotangent
  of every float-table load, scattered by a one-hot reduction over the table in `CHUNK` steps) into
  its own `[table]` slot of an extra output; the slots are summed outside the kernel: deterministic.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attnjax.kernels import platform
from attnjax.kernels.flex_triton import (Config, dot_t, iota, tile_index, tile_keep, tile_scores,
                                         whole)
from attnjax.kernels.mods import CHUNK


def _tile_grads(cfg: Config, score_refs, mask_refs, masked, q, k, v, do, lse, delta, b, n, qi, ki,
                float_grads):
  """One tile's `(P, dS·scale, [(table, flat index, cotangent)] of float-table loads)`."""
  s0 = dot_t(q, k) * cfg.scale
  norm = cfg.normalizer
  table_grads = []
  if cfg.score is None:
    s = s0
  elif float_grads and cfg.score.float_loads:
    deltas = [jnp.zeros(shape, jnp.float32) for shape in cfg.score.float_loads]
    s, mod_vjp, loads = jax.vjp(
        lambda s_, *d: tile_scores(cfg, score_refs, s_, b, n, qi, ki, d), s0, *deltas, has_aux=True)
  else:
    s, mod_vjp = jax.vjp(lambda s_: tile_scores(cfg, score_refs, s_, b, n, qi, ki)[0], s0)
  w, dw, dh = norm.weight_grads(s, lse[:, None])
  valid = qi < cfg.T                         # padded query rows carry nothing back
  if masked:
    valid = jnp.logical_and(valid, tile_keep(cfg, mask_refs, b, n, qi, ki))
  w, dw, dh = (jnp.where(valid, x, 0.0) for x in (w, dw, dh))
  dp = dot_t(do, v)
  ds = dw * dp - dh * delta[:, None] if norm.normalized else dw * dp
  if cfg.score is not None:
    ds, *dd = mod_vjp(ds)
    if float_grads and cfg.score.float_loads:
      table_grads = [(t, flat, g) for (t, flat), g in zip(loads, dd, strict=True)]
  return w, ds * cfg.scale, table_grads


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, pnum, pidx, fnum, fidx, *refs,
               cfg: Config):
  score_refs, mask_refs, (dq_ref,) = cfg.tables(refs)
  i, b, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  lb, ln = cfg.list_coords(b, n)
  bi, ni = tile_index(cfg, b, n)
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
  qi = i * cfg.bq + iota(cfg.bq)[:, None]

  def visit(masked, idx_ref):
    def body(t, dq):
      j = idx_ref[lb, ln, i, t]
      rows = pl.ds(pl.multiple_of(j * cfg.bk, cfg.bk), cfg.bk)
      k, v = k_ref[rows, :], v_ref[rows, :]
      ki = j * cfg.bk + iota(cfg.bk)[None, :]
      _, ds, _ = _tile_grads(cfg, score_refs, mask_refs, masked, q, k, v, do, lse, delta, bi, ni,
                             qi, ki, False)
      return dq + jax.lax.dot_general(ds.astype(k.dtype), k, (((1,), (0,)), ((), ())),
                                      preferred_element_type=jnp.float32)
    return body

  dq = jnp.zeros(dq_ref.shape, jnp.float32)
  dq = jax.lax.fori_loop(0, pnum[lb, ln, i], visit(True, pidx), dq)
  dq_ref[...] = jax.lax.fori_loop(0, fnum[lb, ln, i], visit(False, fidx), dq)


def _accumulate(ref, flat, g, sync: bool):
  """ref[m] += Σ g[x] over the x with flat[x] == m: a one-hot reduction, `CHUNK` entries a step.

  A read-modify-write of global memory: threads holding replicas of a chunk may run in different
  warps, so with `sync` (compiled, not interpreted) a barrier orders each store before the next load.
  """
  flat, g = flat[..., None], g.astype(jnp.float32)[..., None]

  def chunk(c, carry):
    base = pl.multiple_of(c * CHUNK, CHUNK)
    add = jnp.where(flat == base + iota(CHUNK), g, 0.0)
    while add.ndim > 1:
      add = jnp.sum(add, axis=0)
    ref[pl.ds(base, CHUNK)] = ref[pl.ds(base, CHUNK)] + add
    if sync:
      plgpu.debug_barrier()
    return carry

  jax.lax.fori_loop(0, ref.shape[0] // CHUNK, chunk, 0)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, pnum, pidx, fnum, fidx, *refs,
                 cfg: Config, sync: bool):
  score_refs, mask_refs, (dk_ref, dv_ref, *dtable_refs) = cfg.tables(refs)
  j, b, kh = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  k, v = k_ref[...], v_ref[...]
  ki = j * cfg.bk + iota(cfg.bk)[None, :]
  float_tables = cfg.score.float_tables() if cfg.score is not None else []
  slot = {t: r for t, r in zip(float_tables, dtable_refs, strict=True)}
  for r in dtable_refs:
    r[...] = jnp.zeros(r.shape, jnp.float32)
  if dtable_refs and sync:
    plgpu.debug_barrier()

  def head(g, carry):
    n = kh * cfg.G + g
    lb, ln = cfg.list_coords(b, n)
    bi, ni = tile_index(cfg, b, n)

    def visit(masked, idx_ref):
      def body(t, carry):
        dk, dv = carry
        i = idx_ref[lb, ln, j, t]
        rows = pl.ds(pl.multiple_of(i * cfg.bq, cfg.bq), cfg.bq)
        q, do = q_ref[rows, g, :], do_ref[rows, g, :]
        lse, delta = lse_ref[g, rows], delta_ref[g, rows]
        qi = i * cfg.bq + iota(cfg.bq)[:, None]
        w, ds, table_grads = _tile_grads(cfg, score_refs, mask_refs, masked, q, k, v, do, lse, delta,
                                         bi, ni, qi, ki, True)
        for tab, flat, gr in table_grads:
          _accumulate(slot[tab], flat, gr, sync)
        tdot = lambda a, x: jax.lax.dot_general(a.astype(x.dtype), x, (((0,), (0,)), ((), ())),
                                                preferred_element_type=jnp.float32)
        return dk + tdot(ds, q), dv + tdot(w, do)
      return body

    carry = jax.lax.fori_loop(0, pnum[lb, ln, j], visit(True, pidx), carry)
    return jax.lax.fori_loop(0, fnum[lb, ln, j], visit(False, fidx), carry)

  zeros = lambda ref: jnp.zeros(ref.shape, jnp.float32)
  dk, dv = jax.lax.fori_loop(0, cfg.G, head, (zeros(dk_ref), zeros(dv_ref)))
  dk_ref[...], dv_ref[...] = dk, dv


def _kernels(cfg: Config, q, k, v, do, lse, delta, lists, rlists, tables, *, interpret):
  B, Tp, N, Hp = q.shape
  Sp, K, hp = k.shape[1], k.shape[2], v.shape[3]
  G, bq, bk = cfg.G, cfg.bq, cfg.bk
  q_tile = lambda D: pl.BlockSpec((None, bq, None, D), lambda i, b, n: (b, i, n, 0))
  row_tile = pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))
  kv_seq = lambda D: pl.BlockSpec((None, Sp, None, D), lambda i, b, n: (b, 0, n // G, 0))
  dq = pl.pallas_call(
      functools.partial(_dq_kernel, cfg=cfg), grid=(Tp // bq, B, N),
      in_specs=[q_tile(Hp), kv_seq(Hp), kv_seq(hp), q_tile(hp), row_tile, row_tile,
                *map(whole, lists), *map(whole, tables)],
      out_specs=q_tile(Hp), out_shape=jax.ShapeDtypeStruct(q.shape, jnp.float32),
      compiler_params=cfg.params(), interpret=interpret, name="flex_triton_dq",
  )(q, k, v, do, lse, delta, *lists, *tables)

  # dk/dv programs read their group's G query heads whole and slice query blocks themselves.
  group_seq = lambda D: pl.BlockSpec((None, Tp, G, D), lambda j, b, h: (b, 0, h, 0))
  group_rows = pl.BlockSpec((None, G, Tp), lambda j, b, h: (b, h, 0))
  kv_tile = lambda D: pl.BlockSpec((None, bk, None, D), lambda j, b, h: (b, j, h, 0))
  nkv = Sp // bk
  float_tables = cfg.score.float_tables() if cfg.score is not None else []
  slots = [tables[t].shape[0] for t in float_tables]
  dk, dv, *dtables = pl.pallas_call(
      functools.partial(_dkdv_kernel, cfg=cfg, sync=not interpret), grid=(nkv, B, K),
      in_specs=[group_seq(Hp), kv_tile(Hp), kv_tile(hp), group_seq(hp), group_rows, group_rows,
                *map(whole, rlists), *map(whole, tables)],
      out_specs=[kv_tile(Hp), kv_tile(hp),
                 *(pl.BlockSpec((None, None, None, m), lambda j, b, h: (j, b, h, 0)) for m in slots)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, jnp.float32), jax.ShapeDtypeStruct(v.shape, jnp.float32),
                 *(jax.ShapeDtypeStruct((nkv, B, K, m), jnp.float32) for m in slots)],
      compiler_params=cfg.params(), interpret=interpret, name="flex_triton_dkdv",
  )(q, k, v, do, lse, delta, *rlists, *tables)
  return dq, dk, dv, dtables


def backward(cfg: Config, q, k, v, lists, rlists, tables, out, lse, dout, dlse):
  """Cotangents of `flex_triton._attention`'s padded inputs: `(dq, dk, dv, dtables)` (None for the
  integer tables)."""
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)   # [B,Tp,N]
  delta = jnp.swapaxes(delta, 1, 2) - dlse
  lse = jnp.where(lse == -jnp.inf, 0.0, lse)
  dq, dk, dv, partial_sums = platform.on_platform(
      functools.partial(_kernels, cfg), q, k, v, dout, lse, delta, lists, rlists, tables)
  sums = iter(jnp.sum(p, axis=(0, 1, 2)) for p in partial_sums)
  float_tables = set(cfg.score.float_tables()) if cfg.score is not None else set()
  dtables = tuple(next(sums).astype(x.dtype) if t in float_tables else None
                  for t, x in enumerate(tables))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dtables
