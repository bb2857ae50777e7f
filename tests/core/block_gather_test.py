"""attnjax/core/block_gather.py: attention over per-query block lists, computed as tiles of the queries
that chose each block, equals flex attention under the same selection (`sparse.attend_selected`'s two
forms) in outputs and gradients: non-power-of-two lengths, partial last block, GQA, one selection per
head or shared, causal and padding masks, fp32 and bf16; a query with nothing visible gives zeros;
`block_lists` reads a selection table in block order; the tile height keeps padding small."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attnjax.core import block_gather
from attnjax.core import sparse
from tests import inputs
from tests import tolerances

B, T, N, K, H, HV = 2, 23, 4, 2, 8, 6
BS, PER_QUERY = 5, 3
NB = -(-T // BS)


def _selection(heads, seed=0):
  """A random table `[B, heads, T, NB]` with 1..PER_QUERY blocks per query (query 0 of row 1:
  none)."""
  rng = np.random.default_rng(seed)
  scores = rng.standard_normal((B, heads, T, NB))
  count = rng.integers(1, PER_QUERY + 1, size=(B, heads, T, 1))
  table = np.argsort(np.argsort(-scores, axis=-1), axis=-1) < count
  table[1, :, 0] = False
  return jnp.asarray(table)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("heads,causal", [(N, True), (1, False)])
def test_gathered_equals_flex_under_the_selection(dtype, heads, causal):
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV, dtype=dtype)
  selected = _selection(heads)
  lengths = jnp.array([T, 17])

  def run(implementation):
    return lambda q, k, v: sparse.attend_selected(
        "test", q, k, v, selected, q_block=1, block_size=BS, causal=causal, kv_lengths=lengths,
        implementation=implementation, per_query=PER_QUERY)

  got, want = (jax.jit(run(name))(q, k, v) for name in (sparse.GATHERED, "reference"))
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             **tolerances.output(dtype))
  np.testing.assert_array_equal(np.asarray(got[1, 0], np.float32), 0.0)  # nothing selected
  dout = jax.random.normal(jax.random.PRNGKey(3), got.shape, jnp.float32).astype(dtype)
  inputs.assert_same_gradients(run(sparse.GATHERED), run("reference"), (q, k, v), dout,
                               ("q", "k", "v"), tol=tolerances.GRAD[dtype])


def test_block_lists_reads_the_table_in_block_order():
  table = jnp.asarray([[False, True, False, True, True], [False, False, False, False, False]])
  blocks, valid = block_gather.block_lists(table, 4)
  np.testing.assert_array_equal(np.asarray(blocks), [[1, 3, 4, 0], [0, 0, 0, 0]])
  np.testing.assert_array_equal(np.asarray(valid), [[True, True, True, False], [False] * 4])


def test_tile_rows_keep_padding_within_an_eighth():
  assert block_gather.tile_rows(16384 * 3, 16384, 512) == 256
  assert block_gather.tile_rows(23 * 3, 23, 5) == 8
  for pairs, S, bs in ((4096 * 3, 4096, 512), (1000, 1000, 64)):
    rows = block_gather.tile_rows(pairs, S, bs)
    assert rows == 8 or 4 * (-(-S // bs)) * rows <= pairs


def test_gathered_needs_one_selection_per_query():
  q, k, v = inputs.qkv(B=B, T=T, N=N, K=K, H=H, h=HV)
  with pytest.raises(ValueError, match="implementation 'gathered' needs one selection per query"):
    sparse.attend_selected("test", q, k, v, _selection(N)[:, :, :12], q_block=2, block_size=BS,
                           causal=False, implementation=sparse.GATHERED, per_query=PER_QUERY)
