"""Relative-position helpers (attnjax/core/relative.py): the clipped table row of a pair, the
query·table products (shared and per head group), and the score_mod that adds them, against dense
numpy forms, with absolute query positions (`q_offset` an int or per batch row)."""

import jax.numpy as jnp
import numpy as np

from attnjax.core import masks
from attnjax.core.relative import (clipped_relative_index, relative_key_score_mod,
                                   relative_query_table)
from tests import inputs
from tests import tolerances

B, T, N, K, H = 2, 5, 4, 2, 8


def test_clipped_index_is_the_row_of_the_clipped_distance():
  q_pos, kv = np.arange(9)[:, None], np.arange(9)[None]
  got = np.asarray(clipped_relative_index(q_pos, kv, 3))
  np.testing.assert_array_equal(got, np.clip(kv - q_pos, -3, 3) + 3)
  assert got.min() == 0 and got.max() == 6


def test_query_tables_shared_and_per_group():
  q, _, _ = inputs.qkv(B=B, T=T, N=N, K=K, H=H, seed=1)
  rng = np.random.default_rng(0)
  shared = rng.standard_normal((7, H)).astype(np.float32)
  grouped = rng.standard_normal((7, K, H)).astype(np.float32)
  qd = np.asarray(q, np.float64)
  np.testing.assert_allclose(np.asarray(relative_query_table(q, shared)),
                             np.einsum("btnh,rh->btnr", qd, shared), **tolerances.output(jnp.float32))
  # Query head n reads group n // (N / K), as GQA reads key heads.
  want = np.einsum("btnh,rnh->btnr", qd, np.repeat(grouped, N // K, axis=1))
  np.testing.assert_allclose(np.asarray(relative_query_table(q, grouped, heads_axis=1)), want,
                             **tolerances.output(jnp.float32))


def test_score_mod_adds_the_table_at_absolute_positions():
  table = np.random.default_rng(1).standard_normal((B, T, N, 7)).astype(np.float32)
  offsets = np.array([3, 6])
  mod = relative_key_score_mod(jnp.asarray(table), lambda p, j: clipped_relative_index(p, j, 3),
                               q_offset=jnp.asarray(offsets), scale=0.5)
  S = 10
  b, n, qi, kv = masks.index_grid((B, N, T, S))
  got = np.asarray(mod(jnp.zeros((B, N, T, S)), b, n, qi, kv))
  pos = offsets[:, None] + np.arange(T)                                     # [B, T]
  rows = np.clip(np.arange(S)[None, None] - pos[..., None], -3, 3) + 3     # [B, T, S]
  want = 0.5 * np.take_along_axis(table.transpose(0, 2, 1, 3)[:, :, :, None, :],
                                  rows[:, None, :, :, None], axis=-1)[..., 0]
  np.testing.assert_allclose(got, want, **tolerances.EXACT_VALUES[jnp.float32])
