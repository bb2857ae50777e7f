"""BlockMask: tile classes against a numpy tiling of the dense mask, static and traced construction."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import block_mask as bm
from attnjax.core import masks
from tests import tolerances


def numpy_classes(dense, bq, bk):
  """Tile classes of a dense `[B, N, T, S]` mask: keys past S hidden, query rows past T ignored."""
  B, N, T, S = dense.shape
  nq, nkv = -(-T // bq), -(-S // bk)
  out = np.zeros((B, N, nq, nkv), np.int32)
  for i in range(nq):
    for j in range(nkv):
      tile = np.zeros((B, N, min(bq, T - i * bq), bk), bool)
      part = dense[:, :, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
      tile[..., :part.shape[-1]] = part
      out[:, :, i, j] = np.where(tile.all((2, 3)), bm.FULL, np.where(tile.any((2, 3)), bm.PARTIAL,
                                                                        bm.EMPTY))
  return out


def segments(B, T, seed=0, docs=4):
  return np.sort(np.random.default_rng(seed).integers(0, docs, (B, T)), axis=1).astype(np.int32)


CASES = {
    "causal": lambda seg: masks.causal(),
    "window": lambda seg: masks.sliding_window(7, 2),
    "prefix": lambda seg: masks.prefix_lm(9),
    "document_causal": lambda seg: masks.and_masks(masks.causal(), masks.document(jnp.asarray(seg))),
    "chunked": lambda seg: masks.chunked(8),
    "dilated_global": lambda seg: masks.or_masks(masks.dilated(3), masks.global_tokens(2)),
    "sink": lambda seg: masks.sink_window(2, 5),
}


@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("T,S,bq,bk",
                         [(32, 32, 8, 8), (37, 45, 8, 16), (21, 21, 5, 7), (10, 50, 16, 16)])
def test_classes_and_to_dense_match_numpy(name, T, S, bq, bk):
  B, N = 2, 3
  mod = CASES[name](segments(B, max(T, S)))
  block = bm.create_block_mask(mod, B, N, T, S, block_q=bq, block_kv=bk)
  assert block.is_static
  dense = np.asarray(masks.evaluate_mask(mod, B, N, T, S))
  classes = np.asarray(block.classes())
  Bm, Nm = classes.shape[:2]
  np.testing.assert_array_equal(np.broadcast_to(classes, (B, N) + classes.shape[2:]),
                                numpy_classes(dense, bq, bk))
  to_dense = np.asarray(block.to_dense())
  chex.assert_shape(to_dense, (Bm, Nm, T, S))
  np.testing.assert_array_equal(np.broadcast_to(to_dense, dense.shape), dense)


def test_full_tiles_are_all_visible_and_empty_tiles_all_hidden():
  B, N, T, S, bq, bk = 2, 1, 50, 61, 8, 8
  seg = segments(B, 61, seed=3)
  mod = masks.and_masks(masks.causal(offset=11), masks.document(jnp.asarray(seg[:, :T]),
                                                                jnp.asarray(seg)))
  block = bm.create_block_mask(mod, B, N, T, S, block_q=bq, block_kv=bk)
  classes = np.asarray(block.classes())
  dense = np.asarray(masks.evaluate_mask(mod, B, N, T, S))
  kinds = set()
  for b in range(B):
    for i in range(classes.shape[2]):
      for j in range(classes.shape[3]):
        tile = dense[b, 0, i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
        c = classes[b, 0, i, j]
        kinds.add(int(c))
        if c == bm.FULL:
          assert tile.all() and tile.shape == (min(bq, T - i * bq), bk)
        elif c == bm.EMPTY:
          assert not tile.any()
        else:
          assert tile.any() and (not tile.all() or tile.shape[1] < bk)
  assert kinds == {bm.EMPTY, bm.PARTIAL, bm.FULL}


def test_tail_tiles():
  # T=S=20, blocks of 8: the tail key block holds 4 real keys, so it is never full, even unmasked.
  block = bm.create_block_mask(None, 1, 1, 20, 20, block_q=8, block_kv=8)
  np.testing.assert_array_equal(block.classes()[0, 0], [[2, 2, 1]] * 3)
  np.testing.assert_array_equal(np.asarray(block.to_dense()), np.ones((1, 1, 20, 20), bool))
  full = bm.create_block_mask(masks.full_mask, 1, 1, 20, 20, block_q=8, block_kv=8)
  np.testing.assert_array_equal(full.classes(), block.classes())
  # Padded query rows do not count: the tail query block of an all-visible mask is full.
  exact = bm.create_block_mask(None, 1, 1, 20, 16, block_q=8, block_kv=8)
  assert (np.asarray(exact.classes()) == bm.FULL).all()
  # A causal tail query block (rows 16..19) fully sees key block 1 (keys 8..15).
  causal = bm.create_block_mask(masks.causal(), 1, 1, 20, 20, block_q=8, block_kv=8)
  np.testing.assert_array_equal(causal.classes()[0, 0], [[1, 0, 0], [2, 1, 0], [2, 2, 1]])


def test_index_form():
  block = bm.create_block_mask(masks.causal(), None, None, 32, 32, block_q=8, block_kv=8)
  np.testing.assert_array_equal(block.kv_num_blocks[0, 0], [1, 1, 1, 1])
  np.testing.assert_array_equal(block.full_kv_num_blocks[0, 0], [0, 1, 2, 3])
  np.testing.assert_array_equal(block.kv_indices[0, 0, :, 0], [0, 1, 2, 3])
  for i in range(4):
    np.testing.assert_array_equal(block.full_kv_indices[0, 0, i, :i], np.arange(i))
  assert block.num_blocks == (4, 4)
  assert block.sparsity() == pytest.approx(6 / 16)
  rebuilt = bm.BlockMask.from_classes(np.asarray(block.classes()), seq_lengths=(32, 32),
                                      block_size=(8, 8))
  np.testing.assert_array_equal(rebuilt.classes(), block.classes())


def test_static_and_dynamic_agree_inside_jit():
  B, N, T, S, bq, bk = 3, 2, 45, 45, 8, 16
  seg = segments(B, T, seed=7)
  lengths = np.array([45, 30, 9], np.int32)

  def make(seg, lengths):
    return masks.and_masks(masks.causal(), masks.document(seg), masks.padding(lengths))

  static = bm.create_block_mask(make(jnp.asarray(seg), jnp.asarray(lengths)), B, N, T, S,
                                block_q=bq, block_kv=bk)
  assert static.is_static

  @jax.jit
  def traced(seg, lengths):
    block = bm.create_block_mask(make(seg, lengths), B, N, T, S, block_q=bq, block_kv=bk)
    assert not block.is_static
    return block.classes(), block.to_dense(), block

  classes, dense, dyn = traced(seg, lengths)
  np.testing.assert_array_equal(classes, static.classes())
  np.testing.assert_array_equal(dense, static.to_dense())
  for a, b in zip(jax.tree.leaves(dyn), jax.tree.leaves(static), strict=True):
    chex.assert_shape(a, b.shape)
  np.testing.assert_array_equal(dyn.kv_num_blocks, static.kv_num_blocks)
  np.testing.assert_array_equal(dyn.full_kv_num_blocks, static.full_kv_num_blocks)


def test_batch_and_head_dependence_detection():
  B, N, T = 4, 3, 24
  make = lambda mod: bm.create_block_mask(mod, B, N, T, T, block_q=8, block_kv=8)
  assert make(masks.causal()).kv_num_blocks.shape[:2] == (1, 1)
  assert make(masks.sliding_window(3, 3)).kv_num_blocks.shape[:2] == (1, 1)
  assert make(None).kv_num_blocks.shape[:2] == (1, 1)
  assert make(masks.document(jnp.asarray(segments(B, T)))).kv_num_blocks.shape[:2] == (B, 1)
  assert make(masks.causal(jnp.arange(B))).kv_num_blocks.shape[:2] == (B, 1)
  per_head = np.random.default_rng(0).random((1, N, T, T)) > 0.5
  assert make(masks.from_array(jnp.asarray(per_head))).kv_num_blocks.shape[:2] == (1, N)
  both = np.random.default_rng(1).random((B, N, T, T)) > 0.5
  block = make(masks.from_array(jnp.asarray(both)))
  assert block.kv_num_blocks.shape[:2] == (B, N)
  np.testing.assert_array_equal(block.to_dense(), both)


def test_chunked_evaluation_matches(monkeypatch):
  # Force tile classification to run a few query blocks at a time, with a ragged last step.
  mod = masks.and_masks(masks.causal(), masks.document(jnp.asarray(segments(2, 70, seed=9))))
  whole = bm.create_block_mask(mod, 2, 1, 70, 70, block_q=8, block_kv=8)
  monkeypatch.setattr(bm, "_EVAL_ELEMENTS", 3 * 8 * 72)
  pieces = bm.create_block_mask(mod, 2, 1, 70, 70, block_q=8, block_kv=8)
  np.testing.assert_array_equal(pieces.classes(), whole.classes())


@pytest.mark.parametrize("arg,value", [("T", 0), ("S", -1), ("block_q", 0), ("block_kv", 2.5)])
def test_rejects_bad_sizes(arg, value):
  kwargs = dict(T=8, S=8, block_q=4, block_kv=4)
  kwargs[arg] = value
  with pytest.raises(ValueError, match=arg):
    bm.create_block_mask(masks.causal(), 1, 1, kwargs.pop("T"), kwargs.pop("S"), **kwargs)


def test_batch_or_head_dependent_mask_needs_B_or_N():
  """A mask that varies over rows (heads) cannot be classified once for all of them: B=None (N=None)
  is an error, and a block mask built for B=1 (N=1) is rejected by an operator with more rows."""
  from attnjax.core import flex   # pylint: disable=import-outside-toplevel
  T, N = 24, 2
  seg = jnp.asarray(np.array([[0] * 12 + [1] * 12, [0] * 5 + [1] * 19], np.int32))
  per_row = masks.and_masks(masks.causal(), masks.document(seg))
  with pytest.raises(ValueError, match="batch row.*`B`"):
    bm.create_block_mask(per_row, None, N, T, T, block_q=8, block_kv=8)
  with pytest.raises(ValueError, match="batch row.*`B`"):
    bm.create_block_mask(masks.causal(jnp.asarray([0, 3])), None, None, T, T, block_q=8, block_kv=8)
  per_head = masks.from_array(jnp.asarray(np.random.default_rng(0).random((1, N, T, T)) > 0.5))
  with pytest.raises(ValueError, match="head.*`N`"):
    bm.create_block_mask(per_head, 1, None, T, T, block_q=8, block_kv=8)
  # Built for one row / head: usable with exactly one, rejected with more.
  rng = np.random.default_rng(1)
  q, k, v = (jnp.asarray(rng.normal(size=(2, T, N, 8)), jnp.float32) for _ in range(3))
  one_row = bm.create_block_mask(per_row, 1, N, T, T, block_q=8, block_kv=8)
  assert one_row.varies == (True, False)
  with pytest.raises(ValueError, match="`block_mask`.*B=1.*batch row"):
    flex.flex_attention(q, k, v, block_mask=one_row)
  one_head = bm.create_block_mask(per_head, 1, 1, T, T, block_q=8, block_kv=8)
  with pytest.raises(ValueError, match="`block_mask`.*N=1.*head"):
    flex.flex_attention(q[:1], k[:1], v[:1], block_mask=one_head)
  # With B given, row 1 gets its own tiles: the result equals the dense mask (the bug was a
  # 2.5 error on row 1 when row 0's tiles were used for it).
  block = bm.create_block_mask(per_row, 2, None, T, T, block_q=8, block_kv=8)
  assert block.varies == (True, False) and block.kv_num_blocks.shape[:2] == (2, 1)
  vis = np.asarray(masks.evaluate_mask(per_row, 2, N, T, T))
  s = np.einsum("btnh,bsnh->bnts", *(np.asarray(x, np.float64) for x in (q, k))) * 8 ** -0.5
  w = np.where(vis, np.exp(s - s.max(-1, keepdims=True)), 0.0)
  want = np.einsum("bnts,bsnh->btnh", w / w.sum(-1, keepdims=True), np.asarray(v, np.float64))
  for impl in ("xla", "reference"):
    chex.assert_trees_all_close(flex.flex_attention(q, k, v, block_mask=block, implementation=impl),
                                want.astype(np.float32), **tolerances.output(jnp.float32))
  # A mask that does not vary keeps working without B and N.
  assert bm.create_block_mask(masks.causal(), None, None, T, T).varies == (False, False)
