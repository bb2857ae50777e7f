"""The `xla` implementation of `flex_attention`: chunked online normalization over the non-empty tiles
of a `BlockMask`, with a custom VJP that recomputes scores tile by tile (FlashAttention-2).

Shapes and contract are `flex.flex_attention`'s; this module is its fast path, tested against the
dense reference in `flex.py` (tests/core/flex_test.py). Kept apart so the reference stays short.

Paper: Dao, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
arXiv:2307.08691; the block sparsity is FlexAttention's (Dong et al., arXiv:2412.05496).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.core import block_mask as bm
from attnjax.core import implementations
from attnjax.core.closures import closure_convert_all
from attnjax.core.normalizers import Normalizer

__all__ = ["DEFAULT_BLOCK", "default_block_size", "head_index", "xla_flex_attention"]

# Tile sizes when no BlockMask fixes them: large tiles keep CPU matmuls efficient.
DEFAULT_BLOCK = {"cpu": (256, 512)}
_FALLBACK_BLOCK = (128, 128)


def default_block_size(platform: Optional[str] = None) -> tuple[int, int]:
  """The `(block_q, block_k)` tile used on `platform` (default: the current backend)."""
  return DEFAULT_BLOCK.get(platform or implementations.current_platform(), _FALLBACK_BLOCK)


def head_index(K: int, G: int):
  """Query-head index n = kv_head * G + group, shaped `[1, K, G, 1, 1]`."""
  return (jnp.arange(K, dtype=jnp.int32)[:, None] * G + jnp.arange(G, dtype=jnp.int32))[
      None, :, :, None, None]


@dataclasses.dataclass(frozen=True, eq=False)
class _Config:
  """What the chunked kernel needs besides arrays (static under jit)."""
  score_fn: Optional[Callable]   # closure-converted score_mod(s, b, n, qi, ki, *consts)
  mask_fn: Optional[Callable]    # closure-converted mask_mod(b, n, qi, ki, *consts)
  normalizer: Normalizer
  scale: float
  S: int
  block_q: int
  block_kv: int


def _union_over_heads(block_mask: bm.BlockMask):
  """Per batch row, tile lists shared by all heads: a tile is visited when any head needs it and is
  full only when full for every head (the elementwise mask still applies per head on partial tiles)."""
  classes = block_mask.classes()
  xp = np if block_mask.is_static else jnp
  visit = xp.any(classes != bm.EMPTY, axis=1, keepdims=True)
  full = xp.all(classes == bm.FULL, axis=1, keepdims=True)
  merged = xp.where(full, bm.FULL, xp.where(visit, bm.PARTIAL, bm.EMPTY)).astype(xp.int32)
  m = bm.BlockMask.from_classes(merged, seq_lengths=block_mask.seq_lengths,
                                block_size=block_mask.block_size)
  return tuple(jnp.asarray(a)[:, 0] for a in (m.kv_num_blocks, m.kv_indices, m.full_kv_num_blocks,
                                              m.full_kv_indices))


def _tile_indices(cfg: _Config, K: int, G: int, i, j):
  qi = (i * cfg.block_q + jnp.arange(cfg.block_q, dtype=jnp.int32))[None, None, None, :, None]
  ki = (j * cfg.block_kv + jnp.arange(cfg.block_kv, dtype=jnp.int32))[None, None, None, None, :]
  return head_index(K, G), qi, ki


def _tile_mask(cfg: _Config, b, n, qi, ki, mask_consts):
  keep = ki < cfg.S
  if cfg.mask_fn is not None:
    keep = jnp.logical_and(keep, cfg.mask_fn(b, n, qi, ki, *mask_consts))
  return keep


def _forward_kernel(cfg: _Config, q, k, v, b_ids, lists, score_consts, mask_consts):
  """q `[Bk,K,G,Tp,H]`, k `[Bk,K,Sp,H]`, v `[Bk,K,Sp,h]` (float32, padded to whole tiles) →
  out `[Bk,K,G,Tp,h]`, lse `[Bk,K,G,Tp]`."""
  Bk, K, G, Tp, H = q.shape
  hv = v.shape[-1]
  bq, bk = cfg.block_q, cfg.block_kv
  nq = Tp // bq
  norm = cfg.normalizer
  b = b_ids[:, None, None, None, None]
  q_blocks = jnp.moveaxis(q.reshape(Bk, K, G, nq, bq, H), 3, 0)

  def row(_, xs):
    q_i, i, pnum, pidx, fnum, fidx = xs

    def visit(masked, idx):
      def body(t, state):
        m_old, l, acc = state
        j = idx[t]
        k_j = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)
        v_j = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
        s = jnp.einsum("bkgqh,bkch->bkgqc", q_i, k_j) * cfg.scale
        n, qi, ki = _tile_indices(cfg, K, G, i, j)
        if cfg.score_fn is not None:
          s = cfg.score_fn(s, b, n, qi, ki, *score_consts)
        if masked:
          keep = _tile_mask(cfg, b, n, qi, ki, mask_consts)
          row_max = jnp.max(jnp.where(keep, s, -jnp.inf), axis=-1)
        else:
          row_max = jnp.max(s, axis=-1)
        # A row with no visible key in this tile keeps its shift: a floored shift (softpick's 0) would
        # make an empty row look non-empty, and the contract gives empty rows lse = -inf.
        m_new = jnp.maximum(m_old, jnp.where(row_max == -jnp.inf, -jnp.inf, norm.shift(row_max)))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        # The sums so far were taken at the old safe shift (0 while m is the empty-row -inf: softpick
        # gives keys scored -inf mass), hence the rescale from it; ≤ 0 so that it never overflows.
        alpha = jnp.exp(jnp.minimum(jnp.where(jnp.isfinite(m_old), m_old, 0.0) - m_safe, 0.0))
        w, mass = norm.weight_and_mass(s, m_safe[..., None])
        if masked:
          w = jnp.where(keep, w, 0.0)
          mass = jnp.where(keep, mass, 0.0) if norm.mass is not None else w
        l = alpha * l + jnp.sum(mass, axis=-1)
        acc = alpha[..., None] * acc + jnp.einsum("bkgqc,bkch->bkgqh", w, v_j)
        return m_new, l, acc
      return body

    m0 = jnp.full((Bk, K, G, bq), -jnp.inf if norm.normalized else 0.0, jnp.float32)
    state = (m0, jnp.zeros((Bk, K, G, bq), jnp.float32), jnp.zeros((Bk, K, G, bq, hv), jnp.float32))
    state = jax.lax.fori_loop(0, pnum, visit(True, pidx), state)
    m, l, acc = jax.lax.fori_loop(0, fnum, visit(False, fidx), state)
    if norm.normalized:
      m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
      den = norm.denominator(l, m_safe)
      empty = (den == 0) | jnp.logical_not(jnp.isfinite(m))   # m = -inf: no visible key
      out = acc / jnp.where(empty, 1.0, den)[..., None]
      lse = jnp.where(empty, -jnp.inf, m_safe + jnp.log(jnp.where(empty, 1.0, den)))
    else:
      out, lse = acc, jnp.zeros_like(l)
    return None, (out, lse)

  pnum, pidx, fnum, fidx = lists
  _, (out, lse) = jax.lax.scan(row, None, (q_blocks, jnp.arange(nq), pnum, pidx, fnum, fidx))
  out = jnp.moveaxis(out, 0, 3).reshape(Bk, K, G, Tp, hv)
  lse = jnp.moveaxis(lse, 0, 3).reshape(Bk, K, G, Tp)
  return out, lse


def _backward_kernel(cfg: _Config, q, k, v, b_ids, lists, score_consts, mask_consts, out, lse, dout,
                     dlse):
  """Gradients of `_forward_kernel` by tile recomputation (FlashAttention-2): one pass over query
  blocks that accumulates dq per block and scatters dk, dv, and the score_mod constants' gradients.

  With P = f̃(s, lse) and P' = h̃'(s, lse):  ds = f̃'(s, lse)·(dO·v) - P'·(dO·o - dlse), since
  ∂o/∂s_j = (f'(s_j) v_j - h'(s_j) o)/D and ∂lse/∂s_j = h'(s_j)/D (the lse cotangent matters when
  partial states are merged, e.g. split-K).
  """
  Bk, K, G, Tp, H = q.shape
  bq, bk = cfg.block_q, cfg.block_kv
  nq = Tp // bq
  norm = cfg.normalizer
  b = b_ids[:, None, None, None, None]
  delta = jnp.sum(dout * out, axis=-1) - dlse                        # [Bk,K,G,Tp]
  lse = jnp.where(jnp.isfinite(lse), lse, 0.0)

  def blocks(x):
    return jnp.moveaxis(x.reshape((Bk, K, G, nq, bq) + x.shape[4:]), 3, 0)

  def row(carry, xs):
    q_i, do_i, lse_i, delta_i, i, pnum, pidx, fnum, fidx = xs

    def visit(masked, idx):
      def body(t, state):
        dq_i, dk, dv, dconsts = state
        j = idx[t]
        k_j = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)
        v_j = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
        s0 = jnp.einsum("bkgqh,bkch->bkgqc", q_i, k_j) * cfg.scale
        n, qi, ki = _tile_indices(cfg, K, G, i, j)
        if cfg.score_fn is not None:
          def score(s_, *float_consts):
            it = iter(float_consts)
            consts = [next(it) if _is_float(c) else c for c in score_consts]
            return cfg.score_fn(s_, b, n, qi, ki, *consts)
          s, mod_vjp = jax.vjp(score, s0, *(c for c in score_consts if _is_float(c)))
        else:
          s = s0
        w, dw, dh = norm.weight_grads(s, lse_i[..., None])
        if masked:
          keep = _tile_mask(cfg, b, n, qi, ki, mask_consts)
          w, dw, dh = (jnp.where(keep, x, 0.0) for x in (w, dw, dh))
        dp = jnp.einsum("bkgqh,bkch->bkgqc", do_i, v_j)
        ds = dw * dp - dh * delta_i[..., None] if norm.normalized else dw * dp
        if cfg.score_fn is not None:
          ds, *dc = mod_vjp(ds)
          dconsts = tuple(a + g for a, g in zip(dconsts, dc, strict=True))
        ds = ds * cfg.scale
        dq_i = dq_i + jnp.einsum("bkgqc,bkch->bkgqh", ds, k_j)
        dk_j = jnp.einsum("bkgqc,bkgqh->bkch", ds, q_i)
        dv_j = jnp.einsum("bkgqc,bkgqh->bkch", w, do_i)
        dk = jax.lax.dynamic_update_slice_in_dim(
            dk, jax.lax.dynamic_slice_in_dim(dk, j * bk, bk, axis=2) + dk_j, j * bk, axis=2)
        dv = jax.lax.dynamic_update_slice_in_dim(
            dv, jax.lax.dynamic_slice_in_dim(dv, j * bk, bk, axis=2) + dv_j, j * bk, axis=2)
        return dq_i, dk, dv, dconsts
      return body

    dk, dv, dconsts = carry
    state = (jnp.zeros_like(q_i), dk, dv, dconsts)
    state = jax.lax.fori_loop(0, pnum, visit(True, pidx), state)
    dq_i, dk, dv, dconsts = jax.lax.fori_loop(0, fnum, visit(False, fidx), state)
    return (dk, dv, dconsts), dq_i

  pnum, pidx, fnum, fidx = lists
  init = (jnp.zeros_like(k), jnp.zeros_like(v),
          tuple(jnp.zeros(jnp.shape(c), jnp.result_type(c)) for c in score_consts if _is_float(c)))
  (dk, dv, dconsts), dq = jax.lax.scan(
      row, init, (blocks(q), blocks(dout), blocks(lse), blocks(delta), jnp.arange(nq),
                  pnum, pidx, fnum, fidx))
  dq = jnp.moveaxis(dq, 0, 3).reshape(Bk, K, G, Tp, H)
  return dq, dk, dv, dconsts


def _chunked_impl(cfg, q, k, v, b_ids, lists, score_consts, mask_consts):
  return _forward_kernel(cfg, q, k, v, b_ids, lists, score_consts, mask_consts)


def _chunked_fwd(cfg, q, k, v, b_ids, lists, score_consts, mask_consts):
  out, lse = _forward_kernel(cfg, q, k, v, b_ids, lists, score_consts, mask_consts)
  return (out, lse), (q, k, v, b_ids, lists, score_consts, mask_consts, out, lse)


def _chunked_bwd(cfg, residuals, cotangents):
  q, k, v, b_ids, lists, score_consts, mask_consts, out, lse = residuals
  dout, dlse = cotangents
  dq, dk, dv, dconsts = _backward_kernel(cfg, q, k, v, b_ids, lists, score_consts, mask_consts,
                                         out, lse, dout, dlse)
  it = iter(dconsts)
  dscore = tuple(next(it) if _is_float(c) else None for c in score_consts)
  return dq, dk, dv, None, None, dscore, tuple(None for _ in mask_consts)


_chunked = jax.custom_vjp(_chunked_impl, nondiff_argnums=(0,))
_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def xla_flex_attention(q, k, v, *, score_mod, mask_mod, block_mask, normalizer, scale):
  """`flex_attention`'s `xla` form on checked inputs: `(out [B,T,N,h] in q's dtype, lse [B,T,N])`.

  Pads T and S to whole tiles, runs one kernel instance per batch row when the tiles differ per row,
  and builds the block mask from `mask_mod` when none is given (tiles: `default_block_size()`).
  """
  B, T, N, H = q.shape
  S, K, hv = k.shape[1], k.shape[2], v.shape[3]
  G = N // K
  if block_mask is None:
    bq, bk = default_block_size()
    bq, bk = min(bq, _round_up(T, 8)), min(bk, _round_up(S, 8))
    block_mask = bm.create_block_mask(mask_mod, B, N, T, S, block_q=bq, block_kv=bk)
  bq, bk = block_mask.block_size
  dtype = q.dtype
  if not isinstance(scale, (int, float, np.floating)):
    # A traced scale folds into q (in float32, so neither is rounded to q's dtype nor promotes the
    # output) so that autodiff reaches it; the kernel's scale stays static.
    q, scale = q.astype(jnp.float32) * jnp.asarray(scale, jnp.float32), 1.0
  lists = _union_over_heads(block_mask)
  Bm = lists[0].shape[0]
  Tp, Sp = _round_up(T, bq), _round_up(S, bk)

  qf = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, Tp - T), (0, 0), (0, 0)))
  qf = qf.reshape(B, Tp, K, G, H).transpose(0, 2, 3, 1, 4)          # [B,K,G,Tp,H]
  kf = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, Sp - S), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  vf = jnp.pad(v.astype(jnp.float32), ((0, 0), (0, Sp - S), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

  Bk = 1 if Bm > 1 else B      # batch rows one kernel instance sees
  tile = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  ex_b, ex_n = tile(Bk, 1, 1, 1, 1), tile(1, K, G, 1, 1)
  ex_q, ex_k = tile(1, 1, 1, bq, 1), tile(1, 1, 1, 1, bk)
  score_fn, score_consts, mask_fn, mask_consts = None, (), None, ()
  if score_mod is not None:
    ex_s = jax.ShapeDtypeStruct((Bk, K, G, bq, bk), jnp.float32)
    score_fn, score_consts = closure_convert_all(
        lambda s, b, n, qi, ki: score_mod(s, b, n, qi, ki).astype(jnp.float32),
        ex_s, ex_b, ex_n, ex_q, ex_k)
  if mask_mod is not None:
    mask_fn, mask_consts = closure_convert_all(
        lambda b, n, qi, ki: jnp.broadcast_to(mask_mod(b, n, qi, ki), (Bk, K, G, bq, bk)),
        ex_b, ex_n, ex_q, ex_k)
  cfg = _Config(score_fn, mask_fn, normalizer, float(scale), S, bq, bk)
  b_ids = jnp.arange(B, dtype=jnp.int32)
  if Bm == 1:
    lists = tuple(x[0] for x in lists)
    out, lse = _chunked(cfg, qf, kf, vf, b_ids, lists, score_consts, mask_consts)
  else:
    # The tiles differ per batch row (documents, lengths): one kernel instance per row.
    def one(qb, kb, vb, bb, lb):
      o, s = _chunked(cfg, qb[None], kb[None], vb[None], bb[None], lb, score_consts, mask_consts)
      return o[0], s[0]
    out, lse = jax.vmap(one)(qf, kf, vf, b_ids, lists)
  out = out.transpose(0, 3, 1, 2, 4).reshape(B, Tp, N, hv)[:, :T].astype(dtype)
  lse = lse.transpose(0, 3, 1, 2).reshape(B, Tp, N)[:, :T]
  return out, lse


def _is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.inexact)
