"""Block-sparse masks: which key blocks each query block must visit, and which of those need no mask.

A `BlockMask` tiles the `[T, S]` score matrix into `block_q x block_kv` tiles and classifies every tile
as *empty* (no visible pair: skipped), *partial* (some visible: the kernel evaluates the `mask_mod`
elementwise) or *full* (every pair visible: no elementwise mask). The layout follows FlexAttention and
splash attention: for each query block, the number and the indices of its partial and of its full
key blocks (indices padded with unspecified values past the count).

`create_block_mask` evaluates the mask_mod tile by tile. When the mask_mod captures no traced arrays
the result is computed at trace time and stored as numpy arrays (static: a jitted kernel's loop bounds
and the sparsity are known at compile time); when it captures traced arrays (segment ids inside `jit`)
the same computation is traced (dynamic).

Paper: Dong et al., "Flex Attention: A Programming Model for Generating Optimized Attention Kernels",
arXiv:2412.05496.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from attnjax.typing import MaskMod

EMPTY, PARTIAL, FULL = 0, 1, 2
# Elements of the dense mask evaluated at once while classifying tiles (bounds the memory it takes).
_EVAL_ELEMENTS = 1 << 24


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockMask:
  """Tile classification of a mask (see module docstring). Arrays are `[Bm, Nm, nq(, nkv)]` with
  `Bm` in {1, B} and `Nm` in {1, N} (1 = the same for every batch row / head).

  The pairs it makes visible (`to_dense`, `as_mask_mod`) are those of its full tiles, and those of
  its partial tiles where `mask_mod` holds.

  Attributes:
    kv_num_blocks: number of partial key blocks of each query block.
    kv_indices: their key-block indices, first `kv_num_blocks` entries valid.
    full_kv_num_blocks, full_kv_indices: the same for full key blocks.
    seq_lengths: `(T, S)`.
    block_size: `(block_q, block_kv)`.
    mask_mod: the elementwise mask applied on partial tiles (None: the tiles are exact, no mask).
    varies: whether the mask varies over (batch rows, heads); where it does, `Bm` (`Nm`) is exactly
      the B (N) it was built for, and an operator with another B (N) rejects it.
  """
  kv_num_blocks: Any
  kv_indices: Any
  full_kv_num_blocks: Any
  full_kv_indices: Any
  seq_lengths: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  block_size: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
  mask_mod: Optional[MaskMod] = dataclasses.field(default=None, metadata=dict(static=True))
  varies: tuple[bool, bool] = dataclasses.field(default=(False, False), metadata=dict(static=True))

  @property
  def is_static(self) -> bool:
    """True when the block structure is known at trace time (numpy arrays)."""
    return isinstance(self.kv_num_blocks, np.ndarray)

  @property
  def num_blocks(self) -> tuple[int, int]:
    return self.kv_indices.shape[-2], self.kv_indices.shape[-1]

  def classes(self):
    """Dense tile classes `[Bm, Nm, nq, nkv]` with values EMPTY / PARTIAL / FULL."""
    xp = np if self.is_static else jnp
    nkv = self.num_blocks[1]

    def member(num, idx):
      # A scatter of each listed block into its row (slots past `num` write a spare column): linear
      # in the number of tiles, where a one-hot comparison would be cubic (1024³ at 64k tokens).
      valid = xp.arange(idx.shape[-1]) < num[..., None]                    # [Bm,Nm,nq,slot]
      target = xp.where(valid, idx, nkv)
      hit = xp.zeros(idx.shape[:-1] + (nkv + 1,), bool)
      if xp is np:
        np.put_along_axis(hit, target, True, axis=-1)
      else:
        hit = jnp.put_along_axis(hit, target, True, axis=-1, inplace=False)
      return hit[..., :nkv]

    partial = member(self.kv_num_blocks, self.kv_indices)
    full = member(self.full_kv_num_blocks, self.full_kv_indices)
    return xp.where(full, FULL, xp.where(partial, PARTIAL, EMPTY)).astype(xp.int32)

  def sparsity(self) -> float:
    """Fraction of tiles skipped (empty)."""
    classes = np.asarray(self.classes())
    return float(np.mean(classes == EMPTY))

  def as_mask_mod(self) -> MaskMod:
    """The visible set as a mask_mod: a pair is visible when its tile is full, or partial and
    `mask_mod` holds. Evaluated at the caller's `b` and `n`, so a `mask_mod` that varies over rows
    where the tile lists do not (`Bm = 1`) is still applied per row."""
    classes = jnp.asarray(self.classes())
    Bm, Nm = classes.shape[:2]
    bq, bk = self.block_size
    elem = self.mask_mod

    def mask_mod(b, n, q_idx, kv_idx):
      tile = classes[0 if Bm == 1 else b, 0 if Nm == 1 else n, q_idx // bq, kv_idx // bk]
      keep = tile == PARTIAL
      if elem is not None:
        keep = jnp.logical_and(keep, elem(b, n, q_idx, kv_idx))
      return jnp.logical_or(tile == FULL, keep)

    return mask_mod

  def to_dense(self) -> jax.Array:
    """The `[Bm, Nm, T, S]` boolean mask this block mask encodes (mask_mod applied on partial tiles)."""
    T, S = self.seq_lengths
    Bm, Nm = self.kv_num_blocks.shape[:2]
    b, n, q, kv = (jnp.arange(s, dtype=jnp.int32).reshape([s if i == d else 1 for i in range(4)])
                   for d, s in enumerate((Bm, Nm, T, S)))
    return jnp.broadcast_to(self.as_mask_mod()(b, n, q, kv), (Bm, Nm, T, S))

  def restrict(self, mask_mod: MaskMod) -> "BlockMask":
    """The block mask of the pairs visible under this block mask AND `mask_mod`.

    Empty tiles stay empty; full tiles become partial (`mask_mod` may hide some of their pairs), and
    partial tiles apply both (`as_mask_mod() & mask_mod`), so the result is exact for any
    `mask_mod`, including one that varies over rows or heads where this block mask does not.
    """
    classes = self.classes()
    xp = np if self.is_static else jnp
    classes = xp.where(classes == FULL, PARTIAL, classes).astype(xp.int32)
    mine = self.as_mask_mod()

    def both(b, n, q_idx, kv_idx):
      return jnp.logical_and(mine(b, n, q_idx, kv_idx), mask_mod(b, n, q_idx, kv_idx))

    return BlockMask.from_classes(classes, seq_lengths=self.seq_lengths, block_size=self.block_size,
                                  mask_mod=both, varies=self.varies)

  @classmethod
  def from_classes(cls, classes, *, seq_lengths, block_size, mask_mod=None,
                   varies=(False, False)) -> "BlockMask":
    """Builds the index form from dense tile classes `[Bm, Nm, nq, nkv]` (numpy: static). When the
    key length is not a multiple of `block_kv`, FULL tiles of the last key block become PARTIAL: that
    block holds padding keys, which the implementations hide on partial tiles only."""
    xp = np if isinstance(classes, np.ndarray) else jnp
    if seq_lengths[1] % block_size[1]:
      tail = xp.where(classes[..., -1] == FULL, PARTIAL, classes[..., -1])
      classes = xp.concatenate([classes[..., :-1], tail[..., None].astype(classes.dtype)], axis=-1)

    def indices(kind):
      hit = classes == kind
      # Stable sort puts the blocks of this kind first, in increasing key order.
      order = xp.argsort(xp.logical_not(hit), axis=-1, stable=True).astype(xp.int32)
      return hit.sum(-1).astype(xp.int32), order

    kv_num, kv_idx = indices(PARTIAL)
    full_num, full_idx = indices(FULL)
    return cls(kv_num, kv_idx, full_num, full_idx, seq_lengths=tuple(seq_lengths),
               block_size=tuple(block_size), mask_mod=mask_mod,
               varies=tuple(bool(x) for x in varies))


def _captures_tracers(mask_mod: MaskMod) -> bool:
  # A numpy probe: a jnp array would take the sharding of a mesh set around the call.
  with jax.ensure_compile_time_eval():
    zero = np.zeros((1, 1, 1, 1), np.int32)
    try:
      out = mask_mod(zero, zero, zero, zero)
    except Exception:  # pylint: disable=broad-except
      # Indexing traced arrays cannot always run eagerly (inside a shard_map under a set mesh, its
      # manual axes make the eager gather fail): a mask that cannot be evaluated now reads traced
      # values.
      return True
  return isinstance(out, jax.core.Tracer)


def _mask_varies(mask_mod: MaskMod) -> tuple[bool, bool]:
  """Whether the mask varies over batch rows and over heads: read from the broadcast shape of its
  output on probe indices of 2 rows and 3 heads (`jax.eval_shape`: nothing is evaluated). Probing
  sizes above 1 is what detects the dependence when the caller passes B = 1 or N = 1."""
  idx = lambda shape: jax.ShapeDtypeStruct(shape, jnp.int32)
  shape = jax.eval_shape(mask_mod, idx((2, 1, 1, 1)), idx((1, 3, 1, 1)), idx((1, 1, 1, 1)),
                         idx((1, 1, 1, 1))).shape
  shape = (1,) * (4 - len(shape)) + tuple(shape)
  return shape[0] == 2, shape[1] == 3


def _tile_classes(mask_mod: MaskMod, Bm: int, Nm: int, T: int, S: int, bq: int, bk: int):
  """Dense `[Bm, Nm, nq, nkv]` tile classes; evaluates the mask a few query blocks at a time."""
  nq, nkv = -(-T // bq), -(-S // bk)
  rows_per_step = max(1, _EVAL_ELEMENTS // max(1, Bm * Nm * bq * nkv * bk))
  rows_per_step = min(rows_per_step, nq)
  steps = -(-nq // rows_per_step)
  b = jnp.arange(Bm, dtype=jnp.int32)[:, None, None, None]
  n = jnp.arange(Nm, dtype=jnp.int32)[None, :, None, None]
  kv = jnp.arange(nkv * bk, dtype=jnp.int32)[None, None, None, :]

  def classify(step):
    q = step * rows_per_step * bq + jnp.arange(rows_per_step * bq, dtype=jnp.int32)
    q = q[None, None, :, None]
    keep = jnp.broadcast_to(mask_mod(b, n, q, kv), (Bm, Nm, rows_per_step * bq, nkv * bk))
    # Out-of-range keys count as hidden (so the tail key block is never full); out-of-range query
    # rows are padding whose output is discarded, so they do not count either way.
    keep = keep & (kv < S)
    q_ok = q < T
    tiles = (Bm, Nm, rows_per_step, bq, nkv, bk)
    any_ = jnp.any((keep & q_ok).reshape(tiles), axis=(3, 5))
    all_ = jnp.all((keep | ~q_ok).reshape(tiles), axis=(3, 5))
    return jnp.where(all_, FULL, jnp.where(any_, PARTIAL, EMPTY)).astype(jnp.int32)

  classes = jax.lax.map(classify, jnp.arange(steps))          # [steps, Bm, Nm, rows, nkv]
  classes = jnp.moveaxis(classes, 0, 2).reshape(Bm, Nm, steps * rows_per_step, nkv)
  return classes[:, :, :nq]


def create_block_mask(mask_mod: Optional[MaskMod], B: Optional[int], N: Optional[int], T: int, S: int,
                      *, block_q: int = 128, block_kv: int = 128) -> BlockMask:
  """Classifies the `block_q x block_kv` tiles of `mask_mod` over a `[B, N, T, S]` score matrix.

  Args:
    mask_mod: `mask_mod(b, n, q_idx, kv_idx) -> bool`; None means no mask (every tile full).
    B, N: batch and heads. A mask that does not vary over them (read from the broadcast shape of its
      output) is evaluated once and broadcast, which keeps the block mask small; None is allowed
      only for such a mask. A mask that varies over them (per-row segment ids, lengths or offsets;
      per-head masks) is classified per row / head, for exactly this B / N.
    T, S: query and key lengths.
    block_q, block_kv: tile sizes; need not divide T and S.

  Returns:
    A static `BlockMask` (numpy) when `mask_mod` captures no traced arrays, else a traced one.

  Raises:
    ValueError: B (N) is None while `mask_mod` depends on the batch row `b` (the head `n`): one set
      of tiles would be silently wrong for the other rows (heads).
  """
  for name, value in (("T", T), ("S", S), ("block_q", block_q), ("block_kv", block_kv)):
    if not isinstance(value, (int, np.integer)) or value <= 0:
      raise ValueError(f"create_block_mask: `{name}` must be a positive int, got {value!r}")
  for name, value in (("B", B), ("N", N)):
    if value is not None and (not isinstance(value, (int, np.integer)) or value <= 0):
      raise ValueError(f"create_block_mask: `{name}` must be a positive int or None, got {value!r}")
  varies = _mask_varies(mask_mod) if mask_mod is not None else (False, False)
  for name, axis, value, dependent in (("B", "batch row", B, varies[0]),
                                       ("N", "head", N, varies[1])):
    if dependent and value is None:
      raise ValueError(
          f"create_block_mask: `mask_mod` depends on the {axis} (its output broadcasts over "
          f"`{name.lower()}`), so its tiles differ per {axis}; pass `{name}` "
          f"(the operator's size) to classify every {axis}, or build one block mask per {axis}")
  Bm, Nm = (B if varies[0] else 1), (N if varies[1] else 1)
  nq, nkv = -(-T // block_q), -(-S // block_kv)
  kwargs = dict(seq_lengths=(T, S), block_size=(block_q, block_kv), mask_mod=mask_mod,
                varies=varies)
  if mask_mod is None:
    classes = np.full((1, 1, nq, nkv), FULL, np.int32)
    if S % block_kv:
      classes[..., -1] = PARTIAL   # the tail tile holds padding keys, which the kernel masks
    return BlockMask.from_classes(classes, **kwargs)
  if _captures_tracers(mask_mod):
    return BlockMask.from_classes(_tile_classes(mask_mod, Bm, Nm, T, S, block_q, block_kv), **kwargs)
  with jax.ensure_compile_time_eval():
    classes = jax.jit(_tile_classes, static_argnums=(0, 1, 2, 3, 4, 5, 6))(
        mask_mod, Bm, Nm, T, S, block_q, block_kv)
  return BlockMask.from_classes(np.asarray(classes), **kwargs)
