"""`flex_attention(..., implementation="pallas_triton")`: a Pallas kernel lowered through Triton.

    s_ij = score_mod(scale · q_i·k_j, b, n, i, j)       visible(i, j) = mask_mod(b, n, i, j)
    o_i  = Σ_{j visible} f(s_ij) v_j / (Σ_{j visible} h(s_ij) + ε)       (normalizer (f, h, ε))

Shapes: `q [B,T,N,H]`, `k [B,S,K,H]`, `v [B,S,K,h]` → `out [B,T,N,h]` (q's dtype) and `lse [B,T,N]`
(float32; -inf on a row with no visible key, whose output is zeros). GQA reads kv head n // (N/K)
through the BlockSpec index maps (K and V are never repeated); H ≠ h is fine.

FlashAttention-2 tiling (Dao, arXiv:2307.08691) over FlexAttention's block mask (Dong et al.,
arXiv:2412.05496): one program per (query block, batch row, query head) streams the key blocks its
`BlockMask` lists, running the normalizer's shifted online sums; partial tiles evaluate `mask_mod`
elementwise, full tiles skip it. The backward pass (custom VJP, scores recomputed per tile) is two
kernels in `flex_triton_bwd.py`: dq over query blocks, dk/dv over key blocks (reading, per key
block, the query blocks that visit it: the block mask transposed), with no atomics.

`score_mod` / `mask_mod` are traced once to a jaxpr (`kernels/mods.py`): the part that depends on the
captured arrays alone is computed outside the kernel; the arrays the per-tile part indexes are kernel
inputs (whole-array BlockSpecs, flattened), where each `table[b, n, q_idx, ...]` becomes a pointer
load at indices computed from iota tiles. Gradients reach float arrays captured by score_mod (a
learnable bias, ALiBi slopes, a temperature): each dk/dv program sums its tiles' contributions into
its own slot of an extra output (a one-hot reduction, O(tile · table size)), and the slots are summed
outside the kernel, so the result is deterministic.

Supported: any BlockMask, static (numpy) or traced (segment ids under jit), per batch row / head or
shared, whose tile sizes are powers of two ≥ 16 (Triton's smallest dot; T, S and the head dims are
padded, padded keys hidden); the streamable normalizers of `core.normalizers`; traced scales; the
lse cotangent. Raises `NotImplementedError` (so automatic dispatch falls back to `xla`), decided at
trace time from the inputs and the mods' jaxprs, hence the same on every platform (a CPU test shows
what a GPU does): tile sizes that are not powers of two ≥ 16; a mod using a primitive without a
Triton lowering rule (`dynamic_slice`, `scatter`, `sort`, ...); a captured array read other than by
indexing all its axes with integer arrays (a size-1 array may be used as a value); `jnp.take`-style
out-of-bounds fill; a float array captured by score_mod above `MAX_FLOAT_TABLE` elements. On a CPU
the kernels run in Pallas' interpret mode (`kernels.platform`): the kernel's arithmetic, slowly.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from attnjax.core import block_mask as bm
from attnjax.core.normalizers import Normalizer
from attnjax.kernels import platform
from attnjax.kernels.mods import MAX_FLOAT_TABLE, Mod, evaluate, flat_table, pow2, prepare_mod
from attnjax.typing import Key, LogSumExp, MaskMod, Output, Query, ScoreMod, Value

__all__ = ["flex_triton_attention", "block_lists", "MAX_FLOAT_TABLE", "KERNEL"]

KERNEL = "flex_triton"          # the tile table's key (`platform.block_sizes`)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


# ----------------------------------------------------------------------------------------------------
# Forward kernel


@dataclasses.dataclass(frozen=True, eq=False)
class Config:
  """What the kernels need besides arrays (static under jit)."""
  score: Optional[Mod]
  mask: Optional[Mod]
  normalizer: Normalizer
  scale: float
  T: int
  S: int
  G: int                      # query heads per kv head
  bq: int
  bk: int
  Bm: int                     # batch rows / heads of the block lists (1: shared)
  Nm: int
  num_warps: int
  num_stages: int

  def tables(self, refs):
    """Splits kernel refs into (score tables, mask tables, the rest)."""
    ns = len(self.score.tables) if self.score else 0
    nm = len(self.mask.tables) if self.mask else 0
    return refs[:ns], refs[ns:ns + nm], refs[ns + nm:]

  def list_coords(self, b, n):
    return (b if self.Bm > 1 else 0), (n if self.Nm > 1 else 0)

  def params(self):
    return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


def iota(n: int):
  return jnp.arange(n, dtype=jnp.int32)


def dot_t(a, b):
  """a @ bᵀ with float32 accumulation."""
  return jax.lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def tile_scores(cfg: Config, refs, s, b, n, qi, ki, deltas=None):
  """score_mod on a tile: `(s [bq, bk], float-table loads)`."""
  if cfg.score is None:
    return s, []
  out, loads = evaluate(cfg.score, refs, (s, b, n, qi, ki), deltas)
  return jnp.broadcast_to(jnp.reshape(out, out.shape[-2:]), s.shape), loads


def tile_keep(cfg: Config, refs, b, n, qi, ki):
  """The elementwise mask of a partial tile (padded keys hidden), `[bq, bk]` bool."""
  keep = ki < cfg.S
  if cfg.mask is not None:
    m, _ = evaluate(cfg.mask, refs, (b, n, qi, ki))
    keep = jnp.logical_and(keep, jnp.reshape(m, m.shape[-2:]))
  return jnp.broadcast_to(keep, (cfg.bq, cfg.bk))


def tile_index(cfg: Config, b, n):
  """`b`, `n` as `[1, 1]` int32 index arrays (what the mods see, with `[bq,1]`, `[1,bk]` positions)."""
  return (jnp.full((1, 1), b, jnp.int32), jnp.full((1, 1), n, jnp.int32))


def _forward_kernel(q_ref, k_ref, v_ref, pnum, pidx, fnum, fidx, *refs, cfg: Config):
  score_refs, mask_refs, (o_ref, lse_ref) = cfg.tables(refs)
  i, b, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  lb, ln = cfg.list_coords(b, n)
  bi, ni = tile_index(cfg, b, n)
  q = q_ref[...]
  qi = i * cfg.bq + iota(cfg.bq)[:, None]
  norm = cfg.normalizer

  def visit(masked, idx_ref):
    def body(t, carry):
      m_old, l, acc = carry
      j = idx_ref[lb, ln, i, t]
      rows = pl.ds(pl.multiple_of(j * cfg.bk, cfg.bk), cfg.bk)
      k, v = k_ref[rows, :], v_ref[rows, :]
      ki = j * cfg.bk + iota(cfg.bk)[None, :]
      s, _ = tile_scores(cfg, score_refs, dot_t(q, k) * cfg.scale, bi, ni, qi, ki)
      if masked:
        keep = tile_keep(cfg, mask_refs, bi, ni, qi, ki)
        row_max = jnp.max(jnp.where(keep, s, -jnp.inf), axis=1)
      else:
        row_max = jnp.max(s, axis=1)
      # A row with no visible key in this tile keeps its shift (a floored shift would make an empty
      # row look non-empty; empty rows get lse = -inf).
      m_new = jnp.maximum(m_old, jnp.where(row_max == -jnp.inf, -jnp.inf, norm.shift(row_max)))
      m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
      # Rescale from the shift the sums were taken at (0 while m is the empty-row -inf), never up.
      alpha = jnp.exp(jnp.minimum(jnp.where(m_old == -jnp.inf, 0.0, m_old) - m_safe, 0.0))
      w, mass = norm.weight_and_mass(s, m_safe[:, None])
      if masked:
        w = jnp.where(keep, w, 0.0)
        mass = jnp.where(keep, mass, 0.0) if norm.mass is not None else w
      pv = jax.lax.dot_general(w.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)
      return m_new, alpha * l + jnp.sum(mass, axis=1), alpha[:, None] * acc + pv
    return body

  m0 = jnp.full((cfg.bq,), -jnp.inf if norm.normalized else 0.0, jnp.float32)
  carry = (m0, jnp.zeros((cfg.bq,), jnp.float32), jnp.zeros((cfg.bq, o_ref.shape[-1]), jnp.float32))
  carry = jax.lax.fori_loop(0, pnum[lb, ln, i], visit(True, pidx), carry)
  m, l, acc = jax.lax.fori_loop(0, fnum[lb, ln, i], visit(False, fidx), carry)
  if norm.normalized:
    m_safe = jnp.where(m == -jnp.inf, 0.0, m)
    den = norm.denominator(l, m_safe)
    empty = (den == 0) | (m == -jnp.inf)          # m = -inf: no visible key
    out = acc / jnp.where(empty, 1.0, den)[:, None]
    lse = jnp.where(empty, -jnp.inf, m_safe + jnp.log(jnp.where(empty, 1.0, den)))
  else:
    out, lse = acc, jnp.zeros_like(l)
  o_ref[...] = out.astype(o_ref.dtype)
  lse_ref[...] = lse


def whole(x) -> pl.BlockSpec:
  """The whole array in every program (block lists, tables: read by scalar or gathered loads)."""
  return pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)


def forward(cfg: Config, q, k, v, lists, tables, *, interpret):
  """Padded `q [B,Tp,N,Hp]`, `k [B,Sp,K,Hp]`, `v [B,Sp,K,hp]` → `out [B,Tp,N,hp]`, `lse [B,N,Tp]`."""
  B, Tp, N, Hp = q.shape
  Sp, hp, G = k.shape[1], v.shape[3], cfg.G
  return pl.pallas_call(
      functools.partial(_forward_kernel, cfg=cfg), grid=(Tp // cfg.bq, B, N),
      in_specs=[pl.BlockSpec((None, cfg.bq, None, Hp), lambda i, b, n: (b, i, n, 0)),
                pl.BlockSpec((None, Sp, None, Hp), lambda i, b, n: (b, 0, n // G, 0)),
                pl.BlockSpec((None, Sp, None, hp), lambda i, b, n: (b, 0, n // G, 0)),
                *map(whole, lists), *map(whole, tables)],
      out_specs=[pl.BlockSpec((None, cfg.bq, None, hp), lambda i, b, n: (b, i, n, 0)),
                 pl.BlockSpec((None, None, cfg.bq), lambda i, b, n: (b, n, i))],
      out_shape=[jax.ShapeDtypeStruct((B, Tp, N, hp), q.dtype),
                 jax.ShapeDtypeStruct((B, N, Tp), jnp.float32)],
      compiler_params=cfg.params(), interpret=interpret, name="flex_triton_fwd",
  )(q, k, v, *lists, *tables)


# ----------------------------------------------------------------------------------------------------
# Custom VJP and the public entry


def _impl(cfg, q, k, v, lists, rlists, tables):
  return platform.on_platform(functools.partial(forward, cfg), q, k, v, lists, tables)


def _fwd(cfg, q, k, v, lists, rlists, tables):
  out, lse = _impl(cfg, q, k, v, lists, rlists, tables)
  return (out, lse), (q, k, v, lists, rlists, tables, out, lse)


def _bwd(cfg, residuals, cotangents):
  from attnjax.kernels import flex_triton_bwd    # imports this module
  q, k, v, lists, rlists, tables, out, lse = residuals
  dq, dk, dv, dtables = flex_triton_bwd.backward(cfg, q, k, v, lists, rlists, tables, out, lse,
                                                 *cotangents)
  return dq, dk, dv, None, None, dtables


_attention = jax.custom_vjp(_impl, nondiff_argnums=(0,))
_attention.defvjp(_fwd, _bwd)


def block_lists(block_mask: bm.BlockMask):
  """Per query block its partial / full key blocks, and per key block its partial / full query blocks
  (the transposed classes): static numpy in, static out; traced in, traced out."""
  xp = np if block_mask.is_static else jnp
  classes = block_mask.classes()
  rev = bm.BlockMask.from_classes(xp.swapaxes(classes, 2, 3), seq_lengths=block_mask.seq_lengths[::-1],
                                  block_size=block_mask.block_size[::-1])
  as_int = lambda m: tuple(jnp.asarray(x, jnp.int32) for x in (
      m.kv_num_blocks, m.kv_indices, m.full_kv_num_blocks, m.full_kv_indices))
  return as_int(block_mask), as_int(rev)


def flex_triton_attention(q: Query, k: Key, v: Value, *, score_mod: Optional[ScoreMod],
                          mask_mod: Optional[MaskMod], block_mask: Optional[bm.BlockMask],
                          normalizer: Normalizer, scale) -> tuple[Output, LogSumExp]:
  """`flex_attention`'s `pallas_triton` form on checked inputs: `(out [B,T,N,h] in q's dtype,
  lse [B,T,N] float32)`; raises NotImplementedError for what it does not serve (module docstring).

  The block mask is built from `mask_mod` when none is given, with tiles from the tile table
  (`platform.block_sizes("flex_triton", ...)`, capped at the padded lengths).
  """
  B, T, N, H = q.shape
  S, K, hv = k.shape[1], k.shape[2], v.shape[3]
  if not q.dtype == k.dtype == v.dtype:
    # Triton's dot takes one element type (interpret mode would accept the mix; CUDA lowering not).
    raise NotImplementedError(f"pallas_triton: q, k, v dtypes differ ({q.dtype}, {k.dtype}, "
                              f"{v.dtype})")
  Hp, hp = pow2(H), pow2(hv)
  sizes = platform.block_sizes(KERNEL, head_dim=Hp, dtype=q.dtype)
  if block_mask is None:
    bq, bk = min(sizes["block_q"], pow2(T)), min(sizes["block_kv"], pow2(S))
    block_mask = bm.create_block_mask(mask_mod, B, N, T, S, block_q=bq, block_kv=bk)
  bq, bk = block_mask.block_size
  if any(x < 16 or x & (x - 1) for x in (bq, bk)):
    raise NotImplementedError(f"pallas_triton: block sizes {(bq, bk)} are not powers of two >= 16")
  if not isinstance(scale, (int, float, np.floating)):
    # A traced scale folds into q so that autodiff reaches it; the kernel's scale stays static.
    q, scale = q * jnp.asarray(scale, q.dtype), 1.0

  idx = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  ex = (idx(1, 1), idx(1, 1), idx(bq, 1), idx(1, bk))
  score, mask, score_tables, mask_tables = None, None, [], []
  if score_mod is not None:
    score, score_tables = prepare_mod(
        lambda s, *ix: jnp.asarray(score_mod(s, *ix), jnp.float32),
        (jax.ShapeDtypeStruct((bq, bk), jnp.float32), *ex), float_grads=True)
  if mask_mod is not None:
    mask, mask_tables = prepare_mod(lambda *ix: jnp.asarray(mask_mod(*ix), bool), ex,
                                      float_grads=False)
  lists, rlists = block_lists(block_mask)
  cfg = Config(score, mask, normalizer, float(scale), T, S, N // K, bq, bk, *lists[0].shape[:2],
               sizes.get("num_warps", 4), sizes.get("num_stages", 2))

  Tp, Sp = _round_up(T, bq), _round_up(S, bk)
  pad = lambda x, L, D: jnp.pad(x, ((0, 0), (0, L - x.shape[1]), (0, 0), (0, D - x.shape[3])))
  tables = tuple(map(flat_table, list(score_tables) + list(mask_tables)))
  out, lse = _attention(cfg, pad(q, Tp, Hp), pad(k, Sp, Hp), pad(v, Sp, hp), lists, rlists, tables)
  return out[:, :T, :, :hv], jnp.swapaxes(lse, 1, 2)[:, :T]
